#pragma once

#include <set>

#include "common/status.h"

namespace kiln {

// Hands out ports from [first, last] so that no two live instances share one. A port that
// something else is listening on (a bind to it fails) is skipped. Allocation goes round the range
// rather than reusing the lowest free port, so a just-released port rests before its next use.
// Not thread-safe: used on the driver's io_context.
class PortAllocator {
 public:
  PortAllocator(int first, int last);

  // RESOURCE_EXHAUSTED when every port of the range is taken.
  StatusOr<int> Allocate();
  // Marks a port as taken (an adopted instance's).
  void Reserve(int port) { used_.insert(port); }
  void Release(int port) { used_.erase(port); }
  size_t InUse() const { return used_.size(); }

 private:
  int first_, last_, next_;
  std::set<int> used_;
};

// Whether a TCP port on this host can be bound right now (nothing listens on it).
bool PortIsFree(int port);

}  // namespace kiln
