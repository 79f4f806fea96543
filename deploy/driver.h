#pragma once

// The driver interface (DESIGN.md "Drivers"): how instances really start, run and die.
// Asynchronous on the Asio io_context the driver was made with; every callback runs there.

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/status.h"

namespace kiln {

// What to run: one instance of one revision.
struct InstanceSpec {
  std::string instance;  // "web-42": unique, never reused
  std::string service;
  int64_t revision = 0;
  std::string artifact_sha256;       // process driver: runs STATE/artifacts/sha256/<hex>
  std::string image;                 // container driver
  std::vector<std::string> command;  // {artifact}, {port}, {instance}, {service}, {revision} expand
  std::map<std::string, std::string> env;
  int container_port = 0;
  // Container driver: the hosts (--docker-host names) it may be placed on; empty: any.
  std::vector<std::string> hosts;
};

// How the driver finds a running instance again, also after kilnd restarts.
// An instance is its leader (the process or container the driver started) and everything that
// leader started. The instance ends when its leader ends: the driver then ends the rest too.
// Until that is done, what the leader left behind still counts as the instance's (IsRunning, List,
// Stop), but it is no longer an instance one may adopt.
struct InstanceHandle {
  std::string instance;
  // Driver-specific and opaque to callers; names the leader. For the process driver
  // "pid:<pid>:<start time>", and "pid:0:0" from List() for an instance whose leader is gone.
  std::string id;
  std::string host;
  int port = 0;
  // The leader's process id, for callers to show (never to find the instance by: pids are
  // reused). 0 when the driver does not run processes or the leader is gone.
  int64_t pid = 0;
};

// How an instance ended.
struct ExitInfo {
  std::string instance;
  std::optional<int> exit_code;  // exited by itself with this code
  std::optional<int> signal;     // killed by this signal
  bool status_known = true;      // false for adopted processes: they were not our children
  // What else the driver knows of the end, named in Describe: "OOMKilled" (the Docker driver:
  // the engine says the kernel killed it for memory).
  std::string detail;
  // Not an end the driver saw: the instance can no longer be reached (its Docker host is down)
  // and is given up. `detail` says why. Recorded as lost, not as a failure of the service.
  bool lost = false;

  // "lost: <detail>",
  // "exited with code 3", "killed by SIGKILL", "exited (status unknown: adopted)",
  // "exited with code 137 (OOMKilled)".
  std::string Describe() const;
};

// An instance found running with kiln's identity.
struct RunningInstance {
  InstanceHandle handle;
  std::string service;
  int64_t revision = 0;
};

class Driver {
 public:
  using ExitFn = std::function<void(const ExitInfo&)>;
  using StartFn = std::function<void(StatusOr<InstanceHandle>)>;
  using StopFn = std::function<void(StatusOr<ExitInfo>)>;

  virtual ~Driver() = default;

  // Exits that nobody asked for (crashes, exits by themselves) of started or adopted instances,
  // each reported once. Exits caused by Stop are reported to Stop's callback instead.
  virtual void SetExitCallback(ExitFn fn) = 0;

  // Starts an instance. On error nothing of it is left running and the message names the
  // instance and the cause. INVALID_ARGUMENT means the same spec can never start on this driver
  // (executable missing or not executable, no artifact for the process driver): retrying cannot
  // help. Any other code may succeed on a later try.
  virtual void Start(const InstanceSpec& spec, StartFn done) = 0;

  // Asks every process of the instance to stop (SIGTERM), forces what remains after `grace`
  // (SIGKILL), and reports how the leader ended once no process of the instance remains.
  // Stopping an instance that is already gone reports success with what is known; stopping one
  // whose leader is gone ends what it left behind.
  virtual void Stop(const InstanceHandle& handle, Duration grace, StopFn done) = 0;

  // Whether any process of the instance remains: its leader (never a process that merely reuses
  // the handle's pid), or what the leader left behind. True means a Stop has work to do.
  virtual StatusOr<bool> IsRunning(const InstanceHandle& handle) = 0;

  // Every instance with any process running under this controller's identity, known to the store
  // or not, each once, with its leader's handle (see InstanceHandle for one whose leader is gone).
  virtual StatusOr<std::vector<RunningInstance>> List() = 0;

  // Takes over watching an instance started by an earlier kilnd. NOT_FOUND when its leader is
  // gone (or the handle's pid belongs to another process now); whatever that leader left
  // behind is then being killed, and no exit is reported for it.
  virtual Status Adopt(const InstanceHandle& handle) = 0;

  // The instance is over and its row is gone (history pruned): drop what the driver still keeps
  // of it (the process driver: its log files). Nothing by default.
  virtual void Discard(const std::string& instance) { (void)instance; }
};

}  // namespace kiln
