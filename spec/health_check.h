#pragma once

// What a health check is: part of a template (controller/template.h) and what the prober runs.

#include <string>
#include <vector>

#include "common/clock.h"

namespace kiln {

enum class ProbeKind { kNone, kHttp, kTcp, kExec };

struct HealthCheck {
  ProbeKind kind = ProbeKind::kNone;  // kNone: healthy as soon as it runs
  std::string http_path;              // kHttp
  int port = 0;                       // kHttp, kTcp: 0 = the instance's own port
  std::vector<std::string> exec;      // kExec
  Duration interval{1000};
  Duration timeout{1000};
  int failure_threshold = 3;

  friend bool operator==(const HealthCheck&, const HealthCheck&) = default;
};

}  // namespace kiln
