#include "common/duration.h"

#include <cctype>

namespace kiln {

StatusOr<Duration> ParseDuration(std::string_view text) {
  auto bad = [&] {
    return InvalidArgumentError("expected a duration like 500ms, 2s or 10m, got \"" +
                                std::string(text) + "\"");
  };
  if (text.empty()) return bad();
  int64_t total_ms = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (!std::isdigit(static_cast<unsigned char>(text[i]))) return bad();
    int64_t amount = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
      amount = amount * 10 + (text[i] - '0');
      if (amount > 1'000'000'000) return bad();
      ++i;
    }
    size_t unit_start = i;
    while (i < text.size() && std::isalpha(static_cast<unsigned char>(text[i]))) ++i;
    std::string_view unit = text.substr(unit_start, i - unit_start);
    int64_t scale;
    if (unit == "ms")
      scale = 1;
    else if (unit == "s")
      scale = 1000;
    else if (unit == "m")
      scale = 60'000;
    else if (unit == "h")
      scale = 3'600'000;
    else
      return bad();
    total_ms += amount * scale;
  }
  return Duration(total_ms);
}

std::string FormatDuration(Duration d) {
  int64_t ms = d.count();
  if (ms == 0) return "0s";
  std::string out;
  if (ms < 0) {
    out = "-";
    ms = -ms;
  }
  const int64_t h = ms / 3'600'000, m = ms / 60'000 % 60, s = ms / 1000 % 60, rest = ms % 1000;
  if (h) out += std::to_string(h) + "h";
  if (m) out += std::to_string(m) + "m";
  if (s) out += std::to_string(s) + "s";
  if (rest) out += std::to_string(rest) + "ms";
  return out;
}

}  // namespace kiln
