#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "deploy/driver.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class ArtifactStore;

// The embedded default driver: instances are local processes.
// - posix_spawn of the artifact from the store, in a new session (its own process group);
// - stdout/stderr appended to STATE/logs/<instance>.log;
// - environment PATH, KILN_CONTROLLER, KILN_SERVICE, KILN_REVISION, KILN_INSTANCE, PORT and the
//   manifest's env (nothing else of kilnd's is inherited);
// - exits seen through a pidfd on Asio, also for processes it did not start (adopted ones);
// - a handle is pid + process start time, so a reused pid is never taken for the instance;
// - instances outlive the driver: a new driver given the handles adopts them.
// REQUIRES: used from the io_context's thread only.
class ProcessDriver final : public Driver {
 public:
  struct Options {
    std::filesystem::path log_dir;           // STATE/logs
    const ArtifactStore* artifacts = nullptr;
    int port_first = 20000;
    int port_last = 29999;
    // Identity of this controller (KILN_CONTROLLER in each instance's environment): List()
    // returns only instances with it, so two kilnd on one machine never touch each other's.
    std::string controller_id;
  };

  ProcessDriver(boost::asio::io_context& io, Options options);
  // Stops watching; instances keep running.
  ~ProcessDriver() override;

  // Driver
  void SetExitCallback(ExitFn fn) override;
  void Start(const InstanceSpec& spec, StartFn done) override;
  void Stop(const InstanceHandle& handle, Duration grace, StopFn done) override;
  StatusOr<bool> IsRunning(const InstanceHandle& handle) override;
  StatusOr<std::vector<RunningInstance>> List() override;
  Status Adopt(const InstanceHandle& handle) override;

  // How many instances this driver watches now.
  size_t WatchedCountForTest() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// The controller identity kilnd uses for a state directory: 16 hex digits of the SHA-256 of its
// absolute path.
std::string ControllerIdForStateDir(const std::filesystem::path& state_dir);

}  // namespace kiln
