#include "spec/yaml_reader.h"

#include <libfyaml.h>

#include <map>
#include <memory>

#include "common/utf8.h"

namespace kiln {
namespace {

struct ParserDeleter {
  void operator()(fy_parser* p) const { fy_parser_destroy(p); }
};
struct DiagDeleter {
  void operator()(fy_diag* d) const { fy_diag_destroy(d); }
};

// Saturating: counts only need to be compared with a limit.
size_t AddCapped(size_t a, size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }

std::string_view TokenText(fy_token* t) {
  if (t == nullptr) return {};
  size_t len = 0;
  const char* s = fy_token_get_text(t, &len);
  return s == nullptr ? std::string_view() : std::string_view(s, len);
}

bool IsNullSpelling(std::string_view s) {
  return s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL";
}

class TreeBuilder {
 public:
  TreeBuilder(YamlStream& out, const YamlLimits& limits) : out_(out), limits_(limits) {}

  // Returns false once an error has been recorded.
  bool On(fy_event* e) {
    switch (e->type) {
      case FYET_DOCUMENT_START:
        anchors_.clear();  // anchors are scoped to their document
        return true;
      case FYET_SCALAR:
        return OnScalar(e);
      case FYET_ALIAS:
        return OnAlias(e);
      case FYET_SEQUENCE_START:
        return OnStart(e, YamlNode::Kind::kSequence, e->sequence_start.anchor);
      case FYET_MAPPING_START:
        return OnStart(e, YamlNode::Kind::kMapping, e->mapping_start.anchor);
      case FYET_SEQUENCE_END:
      case FYET_MAPPING_END:
        return OnEnd();
      default:
        return true;
    }
  }

 private:
  struct Open {
    YamlNode* node;
    size_t expanded;  // this node and everything under it, aliases expanded
    std::string anchor;
    const YamlNode* pending_key = nullptr;
  };
  struct Anchored {
    const YamlNode* node;
    size_t expanded;
  };

  bool Fail(const fy_mark* m, std::string message) {
    YamlError err;
    if (m != nullptr) {
      err.line = m->line + 1;
      err.column = m->column + 1;
    }
    err.message = std::move(message);
    out_.error = std::move(err);
    return false;
  }

  YamlNode* NewNode(fy_event* e, YamlNode::Kind kind) {
    YamlNode& n = out_.nodes.emplace_back();
    n.kind = kind;
    if (const fy_mark* m = fy_event_start_mark(e)) {
      n.line = m->line + 1;
      n.column = m->column + 1;
    }
    return &n;
  }

  bool Count(fy_event* e, size_t n) {
    total_ = AddCapped(total_, n);
    if (total_ > limits_.max_nodes) {
      return Fail(fy_event_start_mark(e),
                  "more than " + std::to_string(limits_.max_nodes) +
                      " nodes in one file (each alias counts as a copy of what it refers to)");
    }
    return true;
  }

  void Attach(const YamlNode* child, size_t expanded) {
    if (open_.empty()) {
      out_.documents.push_back(child);
      return;
    }
    Open& parent = open_.back();
    parent.expanded = AddCapped(parent.expanded, expanded);
    if (parent.node->kind == YamlNode::Kind::kSequence) {
      parent.node->items.push_back(child);
    } else if (parent.pending_key == nullptr) {
      parent.pending_key = child;
    } else {
      parent.node->entries.emplace_back(parent.pending_key, child);
      parent.pending_key = nullptr;
    }
  }

  bool OnScalar(fy_event* e) {
    fy_token* t = e->scalar.value;
    std::string_view text = TokenText(t);
    const fy_scalar_style style = fy_token_scalar_style(t);
    // libfyaml marks a quoted scalar after its opening quote; errors point at the quote.
    std::optional<fy_mark> mark;
    if (const fy_mark* m = fy_event_start_mark(e)) {
      mark = *m;
      if ((style == FYSS_SINGLE_QUOTED || style == FYSS_DOUBLE_QUOTED) && mark->column > 0) {
        --mark->column;
      }
    }
    if (text.size() > limits_.max_scalar_bytes) {
      return Fail(mark ? &*mark : nullptr,
                  "a string longer than " + std::to_string(limits_.max_scalar_bytes) + " bytes");
    }
    // The input was checked to be UTF-8; this guards against the parser handing back other
    // bytes, which would otherwise travel on into JSON (the stored spec, API errors).
    if (!IsValidUtf8(text)) return Fail(mark ? &*mark : nullptr, "a string that is not UTF-8");
    if (!Count(e, 1)) return false;
    const bool plain = style == FYSS_PLAIN && e->scalar.tag == nullptr;
    YamlNode* n =
        NewNode(e, plain && IsNullSpelling(text) ? YamlNode::Kind::kNull : YamlNode::Kind::kScalar);
    n->text = std::string(text);
    n->plain = plain;
    if (mark) {
      n->line = mark->line + 1;
      n->column = mark->column + 1;
    }
    if (e->scalar.anchor != nullptr) anchors_[std::string(TokenText(e->scalar.anchor))] = {n, 1};
    Attach(n, 1);
    return true;
  }

  bool OnAlias(fy_event* e) {
    std::string name(TokenText(e->alias.anchor));
    auto it = anchors_.find(name);
    if (it == anchors_.end()) {
      return Fail(fy_event_start_mark(e),
                  "alias *" + name + " refers to no complete anchored node before it");
    }
    if (!Count(e, it->second.expanded)) return false;
    Attach(it->second.node, it->second.expanded);
    return true;
  }

  bool OnStart(fy_event* e, YamlNode::Kind kind, fy_token* anchor) {
    if (static_cast<int>(open_.size()) >= limits_.max_depth) {
      return Fail(fy_event_start_mark(e),
                  "nested deeper than " + std::to_string(limits_.max_depth) + " levels");
    }
    if (!Count(e, 1)) return false;
    open_.push_back({NewNode(e, kind), 1, std::string(TokenText(anchor))});
    return true;
  }

  bool OnEnd() {
    if (open_.empty()) return true;  // the parser pairs them; nothing to end otherwise
    Open done = std::move(open_.back());
    open_.pop_back();
    // An anchor becomes usable only now, so no alias can make a node contain itself.
    if (!done.anchor.empty()) anchors_[done.anchor] = {done.node, done.expanded};
    Attach(done.node, done.expanded);
    return true;
  }

  YamlStream& out_;
  const YamlLimits& limits_;
  std::vector<Open> open_;
  std::map<std::string, Anchored> anchors_;
  size_t total_ = 0;
};

}  // namespace

YamlStream ParseYaml(std::string_view text, const YamlLimits& limits) {
  YamlStream out;
  fy_diag_cfg diag_cfg;
  fy_diag_cfg_default(&diag_cfg);
  diag_cfg.fp = nullptr;
  diag_cfg.level = FYET_ERROR;
  std::unique_ptr<fy_diag, DiagDeleter> diag(fy_diag_create(&diag_cfg));
  if (!diag) {
    out.error = YamlError{0, 0, "cannot create the YAML parser"};
    return out;
  }
  fy_diag_set_collect_errors(diag.get(), true);  // kept for the error, never printed

  fy_parse_cfg cfg{};
  cfg.flags = static_cast<fy_parse_cfg_flags>(FYPCF_QUIET | FYPCF_COLLECT_DIAG |
                                              FYPCF_DEFAULT_VERSION_1_2 | FYPCF_JSON_NONE);
  cfg.diag = diag.get();
  std::unique_ptr<fy_parser, ParserDeleter> parser(fy_parser_create(&cfg));
  if (!parser || fy_parser_set_string(parser.get(), text.data(), text.size()) != 0) {
    out.error = YamlError{0, 0, "cannot create the YAML parser"};
    return out;
  }

  TreeBuilder builder(out, limits);
  while (fy_event* e = fy_parser_parse(parser.get())) {
    const bool go_on = builder.On(e);
    fy_parser_event_free(parser.get(), e);
    if (!go_on) return out;
  }
  if (fy_parser_get_stream_error(parser.get())) {
    YamlError err{0, 0, "invalid YAML"};
    void* iter = nullptr;
    if (fy_diag_error* d = fy_diag_errors_iterate(diag.get(), &iter)) {
      err.line = d->line > 0 ? d->line : 0;  // libfyaml reports these 1-based
      err.column = err.line > 0 && d->column > 0 ? d->column : 0;
      if (d->msg != nullptr && *d->msg != '\0') err.message = d->msg;
    }
    out.error = std::move(err);
  }
  return out;
}

std::string QuoteForError(std::string_view s) {
  constexpr size_t kMaxShown = 80;
  static constexpr char kHex[] = "0123456789abcdef";
  const std::string safe = SanitizeUtf8(s);
  const std::string_view shown = TruncateUtf8(safe, kMaxShown);
  std::string out = "\"";
  for (char ch : shown) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    } else {
      out.push_back(ch);
    }
  }
  out += "\"";
  if (shown.size() < safe.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string DescribeYamlNode(const YamlNode* n) {
  switch (n->kind) {
    case YamlNode::Kind::kMapping:
      return "a mapping";
    case YamlNode::Kind::kSequence:
      return "a list";
    case YamlNode::Kind::kNull:
      return "nothing";
    case YamlNode::Kind::kScalar:
      return QuoteForError(n->text);
  }
  return "nothing";
}

}  // namespace kiln
