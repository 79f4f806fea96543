#pragma once

// `kilnctl logs`: an instance's output, or a service's instances' interleaved, over StreamLogs.

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>

#include "common/duration.h"
#include "kiln/v1/kiln.grpc.pb.h"

namespace kiln {

struct LogsOptions {
  std::string name;  // an instance id or a service name
  bool follow = false;
  int64_t tail = 0;      // 0: every line kept
  Duration since{0};     // 0: no limit
  int64_t revision = 0;  // 0: every revision
  std::string addr;      // kilnd's address, for messages
};

// Prints each line as the instance wrote it; a service's lines are prefixed "INSTANCE | ".
// Returns 0, or 1 with the reason on `err` when the call fails. `prepare` sets the call's
// credentials (no deadline: a followed stream lasts until kilnctl is stopped).
int ShowLogs(kiln::v1::Kiln::Stub& stub, const std::function<void(grpc::ClientContext&)>& prepare,
             const LogsOptions& options, std::ostream& out, std::ostream& err);

}  // namespace kiln
