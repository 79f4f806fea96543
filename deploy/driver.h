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
  std::string artifact_sha256;  // process driver: runs STATE/artifacts/sha256/<hex>
  std::string image;            // container driver
  std::vector<std::string> command;  // {artifact}, {port}, {instance}, {service}, {revision} expand
  std::map<std::string, std::string> env;
  int container_port = 0;
};

// How the driver finds a running instance again, also after kilnd restarts.
struct InstanceHandle {
  std::string instance;
  std::string id;  // driver-specific and opaque to callers: "pid:<pid>:<start time>" for process
  std::string host;
  int port = 0;
};

// How an instance ended.
struct ExitInfo {
  std::string instance;
  std::optional<int> exit_code;  // exited by itself with this code
  std::optional<int> signal;     // killed by this signal
  bool status_known = true;      // false for adopted processes: they were not our children

  // "exited with code 3", "killed by SIGKILL", "exited (status unknown: adopted)".
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
  // instance and the cause.
  virtual void Start(const InstanceSpec& spec, StartFn done) = 0;

  // Asks the instance to stop (SIGTERM), forces it after `grace` (SIGKILL), reports how it ended.
  // Stopping an instance that is already gone reports success with what is known.
  virtual void Stop(const InstanceHandle& handle, Duration grace, StopFn done) = 0;

  // Whether the instance behind the handle is still running (false once it exited, or when the
  // handle's process was replaced by another one).
  virtual StatusOr<bool> IsRunning(const InstanceHandle& handle) = 0;

  // Everything running with this controller's identity, known to the store or not.
  virtual StatusOr<std::vector<RunningInstance>> List() = 0;

  // Takes over watching an instance started by an earlier kilnd. NOT_FOUND when it is gone.
  virtual Status Adopt(const InstanceHandle& handle) = 0;
};

}  // namespace kiln
