#pragma once

// Starting an instance's process: a new session, the default signal state, stdin from /dev/null,
// stdout and stderr appended to its log, and no other descriptor of kilnd's (whatever kilnd or a
// library it links left without close-on-exec).

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace kiln {

struct SpawnRequest {
  std::string path;               // what to execute: absolute or relative to the working dir
  std::vector<std::string> argv;  // argv[0] first
  std::vector<std::string> env;   // "KEY=value", the whole environment
  std::filesystem::path log;      // stdout and stderr, appended
  // When >= 0, a cgroup v2 directory: the process is created in it (clone3 CLONE_INTO_CGROUP),
  // so even what it forks in its first instruction is in it.
  int cgroup_fd = -1;
  // When > 0, the soft RLIMIT_NOFILE the process gets (kilnd raises its own to the hard limit;
  // programs written for the usual 1024, select() users among them, get what they were started
  // with before). 0: inherit kilnd's.
  uint64_t nofile_soft = 0;
};

struct Spawned {
  pid_t pid = -1;
  UniqueFd pidfd;  // refers to this very process
};

// Starts the process; returns once it has exec'd. The error names the cause ("cannot execute
// PATH: No such file or directory"); nothing is left running on error. UNIMPLEMENTED when
// cgroup_fd is given but the kernel (or a seccomp filter) refuses clone3: the caller may retry
// without a cgroup.
StatusOr<Spawned> SpawnProcess(const SpawnRequest& request);

// The executable `name` names: itself when it holds a '/', else the first executable file of that
// name in `search_path` (a PATH value), like execvp. NOT_FOUND (or the error of the last
// candidate that exists but cannot run) when there is none.
StatusOr<std::string> FindExecutable(const std::string& name, const std::string& search_path);

}  // namespace kiln
