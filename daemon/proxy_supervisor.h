#pragma once

// Keeps one long-lived helper process (kiln-proxy, the data plane) running for kilnd, and lets it
// outlive kilnd: the process runs in its own session, is recorded in a pidfile, and a later kilnd
// adopts it instead of starting a second one. Destroying the supervisor (kilnd stopping or
// crashing) leaves the process running and the pidfile in place: kilnd down never means service
// down. Generic over the program: tests supervise kiln-testsvc or /bin/sleep.

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class TimeSource;

// What kilnd shows in status and metrics.
struct SupervisorStatus {
  bool wanted = false;
  bool running = false;         // a process is up and watched (also while it is being stopped)
  pid_t pid = 0;                // when running
  int64_t started_unix_ms = 0;  // when running: when the process started (adopted: from /proc)
  bool adopted = false;         // when running: found running from an earlier supervisor
  // When adopted: it runs a binary that has since been replaced (an upgrade); a new process
  // would run the new one.
  bool binary_replaced = false;
  int64_t restarts = 0;          // starts after an unexpected exit or a failed start
  std::string last_exit;         // how the last process ended ("exited with code 1", ...), or ""
  std::string error;             // why the last start failed ("cannot execute ..."), or ""
  int64_t restart_delay_ms = 0;  // while waiting to restart: the back-off being waited
};

class ProxySupervisor {
 public:
  struct Options {
    std::filesystem::path binary;   // what to run (absolute)
    std::vector<std::string> args;  // after argv[0] (argv[0] is the binary's path)
    // The whole environment, "KEY=value"; nullopt: kilnd's own.
    std::optional<std::vector<std::string>> env;
    // Holds the pidfile ("pid": "PID STARTTIME\n") and, by default, the log. Made when needed.
    std::filesystem::path state_dir;
    std::filesystem::path log_path;  // stdout and stderr, appended; empty: STATE_DIR/output.log
    Duration stop_grace = std::chrono::seconds(5);  // SIGTERM, then SIGKILL after this long
    // Restart back-off: starts at `backoff_initial`, doubles up to `backoff_max` after each
    // exit or failed start, and starts over once a process has run `backoff_reset_after`.
    Duration backoff_initial = std::chrono::seconds(1);
    Duration backoff_max = std::chrono::seconds(30);
    Duration backoff_reset_after = std::chrono::seconds(60);
    TimeSource* time = nullptr;       // clocks and timers; nullptr: the system's
    std::string name = "kiln-proxy";  // in log lines
  };

  // REQUIRES: used on the io_context's thread only (like the rest of kilnd's controller state).
  ProxySupervisor(boost::asio::io_context& io, Options options);
  // Stops watching. The process keeps running and the pidfile stays: the next supervisor with
  // the same state dir adopts it.
  ~ProxySupervisor();
  ProxySupervisor(const ProxySupervisor&) = delete;
  ProxySupervisor& operator=(const ProxySupervisor&) = delete;

  // Wanted: adopt the process the pidfile names when it is the same process (pid, start time,
  // and /proc/PID/exe is the binary, or the binary deleted by an upgrade), else start one and
  // record it; restart it with back-off whenever it exits. Every process started carries
  // KILN_SUPERVISOR_STATE=<state dir> in its environment, so that one the pidfile does not name
  // (kilnd crashed before writing it) is adopted too rather than run beside a second one.
  // Not wanted: stop it (SIGTERM, SIGKILL after the grace period), also one left by an earlier
  // supervisor, and remove the pidfile. Idempotent: kilnd calls it after every manifest load.
  void SetWanted(bool wanted);

  // On the io_context's thread, like everything else here: kilnd copies it into what it
  // publishes for the HTTP and API threads.
  SupervisorStatus Status() const;

  std::filesystem::path PidfilePath() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln
