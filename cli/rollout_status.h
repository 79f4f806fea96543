#pragma once

// `kilnctl rollout status` and every `--wait`: follows one rollout until it is over and says how
// it ended, in its exit code and on stderr.

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>

#include "common/duration.h"
#include "kiln/v1/kiln.grpc.pb.h"

namespace kiln {

// Exit codes of a rollout wait (1 and 2 keep kilnctl's meaning: a refused call, bad usage).
inline constexpr int kRolloutCompleted = 0;   // every replica of the revision is available
inline constexpr int kRolloutCallFailed = 1;  // unknown service, permission denied, ...
inline constexpr int kRolloutFailed = 3;      // a deadline passed or instances cannot start
                                              // (an automatic rollback may have followed)
inline constexpr int kRolloutAbandoned = 4;   // the target moved away before it completed: a
                                              // rollback, an unpin or a newer manifest revision
inline constexpr int kRolloutTimedOut = 5;    // --timeout passed first (also while kilnd was down)

struct RolloutWaitOptions {
  std::string service;
  // The revision whose rollout to follow; 0: the service's target once kilnd has loaded what its
  // manifest file declares now (so a wait right after a manifest edit follows the new revision).
  int64_t revision = 0;
  Duration timeout{0};  // 0: no limit
  std::string addr;     // kilnd's address, for messages
  // Per-call deadline while kilnd answers (kilnctl's --timeout).
  Duration call_timeout{10'000};
};

// Sets the deadline and credentials of one call.
using PrepareCall = std::function<void(grpc::ClientContext&, Duration deadline)>;

// Polls GetService (a poll survives a kilnd restart: each is a new call), printing a progress
// line to `out` each time the progress changes, until the rollout is over; returns one of the
// codes above, with the reason on `err`. While kilnd cannot be reached the wait retries, says
// so once on `err`, and keeps counting toward the timeout.
int WaitForRollout(kiln::v1::Kiln::Stub& stub, const PrepareCall& prepare,
                   const RolloutWaitOptions& options, std::ostream& out, std::ostream& err);

}  // namespace kiln
