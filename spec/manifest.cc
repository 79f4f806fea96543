#include "spec/manifest.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "common/duration.h"
#include "common/limits.h"
#include "common/regular_file.h"
#include "common/sha256.h"
#include "common/utf8.h"
#include "spec/yaml_reader.h"

namespace kiln {
namespace fs = std::filesystem;

namespace {

// Keys each block accepts, for unknown-key errors and suggestions.
const std::vector<std::string> kServiceKeys = {
    "name", "version", "replicas", "artifact",      "image",  "command", "env",
    "port", "health",  "update",   "history_limit", "expose", "hosts"};
const std::vector<std::string> kArtifactKeys = {"path", "sha256"};
const std::vector<std::string> kHealthKeys = {"http",     "tcp",     "exec",
                                              "interval", "timeout", "failure_threshold"};
const std::vector<std::string> kHttpKeys = {"path", "port"};
const std::vector<std::string> kTcpKeys = {"port"};
const std::vector<std::string> kExposeKeys = {"port", "listen", "drain"};
const std::vector<std::string> kUpdateKeys = {
    "strategy",          "max_surge",     "max_unavailable", "min_healthy_time", "healthy_deadline",
    "progress_deadline", "auto_rollback", "canary",          "auto_promote"};

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

bool IsMap(const YamlNode* n) { return n->kind == YamlNode::Kind::kMapping; }
bool IsSequence(const YamlNode* n) { return n->kind == YamlNode::Kind::kSequence; }
bool IsScalar(const YamlNode* n) { return n->kind == YamlNode::Kind::kScalar; }
bool IsNull(const YamlNode* n) { return n->kind == YamlNode::Kind::kNull; }

// A quoted scalar ('3', "true") is a string, never a number or a boolean.
bool IsPlainScalar(const YamlNode* n) { return IsScalar(n) && n->plain; }

std::optional<int64_t> ParseInteger(std::string_view s) {
  if (s.empty() || s.size() > 12) return std::nullopt;
  size_t i = (s[0] == '-' || s[0] == '+') ? 1 : 0;
  if (i == s.size()) return std::nullopt;
  int64_t v = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return std::nullopt;
    v = v * 10 + (s[i] - '0');
  }
  return s[0] == '-' ? -v : v;
}

bool HasControlCharacter(std::string_view s) {
  return std::any_of(s.begin(), s.end(),
                     [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

bool IsValidServiceName(std::string_view s) {
  if (s.empty() || s.size() > kMaxServiceNameBytes) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return s.front() != '-' && s.back() != '-';
}

bool IsValidEnvName(std::string_view s) {
  if (s.empty() || (s[0] >= '0' && s[0] <= '9')) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
      return false;
  }
  return true;
}

std::string Join(const std::string& prefix, std::string_view key) {
  return prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
}

// One entry of a mapping, with the key's node kept for its position.
struct Entry {
  std::string key;
  const YamlNode* key_node;
  const YamlNode* value;
};

// Parses the documents of one file, collecting every error.
class FileParser {
 public:
  FileParser(ManifestFile& file, const ArtifactHasher& hasher) : file_(file), hasher_(hasher) {}

  // REQUIRES: `text` is valid UTF-8.
  void ParseText(std::string_view text) {
    YamlLimits limits;
    limits.max_depth = kMaxManifestDepth;
    limits.max_scalar_bytes = kMaxManifestScalarBytes;
    limits.max_nodes = kMaxManifestNodes;
    YamlStream stream = ParseYaml(text, limits);
    if (stream.error) {
      // The parser cannot go on after an error: no service of this file is read.
      AddAt(stream.error->line, stream.error->column, "",
            "invalid YAML: " + SanitizeUtf8(stream.error->message));
      return;
    }
    for (const YamlNode* doc : stream.documents) {
      if (IsNull(doc)) continue;  // an empty document between `---` separators
      ParseService(doc);
    }
  }

  // Adds the note about errors beyond the per-file limit.
  void Finish() {
    if (suppressed_ == 0) return;
    file_.errors.push_back({file_.path, suppressed_line_, suppressed_column_, "",
                            "and " + std::to_string(suppressed_) +
                                " more errors in this file from here on (only the first " +
                                std::to_string(kMaxManifestErrorsPerFile) + " are reported)"});
  }

 private:
  void AddAt(int line, int column, std::string key_path, std::string message) {
    if (file_.errors.size() >= kMaxManifestErrorsPerFile) {
      if (suppressed_++ == 0) {
        suppressed_line_ = line;
        suppressed_column_ = column;
      }
      return;
    }
    ManifestError e;
    e.file = file_.path;
    if (line > 0) {
      e.line = line;
      e.column = column;
    }
    e.key_path = std::move(key_path);
    e.message = std::move(message);
    file_.errors.push_back(std::move(e));
  }
  // Errors point at the value; a null value has no position, so they point at its key.
  void Add(const YamlNode* at, const YamlNode* fallback, std::string key_path, std::string m) {
    const YamlNode* where = at->line > 0 ? at : fallback;
    AddAt(where->line, where->column, std::move(key_path), std::move(m));
  }

  // Returns the entries of a mapping, reporting duplicate and unknown keys.
  std::vector<Entry> Entries(const YamlNode* map, const std::string& path,
                             const std::vector<std::string>& allowed) {
    std::vector<Entry> out;
    std::set<std::string> seen;
    for (const auto& [k, value] : map->entries) {
      if (!IsScalar(k)) {
        Add(k, map, path, "keys must be plain names, got " + DescribeYamlNode(k));
        continue;
      }
      std::string key = k->text;
      if (key.size() > kMaxKeyBytes) {
        // Not named in the error: a key path of kilobytes helps nobody.
        Add(k, map, path,
            "unknown key of " + std::to_string(key.size()) + " bytes (keys are at most " +
                std::to_string(kMaxKeyBytes) + ")");
        continue;
      }
      std::string key_path = Join(path, key);
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        std::string msg = "unknown key";
        std::string best;
        size_t best_d = 3;
        for (const auto& a : allowed) {
          // Lengths further apart than the best distance so far cannot beat it.
          const size_t gap = key.size() > a.size() ? key.size() - a.size() : a.size() - key.size();
          if (gap >= best_d) continue;
          size_t d = EditDistance(key, a);
          if (d < best_d) {
            best_d = d;
            best = a;
          }
        }
        if (!best.empty()) msg += " (did you mean \"" + best + "\"?)";
        Add(k, map, key_path, msg);
        continue;
      }
      if (!seen.insert(key).second) {
        Add(k, map, key_path, "duplicate key");
        continue;
      }
      out.push_back({key, k, value});
    }
    return out;
  }

  // The documented field limits (common/limits.h): false, with an error naming the field.
  bool WithinBytes(const YamlNode* at, const YamlNode* fallback, const std::string& path,
                   std::string_view value, size_t max) {
    if (value.size() <= max) return true;
    Add(at, fallback, path,
        "is " + std::to_string(value.size()) + " bytes; the limit is " + std::to_string(max));
    return false;
  }
  bool WithinCount(const YamlNode* at, const YamlNode* fallback, const std::string& path,
                   size_t count, size_t max, std::string_view what) {
    if (count <= max) return true;
    Add(at, fallback, path,
        "has " + std::to_string(count) + " " + std::string(what) + "; the limit is " +
            std::to_string(max));
    return false;
  }

  bool ExpectMap(const Entry& e, const std::string& path) {
    if (IsMap(e.value)) return true;
    Add(e.value, e.key_node, path, "expected a mapping, got " + DescribeYamlNode(e.value));
    return false;
  }

  bool GetString(const Entry& e, const std::string& path, std::string* out) {
    if (!IsScalar(e.value)) {
      Add(e.value, e.key_node, path, "expected a string, got " + DescribeYamlNode(e.value));
      return false;
    }
    *out = e.value->text;
    return true;
  }

  bool GetInt(const Entry& e, const std::string& path, int64_t min, int64_t max, int* out) {
    std::optional<int64_t> v;
    if (IsPlainScalar(e.value)) v = ParseInteger(e.value->text);
    if (!v) {
      Add(e.value, e.key_node, path, "expected an integer, got " + DescribeYamlNode(e.value));
      return false;
    }
    if (*v < min || *v > max) {
      std::string range = max >= (1LL << 30)
                              ? std::to_string(min) + " or more"
                              : "from " + std::to_string(min) + " to " + std::to_string(max);
      Add(e.value, e.key_node, path, "must be " + range + ", got " + std::to_string(*v));
      return false;
    }
    *out = static_cast<int>(*v);
    return true;
  }

  bool GetBool(const Entry& e, const std::string& path, bool* out) {
    if (IsPlainScalar(e.value)) {
      const std::string& s = e.value->text;
      if (s == "true") {
        *out = true;
        return true;
      }
      if (s == "false") {
        *out = false;
        return true;
      }
    }
    Add(e.value, e.key_node, path, "expected true or false, got " + DescribeYamlNode(e.value));
    return false;
  }

  bool GetDuration(const Entry& e, const std::string& path, bool allow_zero, Duration* out) {
    if (!IsScalar(e.value)) {
      Add(e.value, e.key_node, path,
          "expected a duration like 500ms, 2s or 10m, got " + DescribeYamlNode(e.value));
      return false;
    }
    StatusOr<Duration> d = ParseDuration(e.value->text);
    if (!d.ok()) {
      Add(e.value, e.key_node, path, d.status().message());
      return false;
    }
    if (!allow_zero && d->count() == 0) {
      Add(e.value, e.key_node, path, "must be more than 0s");
      return false;
    }
    *out = *d;
    return true;
  }

  bool GetCountOrPercent(const Entry& e, const std::string& path, CountOrPercent* out) {
    std::string s = IsScalar(e.value) ? e.value->text : "";
    bool percent = !s.empty() && s.back() == '%';
    if (percent) s.pop_back();
    std::optional<int64_t> v = IsScalar(e.value) ? ParseInteger(s) : std::nullopt;
    if (!v) {
      Add(e.value, e.key_node, path,
          "expected a count or a percentage, got " + DescribeYamlNode(e.value));
      return false;
    }
    if (*v < 0 || (percent && *v > 100) || *v > 1'000'000) {
      Add(e.value, e.key_node, path,
          std::string(percent ? "a percentage must be from 0% to 100%"
                              : "a count must be 0 or more") +
              ", got " + DescribeYamlNode(e.value));
      return false;
    }
    *out = {static_cast<int>(*v), percent};
    return true;
  }

  bool GetStringList(const Entry& e, const std::string& path, bool allow_empty,
                     std::vector<std::string>* out) {
    if (!IsSequence(e.value)) {
      Add(e.value, e.key_node, path,
          "expected a list of strings, got " + DescribeYamlNode(e.value));
      return false;
    }
    if (!WithinCount(e.value, e.key_node, path, e.value->items.size(), kMaxCommandArgs,
                     "arguments")) {
      return false;
    }
    bool ok = true;
    std::vector<std::string> v;
    for (size_t i = 0; i < e.value->items.size(); ++i) {
      const YamlNode* item = e.value->items[i];
      if (!IsScalar(item)) {
        Add(item, e.value, path + "[" + std::to_string(i) + "]",
            "expected a string, got " + DescribeYamlNode(item));
        ok = false;
        continue;
      }
      if (!WithinBytes(item, e.value, path + "[" + std::to_string(i) + "]", item->text,
                       kMaxCommandArgBytes)) {
        ok = false;
        continue;
      }
      v.push_back(item->text);
    }
    if (ok && v.empty() && !allow_empty) {
      Add(e.value, e.key_node, path, "must not be empty");
      return false;
    }
    if (ok) *out = std::move(v);
    return ok;
  }

  // `hosts: [a, b]`: names of Docker hosts (--docker-host name=...), each once. Whether kilnd
  // has them is known only to kilnd: a name it lacks is reported on the service, not here.
  void ParseHosts(const Entry& e, std::vector<std::string>* out) {
    std::vector<std::string> v;
    if (!GetStringList(e, "hosts", /*allow_empty=*/false, &v)) return;
    std::set<std::string> seen;
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string path = "hosts[" + std::to_string(i) + "]";
      if (!IsValidServiceName(v[i])) {
        Add(e.value->items[i], e.value, path,
            "a host name is 1 to 63 characters of a-z, 0-9 and '-', not starting or ending "
            "with '-', got " +
                QuoteForError(v[i]));
        return;
      }
      if (!seen.insert(v[i]).second) {
        Add(e.value->items[i], e.value, path, "host " + QuoteForError(v[i]) + " is named twice");
        return;
      }
    }
    *out = std::move(v);
  }

  void ParseEnv(const Entry& e, std::map<std::string, std::string>* out) {
    if (!ExpectMap(e, "env")) return;
    if (!WithinCount(e.value, e.key_node, "env", e.value->entries.size(), kMaxEnvVars,
                     "variables")) {
      return;
    }
    std::set<std::string> seen;
    for (const auto& [k, v] : e.value->entries) {
      std::string name = IsScalar(k) ? k->text : "";
      if (name.size() > kMaxEnvNameBytes) {
        Add(k, e.value, "env",
            "a variable name is " + std::to_string(name.size()) + " bytes; the limit is " +
                std::to_string(kMaxEnvNameBytes));
        continue;
      }
      std::string path = "env." + name;
      if (!IsValidEnvName(name)) {
        Add(k, e.value, path,
            "environment variable names are letters, digits and '_', got " + DescribeYamlNode(k));
        continue;
      }
      if (name == "PORT" || name.rfind("KILN_", 0) == 0) {
        Add(k, e.value, path, "is set by kiln for every instance and cannot be overridden");
        continue;
      }
      if (!seen.insert(name).second) {
        Add(k, e.value, path, "duplicate key");
        continue;
      }
      if (!IsScalar(v)) {
        Add(v, k, path, "expected a string, got " + DescribeYamlNode(v));
        continue;
      }
      if (!WithinBytes(v, k, path, v->text, kMaxEnvValueBytes)) continue;
      (*out)[name] = v->text;
    }
  }

  void ParseHealth(const Entry& e, HealthCheck* h) {
    if (!ExpectMap(e, "health")) return;
    int probes = 0;
    for (const Entry& he : Entries(e.value, "health", kHealthKeys)) {
      std::string path = "health." + he.key;
      if (he.key == "http" || he.key == "tcp" || he.key == "exec") {
        if (++probes > 1) {
          Add(he.key_node, e.value, path, "a health check has one probe: http, tcp or exec");
          continue;
        }
      }
      if (he.key == "http") {
        h->kind = ProbeKind::kHttp;
        h->http_path = "/";
        if (IsNull(he.value)) continue;  // `http:` alone probes GET / on the instance's port
        if (!ExpectMap(he, path)) continue;
        for (const Entry& pe : Entries(he.value, path, kHttpKeys)) {
          std::string p2 = path + "." + pe.key;
          if (pe.key == "path") {
            if (!GetString(pe, p2, &h->http_path) ||
                !WithinBytes(pe.value, pe.key_node, p2, h->http_path, kMaxHealthPathBytes)) {
              continue;
            }
            if (h->http_path.rfind('/', 0) != 0) {
              Add(pe.value, pe.key_node, p2,
                  "must start with '/', got " + QuoteForError(h->http_path));
            }
          } else {
            GetInt(pe, p2, 1, 65535, &h->port);
          }
        }
      } else if (he.key == "tcp") {
        h->kind = ProbeKind::kTcp;
        if (IsNull(he.value)) continue;
        if (!ExpectMap(he, path)) continue;
        for (const Entry& pe : Entries(he.value, path, kTcpKeys)) {
          GetInt(pe, path + "." + pe.key, 1, 65535, &h->port);
        }
      } else if (he.key == "exec") {
        h->kind = ProbeKind::kExec;
        GetStringList(he, path, /*allow_empty=*/false, &h->exec);
      } else if (he.key == "interval") {
        GetDuration(he, path, false, &h->interval);
      } else if (he.key == "timeout") {
        GetDuration(he, path, false, &h->timeout);
      } else if (he.key == "failure_threshold") {
        GetInt(he, path, 1, 1000, &h->failure_threshold);
      }
    }
    if (probes == 0) {
      Add(e.value, e.key_node, "health", "needs a probe: http, tcp or exec");
    }
  }

  // expose: {port: 8080} (on 127.0.0.1), or {listen: HOST:PORT}; drain: a duration.
  void ParseExpose(const Entry& e, ServiceSpec* s) {
    if (!ExpectMap(e, "expose")) return;
    ExposeSpec x;
    std::optional<Entry> port, listen;
    for (const Entry& xe : Entries(e.value, "expose", kExposeKeys)) {
      const std::string path = "expose." + xe.key;
      if (xe.key == "port") {
        port = xe;
        GetInt(xe, path, 1, 65535, &x.port);
      } else if (xe.key == "listen") {
        listen = xe;
        std::string text;
        if (!GetString(xe, path, &text)) continue;
        const size_t colon = text.rfind(':');
        std::string host = colon == std::string::npos ? "" : text.substr(0, colon);
        if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
          host = host.substr(1, host.size() - 2);
        }
        const std::string port_text = colon == std::string::npos ? "" : text.substr(colon + 1);
        char* end = nullptr;
        const long p = std::strtol(port_text.c_str(), &end, 10);
        in6_addr v6{};
        in_addr v4{};
        const bool ip = inet_pton(AF_INET, host.c_str(), &v4) == 1 ||
                        inet_pton(AF_INET6, host.c_str(), &v6) == 1;
        if (!ip || port_text.empty() || *end != '\0' || p < 1 || p > 65535) {
          Add(xe.value, xe.key_node, path,
              "expected IP:PORT with a port in 1-65535 (127.0.0.1:8080, 0.0.0.0:8080, "
              "[::1]:8080), got " +
                  QuoteForError(text));
          continue;
        }
        x.listen_host = host;
        x.port = static_cast<int>(p);
      } else if (xe.key == "drain") {
        GetDuration(xe, path, /*allow_zero=*/true, &x.drain);
      }
    }
    if (port && listen) {
      Add(listen->key_node, e.value, "expose.listen",
          "give expose.port (on 127.0.0.1) or expose.listen (HOST:PORT), not both");
      return;
    }
    if (!port && !listen) {
      Add(e.value, e.key_node, "expose", "needs a port (expose.port, or expose.listen HOST:PORT)");
      return;
    }
    const Entry& at = port ? *port : *listen;
    const YamlNode* where = at.value->line > 0 ? at.value : at.key_node;
    x.line = where->line;
    x.column = where->column;
    s->expose = x;
  }

  void ParseUpdate(const Entry& e, UpdatePolicy* u) {
    if (!ExpectMap(e, "update")) return;
    std::map<std::string, const YamlNode*> given;
    for (const Entry& ue : Entries(e.value, "update", kUpdateKeys)) {
      std::string path = "update." + ue.key;
      given[ue.key] = ue.key_node;
      if (ue.key == "strategy") {
        std::string s;
        if (!GetString(ue, path, &s)) continue;
        if (std::optional<Strategy> st = ParseStrategy(s))
          u->strategy = *st;
        else
          Add(ue.value, ue.key_node, path,
              "expected rolling, recreate, blue-green or canary, got " + QuoteForError(s));
      } else if (ue.key == "max_surge") {
        GetCountOrPercent(ue, path, &u->max_surge);
      } else if (ue.key == "max_unavailable") {
        GetCountOrPercent(ue, path, &u->max_unavailable);
      } else if (ue.key == "min_healthy_time") {
        GetDuration(ue, path, true, &u->min_healthy_time);
      } else if (ue.key == "healthy_deadline") {
        GetDuration(ue, path, false, &u->healthy_deadline);
      } else if (ue.key == "progress_deadline") {
        GetDuration(ue, path, false, &u->progress_deadline);
      } else if (ue.key == "auto_rollback") {
        GetBool(ue, path, &u->auto_rollback);
      } else if (ue.key == "canary") {
        GetInt(ue, path, 1, 1'000'000, &u->canary);
      } else if (ue.key == "auto_promote") {
        GetBool(ue, path, &u->auto_promote);
      }
    }
    // Fields that mean nothing under the chosen strategy are mistakes, not silently ignored.
    const bool canary = u->strategy == Strategy::kCanary;
    const bool surges = u->strategy == Strategy::kRolling || canary;
    for (const char* k : {"canary", "auto_promote"}) {
      if (!canary && given.count(k)) {
        Add(given[k], e.value, std::string("update.") + k, "only applies to strategy canary");
      }
    }
    for (const char* k : {"max_surge", "max_unavailable"}) {
      if (!surges && given.count(k)) {
        Add(given[k], e.value, std::string("update.") + k,
            "only applies to strategies rolling and canary");
      }
    }
    if (surges && u->max_surge.value == 0 && u->max_unavailable.value == 0) {
      Add(given.count("max_surge") ? given["max_surge"] : e.value, e.value, "update.max_surge",
          "max_surge and max_unavailable cannot both be 0: the rollout could never progress");
    }
  }

  void ParseService(const YamlNode* doc) {
    if (!IsMap(doc)) {
      Add(doc, doc, "", "expected a service document (a mapping), got " + DescribeYamlNode(doc));
      return;
    }
    const size_t errors_before = file_.errors.size();
    ServiceSpec s;
    s.file = file_.path;
    std::optional<Entry> artifact, image, port, command, hosts;
    bool has_name = false, name_given = false, version_given = false;
    for (const Entry& e : Entries(doc, "", kServiceKeys)) {
      if (e.key == "name") {
        name_given = true;
        if (!GetString(e, "name", &s.name)) continue;
        if (!IsValidServiceName(s.name)) {
          Add(e.value, e.key_node, "name",
              "must be 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-', "
              "got " +
                  QuoteForError(s.name));
          continue;
        }
        has_name = true;
        s.line = e.value->line;
        s.column = e.value->column;
      } else if (e.key == "version") {
        version_given = true;
        if (!GetString(e, "version", &s.tmpl.version)) continue;
        if (s.tmpl.version.empty()) {
          Add(e.value, e.key_node, "version", "must not be empty");
        } else if (WithinBytes(e.value, e.key_node, "version", s.tmpl.version, kMaxVersionBytes) &&
                   HasControlCharacter(s.tmpl.version)) {
          Add(e.value, e.key_node, "version",
              "must not contain control characters, got " + QuoteForError(s.tmpl.version));
        }
      } else if (e.key == "replicas") {
        GetInt(e, "replicas", 0, 100'000, &s.replicas);
      } else if (e.key == "artifact") {
        artifact = e;
      } else if (e.key == "image") {
        image = e;
      } else if (e.key == "command") {
        command = e;
        GetStringList(e, "command", /*allow_empty=*/false, &s.tmpl.command);
      } else if (e.key == "env") {
        if (!IsNull(e.value)) ParseEnv(e, &s.tmpl.env);
      } else if (e.key == "port") {
        port = e;
        GetInt(e, "port", 1, 65535, &s.tmpl.port);
      } else if (e.key == "health") {
        ParseHealth(e, &s.tmpl.health);
      } else if (e.key == "update") {
        if (!IsNull(e.value)) ParseUpdate(e, &s.update);
      } else if (e.key == "history_limit") {
        GetInt(e, "history_limit", 1, 1000, &s.history_limit);
      } else if (e.key == "expose") {
        ParseExpose(e, &s);
      } else if (e.key == "hosts") {
        hosts = e;
        ParseHosts(e, &s.tmpl.hosts);
      }
    }
    if (has_name) file_.declared.push_back({s.name, s.line, s.column});
    if (!name_given) Add(doc, doc, "name", "is required");
    if (!version_given) Add(doc, doc, "version", "is required");

    if (artifact && image) {
      Add(image->key_node, doc, "image",
          "a service runs an artifact (process driver) or an image (container driver), not both");
    } else if (!artifact && !image) {
      Add(doc, doc, "",
          "a service needs an artifact (process driver) or an image (container driver)");
    } else if (image) {
      if (GetString(*image, "image", &s.tmpl.image) &&
          WithinBytes(image->value, image->key_node, "image", s.tmpl.image, kMaxImageBytes)) {
        size_t at = s.tmpl.image.find("@sha256:");
        if (at == std::string::npos || at == 0 || !IsSha256Hex(s.tmpl.image.substr(at + 8))) {
          Add(image->value, image->key_node, "image",
              "must be pinned by digest, name@sha256:<64 hex digits>, got " +
                  QuoteForError(s.tmpl.image));
        }
      }
    } else {
      if (port) {
        Add(port->key_node, doc, "port",
            "only applies to image services; process instances get {port} from kiln's port range");
      }
      if (hosts) {
        Add(hosts->key_node, doc, "hosts",
            "only applies to image services (Docker hosts); process instances run where kilnd "
            "runs");
      }
      if (!command) s.tmpl.command = {"{artifact}"};
      ParseArtifact(*artifact, &s);
    }
    if (file_.errors.size() != errors_before || suppressed_ > 0) return;
    // One bound on the whole: what a revision stores and the API sends back for it.
    const size_t template_bytes = s.tmpl.Canonical().size();
    if (template_bytes > kMaxTemplateBytes) {
      Add(doc, doc, "",
          "the service's template (version, command, env, health) is " +
              std::to_string(template_bytes) + " bytes as JSON; the limit is " +
              std::to_string(kMaxTemplateBytes));
      return;
    }
    file_.services.push_back(std::move(s));
  }

  void ParseArtifact(const Entry& e, ServiceSpec* s) {
    if (!ExpectMap(e, "artifact")) return;
    std::optional<Entry> path_entry, pin_entry;
    for (const Entry& ae : Entries(e.value, "artifact", kArtifactKeys)) {
      if (ae.key == "path") path_entry = ae;
      if (ae.key == "sha256") pin_entry = ae;
    }
    if (pin_entry && GetString(*pin_entry, "artifact.sha256", &s->artifact_pin)) {
      if (!IsSha256Hex(s->artifact_pin)) {
        Add(pin_entry->value, pin_entry->key_node, "artifact.sha256",
            "expected 64 hex digits, got " + QuoteForError(s->artifact_pin));
        return;
      }
      std::transform(s->artifact_pin.begin(), s->artifact_pin.end(), s->artifact_pin.begin(),
                     [](unsigned char c) { return std::tolower(c); });
    }
    if (!path_entry) {
      Add(e.value, e.key_node, "artifact.path", "is required");
      return;
    }
    std::string raw;
    if (!GetString(*path_entry, "artifact.path", &raw)) return;
    if (!WithinBytes(path_entry->value, path_entry->key_node, "artifact.path", raw,
                     kMaxArtifactPathBytes)) {
      return;
    }
    if (raw.empty()) {
      Add(path_entry->value, path_entry->key_node, "artifact.path", "must not be empty");
      return;
    }
    fs::path p(raw);
    if (p.is_relative()) p = fs::path(file_.path).parent_path() / p;
    s->artifact_path = p.lexically_normal().string();
    StatusOr<std::string> digest =
        hasher_ ? hasher_(s->artifact_path) : Sha256File(s->artifact_path);
    if (!digest.ok()) {
      Add(path_entry->value, path_entry->key_node, "artifact.path", digest.status().message());
      return;
    }
    if (!s->artifact_pin.empty() && *digest != s->artifact_pin) {
      Add(pin_entry->value, pin_entry->key_node, "artifact.sha256",
          "artifact " + s->artifact_path + " has sha256 " + *digest + ", the manifest pins " +
              s->artifact_pin);
      return;
    }
    s->tmpl.artifact_sha256 = *digest;
  }

  ManifestFile& file_;
  const ArtifactHasher& hasher_;
  size_t suppressed_ = 0;  // errors beyond kMaxManifestErrorsPerFile, counted only
  int suppressed_line_ = 0;
  int suppressed_column_ = 0;
};

// Line and column (in characters) of byte `offset` of `text`; everything before it is UTF-8.
std::pair<int, int> PositionOf(std::string_view text, size_t offset) {
  int line = 1, column = 1;
  for (size_t i = 0; i < offset; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n') {
      ++line;
      column = 1;
    } else if ((c & 0xC0) != 0x80) {
      ++column;
    }
  }
  return {line, column};
}

// YAML admits no control character but tab, line feed and carriage return (YAML 1.2, 5.1
// "c-printable"); a NUL in particular makes libfyaml return text from outside the input.
std::optional<size_t> FindControlCharacter(std::string_view text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7F) return i;
  }
  return std::nullopt;
}

// Checks what the YAML parser must never see (too many bytes, bytes that are not UTF-8, control
// characters) before parsing, so a bad byte is reported at its place instead of escaping into
// JSON later.
void ParseInto(ManifestFile& file, std::string_view text, const ArtifactHasher& hasher) {
  file.sha256 = Sha256Hex(text);
  if (text.size() > kMaxManifestFileBytes) {
    file.errors.push_back({file.path, 0, 0, "",
                           "is " + std::to_string(text.size()) +
                               " bytes; a manifest file is limited to " +
                               std::to_string(kMaxManifestFileBytes) + " bytes (1 MiB)"});
    return;
  }
  static constexpr char kHex[] = "0123456789ABCDEF";
  if (std::optional<size_t> bad = FindInvalidUtf8(text)) {
    const auto [line, column] = PositionOf(text, *bad);
    const auto b = static_cast<unsigned char>(text[*bad]);
    file.errors.push_back({file.path, line, column, "",
                           std::string("invalid UTF-8: byte 0x") + kHex[b >> 4] + kHex[b & 0xF] +
                               " is not part of a valid character; manifests are UTF-8 text"});
    return;
  }
  if (std::optional<size_t> bad = FindControlCharacter(text)) {
    const auto [line, column] = PositionOf(text, *bad);
    const auto b = static_cast<unsigned char>(text[*bad]);
    file.errors.push_back({file.path, line, column, "",
                           std::string("control character 0x") + kHex[b >> 4] + kHex[b & 0xF] +
                               " is not allowed in YAML; write it as an escape (\\x" +
                               kHex[b >> 4] + kHex[b & 0xF] + ") inside a double-quoted string"});
    return;
  }
  FileParser parser(file, hasher);
  parser.ParseText(text);
  parser.Finish();
}

}  // namespace

int CountOrPercent::Resolve(int replicas, bool round_up) const {
  if (!percent) return value;
  const int64_t scaled = static_cast<int64_t>(value) * replicas;
  return static_cast<int>(round_up ? (scaled + 99) / 100 : scaled / 100);
}

std::string CountOrPercent::ToString() const {
  return std::to_string(value) + (percent ? "%" : "");
}

std::string_view StrategyName(Strategy s) {
  switch (s) {
    case Strategy::kRolling:
      return "rolling";
    case Strategy::kRecreate:
      return "recreate";
    case Strategy::kBlueGreen:
      return "blue-green";
    case Strategy::kCanary:
      return "canary";
  }
  return "rolling";
}

std::optional<Strategy> ParseStrategy(std::string_view name) {
  for (Strategy s :
       {Strategy::kRolling, Strategy::kRecreate, Strategy::kBlueGreen, Strategy::kCanary}) {
    if (StrategyName(s) == name) return s;
  }
  return std::nullopt;
}

std::string ServiceSpecToJson(const ServiceSpec& s) {
  const UpdatePolicy& u = s.update;
  nlohmann::json j = {
      {"name", s.name},
      {"replicas", s.replicas},
      {"artifact_path", s.artifact_path},
      {"artifact_pin", s.artifact_pin},
      {"template", nlohmann::json::parse(s.tmpl.Canonical())},
      {"update",
       {{"strategy", StrategyName(u.strategy)},
        {"max_surge", u.max_surge.ToString()},
        {"max_unavailable", u.max_unavailable.ToString()},
        {"min_healthy_time_ms", u.min_healthy_time.count()},
        {"healthy_deadline_ms", u.healthy_deadline.count()},
        {"progress_deadline_ms", u.progress_deadline.count()},
        {"auto_rollback", u.auto_rollback},
        {"canary", u.canary},
        {"auto_promote", u.auto_promote}}},
      {"history_limit", s.history_limit},
      {"expose", s.expose ? nlohmann::json{{"listen_host", s.expose->listen_host},
                                           {"port", s.expose->port},
                                           {"drain_ms", s.expose->drain.count()},
                                           {"line", s.expose->line},
                                           {"column", s.expose->column}}
                          : nlohmann::json(nullptr)},
      {"file", s.file},
      {"line", s.line},
      {"column", s.column},
  };
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

StatusOr<ServiceSpec> ServiceSpecFromJson(std::string_view text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return DataLossError("stored spec is not valid JSON");
  try {
    ServiceSpec s;
    s.name = j.at("name").get<std::string>();
    s.replicas = j.at("replicas").get<int>();
    s.artifact_path = j.at("artifact_path").get<std::string>();
    s.artifact_pin = j.at("artifact_pin").get<std::string>();
    ASSIGN_OR_RETURN(s.tmpl, Template::FromCanonical(j.at("template").dump()));
    const auto& u = j.at("update");
    std::string strategy = u.at("strategy").get<std::string>();
    if (std::optional<Strategy> st = ParseStrategy(strategy)) s.update.strategy = *st;
    auto count = [](const std::string& t) {
      bool pct = !t.empty() && t.back() == '%';
      return CountOrPercent{std::atoi(t.c_str()), pct};
    };
    s.update.max_surge = count(u.at("max_surge").get<std::string>());
    s.update.max_unavailable = count(u.at("max_unavailable").get<std::string>());
    s.update.min_healthy_time = Duration(u.at("min_healthy_time_ms").get<int64_t>());
    s.update.healthy_deadline = Duration(u.at("healthy_deadline_ms").get<int64_t>());
    s.update.progress_deadline = Duration(u.at("progress_deadline_ms").get<int64_t>());
    s.update.auto_rollback = u.at("auto_rollback").get<bool>();
    s.update.canary = u.at("canary").get<int>();
    s.update.auto_promote = u.at("auto_promote").get<bool>();
    s.history_limit = j.at("history_limit").get<int>();
    // Specs stored before `expose` existed have no key.
    if (auto x = j.find("expose"); x != j.end() && x->is_object()) {
      ExposeSpec e;
      e.listen_host = x->at("listen_host").get<std::string>();
      e.port = x->at("port").get<int>();
      e.drain = Duration(x->at("drain_ms").get<int64_t>());
      e.line = x->at("line").get<int>();
      e.column = x->at("column").get<int>();
      s.expose = e;
    }
    s.file = j.at("file").get<std::string>();
    s.line = j.at("line").get<int>();
    s.column = j.at("column").get<int>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    return DataLossError(std::string("stored spec is malformed: ") + e.what());
  }
}

std::string ManifestError::ToString() const {
  std::string out = file;
  if (line > 0) out += ":" + std::to_string(line) + ":" + std::to_string(column);
  out += ": ";
  if (!key_path.empty()) out += key_path + ": ";
  out += message;
  return out;
}

bool ManifestSet::ok() const {
  if (!dir_errors.empty()) return false;
  return std::all_of(files.begin(), files.end(), [](const ManifestFile& f) { return f.ok(); });
}

std::vector<ManifestError> ManifestSet::AllErrors() const {
  std::vector<ManifestError> out = dir_errors;
  for (const ManifestFile& f : files) out.insert(out.end(), f.errors.begin(), f.errors.end());
  return out;
}

std::vector<const ServiceSpec*> ManifestSet::Services() const {
  std::vector<const ServiceSpec*> out;
  for (const ManifestFile& f : files) {
    for (const ServiceSpec& s : f.services) out.push_back(&s);
  }
  std::sort(out.begin(), out.end(),
            [](const ServiceSpec* a, const ServiceSpec* b) { return a->name < b->name; });
  return out;
}

bool IsManifestFileName(std::string_view name) {
  if (name.empty() || name.front() == '.' || name.front() == '#') return false;
  auto ends_with = [&](std::string_view suffix) {
    return name.size() > suffix.size() && name.substr(name.size() - suffix.size()) == suffix;
  };
  return ends_with(".yaml") || ends_with(".yml");
}

ManifestFile ParseManifest(const std::string& path, const std::string& text,
                           const ArtifactHasher& hasher) {
  ManifestFile file;
  file.path = path;
  ParseInto(file, text, hasher);
  if (!file.ok()) file.services.clear();
  return file;
}

namespace {

// A file with an error applies none of its services; its errors are listed in file order.
void SortErrorsAndDropBroken(ManifestSet& set) {
  for (ManifestFile& f : set.files) {
    if (!f.ok()) f.services.clear();
    std::sort(f.errors.begin(), f.errors.end(), [](const ManifestError& a, const ManifestError& b) {
      return std::tie(a.line, a.column) < std::tie(b.line, b.column);
    });
  }
}

}  // namespace

namespace {
// Checks that span files (a name or an address declared twice), then drops the services of
// every file with an error.
void CheckAcrossFiles(ManifestSet& set);
}  // namespace

ManifestSet LoadManifestDir(const fs::path& dir, const ArtifactHasher& hasher) {
  ManifestSet set;
  set.dir = dir.string();
  auto dir_error = [&](std::string message) {
    set.dir_errors.push_back({set.dir, 0, 0, "", std::move(message)});
  };
  // Paths end up in errors, events and stored specs, all of which are JSON: they must be text.
  if (!IsValidUtf8(set.dir)) {
    set.dir = SanitizeUtf8(set.dir);
    dir_error("the directory's path is not valid UTF-8");
    return set;
  }
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    dir_error(ec ? "cannot read manifest directory: " + ec.message()
                 : "manifest directory does not exist");
    return set;
  }
  if (!fs::is_directory(dir, ec)) {
    dir_error("is not a directory");
    return set;
  }
  std::vector<fs::path> paths;
  fs::directory_iterator it(dir, ec), end;
  if (ec) {
    dir_error("cannot read manifest directory: " + ec.message());
    return set;
  }
  for (; it != end; it.increment(ec)) {
    if (ec) break;
    if (IsManifestFileName(it->path().filename().string())) paths.push_back(it->path());
  }
  if (ec) {
    dir_error("cannot read manifest directory: " + ec.message());
    return set;
  }
  std::sort(paths.begin(), paths.end());

  for (const fs::path& p : paths) {
    ManifestFile file;
    file.path = p.string();
    if (!IsValidUtf8(file.path)) {
      file.path = SanitizeUtf8(file.path);
      file.errors.push_back({file.path, 0, 0, "", "the file name is not valid UTF-8; rename it"});
      set.files.push_back(std::move(file));
      continue;
    }
    // Only regular files are read, and only up to the size limit (a FIFO would block).
    StatusOr<std::string> text = ReadRegularFile(p, kMaxManifestFileBytes, "cannot read");
    if (!text.ok()) {
      file.errors.push_back({file.path, 0, 0, "", text.status().message()});
    } else {
      ParseInto(file, *text, hasher);
    }
    set.files.push_back(std::move(file));
  }
  CheckAcrossFiles(set);
  return set;
}

ManifestSet ParseManifestFiles(std::string dir, const std::vector<ManifestText>& files,
                               const ArtifactHasher& hasher) {
  ManifestSet set;
  set.dir = std::move(dir);
  for (const ManifestText& f : files) {
    ManifestFile file;
    file.path = f.path;
    if (!IsValidUtf8(file.path)) {
      file.path = SanitizeUtf8(file.path);
      file.errors.push_back({file.path, 0, 0, "", "the file name is not valid UTF-8; rename it"});
    } else {
      ParseInto(file, f.text, hasher);
    }
    set.files.push_back(std::move(file));
  }
  std::sort(set.files.begin(), set.files.end(),
            [](const ManifestFile& a, const ManifestFile& b) { return a.path < b.path; });
  CheckAcrossFiles(set);
  return set;
}

namespace {

void CheckAcrossFiles(ManifestSet& set) {
  // A name declared twice is an error at every place it is declared.
  struct Place {
    size_t file;
    ManifestFile::Declared decl;
  };
  std::map<std::string, std::vector<Place>> places;
  for (size_t i = 0; i < set.files.size(); ++i) {
    for (const auto& d : set.files[i].declared) places[d.name].push_back({i, d});
  }
  for (const auto& [name, where] : places) {
    if (where.size() < 2) continue;
    for (const Place& here : where) {
      std::string others;
      for (const Place& other : where) {
        if (&other == &here) continue;
        if (!others.empty()) others += ", ";
        others += set.files[other.file].path + ":" + std::to_string(other.decl.line) + ":" +
                  std::to_string(other.decl.column);
      }
      set.files[here.file].errors.push_back(
          {set.files[here.file].path, here.decl.line, here.decl.column, "name",
           "service " + QuoteForError(name) + " is also declared at " + others});
    }
  }
  // One address, one service: two services exposed on the same port (on the same address, or
  // one of them on every address) is an error at both places.
  struct Exposed {
    size_t file;
    const ServiceSpec* spec;
  };
  std::vector<Exposed> exposed;
  for (size_t i = 0; i < set.files.size(); ++i) {
    for (const ServiceSpec& s : set.files[i].services) {
      if (s.expose) exposed.push_back({i, &s});
    }
  }
  auto any = [](const std::string& host) { return host == "0.0.0.0" || host == "::"; };
  for (const Exposed& here : exposed) {
    const ExposeSpec& a = *here.spec->expose;
    for (const Exposed& other : exposed) {
      const ExposeSpec& b = *other.spec->expose;
      if (&other == &here || a.port != b.port ||
          !(a.listen_host == b.listen_host || any(a.listen_host) || any(b.listen_host))) {
        continue;
      }
      set.files[here.file].errors.push_back(
          {set.files[here.file].path, a.line, a.column, "expose",
           "port " + std::to_string(a.port) + " is also exposed by service " +
               QuoteForError(other.spec->name) + " at " + set.files[other.file].path + ":" +
               std::to_string(b.line) + ":" + std::to_string(b.column)});
    }
  }
  SortErrorsAndDropBroken(set);
}

}  // namespace

void RejectExposedPortsIn(ManifestSet& set, int first, int last) {
  for (ManifestFile& f : set.files) {
    for (const ServiceSpec& s : f.services) {
      if (!s.expose || s.expose->port < first || s.expose->port > last) continue;
      f.errors.push_back({f.path, s.expose->line, s.expose->column, "expose",
                          "port " + std::to_string(s.expose->port) +
                              " is in kilnd's --port-range " + std::to_string(first) + "-" +
                              std::to_string(last) +
                              ", where instances get their ports; pick one outside it"});
    }
  }
  SortErrorsAndDropBroken(set);
}

}  // namespace kiln
