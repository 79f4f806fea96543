#pragma once

#include <string>
#include <string_view>

#include "common/clock.h"
#include "common/status.h"

namespace kiln {

// Parses "500ms", "2s", "10m", "1h", "1m30s" (units ms, s, m, h; integer amounts).
StatusOr<Duration> ParseDuration(std::string_view text);

// The shortest form ParseDuration reads back to the same value: "500ms", "2s", "1m30s", "0s".
std::string FormatDuration(Duration d);

}  // namespace kiln
