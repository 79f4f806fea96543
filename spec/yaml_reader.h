#pragma once

// A bounded YAML reader for manifests, over libfyaml's event parser (YAML 1.2; it passes the
// YAML test suite). It builds a small read-only tree with positions and enforces the limits the
// manifest loader needs against hostile input: nesting depth, scalar length and the number of
// nodes counting every alias as a full copy (alias bombs). Aliases are resolved by sharing,
// never by copying, and may only refer to a node that is complete, so the tree has no cycles.
//
// yaml-cpp 0.7 (Debian 12) was replaced because a file holding the single byte "," made it
// loop allocating until bad_alloc (yaml-cpp issue #1040), which no pre-scan can rule out.

#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kiln {

struct YamlNode {
  enum class Kind { kNull, kScalar, kSequence, kMapping };
  Kind kind = Kind::kNull;
  std::string text;    // a scalar's value; also the spelling of a null ("", "~", "null")
  bool plain = false;  // a scalar written without quotes, block style or tag: may be a number
  int line = 0;        // 1-based; 0 when the node has no place in the text (an empty value)
  int column = 0;      // 1-based, in characters
  std::vector<const YamlNode*> items;                                // kSequence
  std::vector<std::pair<const YamlNode*, const YamlNode*>> entries;  // kMapping, in order,
                                                                     // duplicate keys kept
};

struct YamlLimits {
  int max_depth = 32;
  size_t max_scalar_bytes = 64 << 10;
  size_t max_nodes = 100'000;  // aliases count as copies of what they refer to
};

struct YamlError {
  int line = 0;  // 1-based; 0 when not known
  int column = 0;
  std::string message;
};

struct YamlStream {
  std::deque<YamlNode> nodes;              // owns every node; stable addresses
  std::vector<const YamlNode*> documents;  // one root per document, in order
  std::optional<YamlError> error;          // the first error; parsing stops there
};

// Parses every document of `text`. REQUIRES: `text` is valid UTF-8 (the caller reports bad
// bytes with their position first).
YamlStream ParseYaml(std::string_view text, const YamlLimits& limits);

// A value quoted for an error message: control characters escaped (messages reach terminals) and
// long values cut, so an error never carries a megabyte of someone's file.
std::string QuoteForError(std::string_view s);
// How a node reads in an error: "a mapping", "a list", "nothing", or its quoted text.
std::string DescribeYamlNode(const YamlNode* n);

}  // namespace kiln
