#pragma once

// Reading /proc: what the process driver needs to recognise a process again.

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace kiln::proc {

// Reads a small file (of /proc, /sys) whole; nullopt when it is gone or cannot be read.
std::optional<std::string> ReadSmallFile(const std::string& path);

struct Stat {
  char state = '?';  // R, S, D, Z, ...
  pid_t ppid = 0;
  pid_t pgrp = 0;
  pid_t session = 0;
  uint64_t start_time = 0;  // clock ticks after boot: with the pid, identifies a process
};

// Parses /proc/PID/stat. NOT_FOUND when there is no such process.
StatusOr<Stat> ReadStat(pid_t pid);

// The initial environment of a process (/proc/PID/environ). Empty when unreadable.
std::map<std::string, std::string> ReadEnviron(pid_t pid);

// Every pid in /proc.
std::vector<pid_t> ListPids();

// The process's cgroup v2 path relative to the v2 hierarchy's root, as /proc/PID/cgroup's
// "0::" line shows it ("/" for the root). NOT_FOUND when the process is gone or in no v2 cgroup.
StatusOr<std::string> ReadCgroupV2(pid_t pid);

// Whether the process named by the pid and start time is still running: same start time and not
// a zombie (a zombie has exited; only its parent's wait is missing).
bool IsAlive(pid_t pid, uint64_t start_time);

// pidfd_open(2): a file descriptor that refers to this very process (not to whatever reuses its
// pid later), readable once it exits. -1 with errno set on failure. (glibc 2.36's <sys/pidfd.h>
// lacks C linkage for C++, hence the syscall.)
int PidfdOpen(pid_t pid);

}  // namespace kiln::proc
