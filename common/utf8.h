#pragma once

// UTF-8 checks for text from outside (manifests, file names): nlohmann::json refuses to dump
// invalid UTF-8 (it throws), and terminals and JSON clients deserve well-formed text.

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace kiln {

// The offset of the first byte that does not begin or continue a well-formed UTF-8 sequence
// (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF), or nullopt when `s` is
// valid throughout.
std::optional<size_t> FindInvalidUtf8(std::string_view s);
inline bool IsValidUtf8(std::string_view s) { return !FindInvalidUtf8(s).has_value(); }

// `s` with every byte that is not part of valid UTF-8 replaced by U+FFFD, for messages that
// must name something (a file name) whose bytes may not be text.
std::string SanitizeUtf8(std::string_view s);

// The longest prefix of `s` of at most `max_bytes` that does not split a UTF-8 sequence.
// REQUIRES: `s` is valid UTF-8.
std::string_view TruncateUtf8(std::string_view s, size_t max_bytes);

}  // namespace kiln
