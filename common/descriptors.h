#pragma once

// Descriptor hygiene for kilnd: nothing it opens may leak into the instances it spawns, and a
// flood of connections must meet the hard descriptor limit, not a low soft one.

#include <cstdint>

#include "common/status.h"

namespace kiln {

// Marks `fd` close-on-exec. For descriptors made by libraries that do not ask for O_CLOEXEC
// themselves (Boost.Asio 1.74 opens sockets and accepts without SOCK_CLOEXEC).
// REQUIRES: called on the thread that spawns processes, before it next spawns; otherwise a
// spawn in between could inherit the descriptor.
Status SetCloseOnExec(int fd);

// Marks every descriptor above 2 close-on-exec: those kilnd inherited from whatever started it
// (a shell's, a supervisor's, a build tool's) are not kilnd's to pass on to its instances.
// REQUIRES: called at start, before any thread that opens descriptors.
Status MarkInheritedCloseOnExec();

// True when `fd` is open and close-on-exec.
bool IsCloseOnExec(int fd);

struct NofileLimit {
  uint64_t soft_before = 0;  // the soft RLIMIT_NOFILE kilnd was started with
  uint64_t soft = 0;         // the soft limit now
  uint64_t hard = 0;
};

// Raises the soft RLIMIT_NOFILE to the hard limit (the soft default of 1024 is what a shell
// gives; the hard limit is what the administrator allows).
StatusOr<NofileLimit> RaiseNofileLimit();

}  // namespace kiln
