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
// - the artifact from the store runs in a new session, holding only stdin (/dev/null) and
//   stdout/stderr (appended to STATE/logs/<instance>.log): no descriptor of kilnd's;
// - environment PATH, KILN_CONTROLLER, KILN_SERVICE, KILN_REVISION, KILN_INSTANCE, PORT and the
//   manifest's env (nothing else of kilnd's is inherited); a command without '/' is looked up
//   in that PATH;
// - every process of an instance is kept together: in a cgroup v2 of its own
//   (<kilnd's cgroup>/kiln-<controller id>/<instance>, the process created in it by clone3
//   CLONE_INTO_CGROUP) where the machine allows it, else by its session and the KILN_INSTANCE
//   its processes inherit. Stopping an instance ends all of them; so does the end of its leader;
// - the instance's leader is the process the driver started; its exit is seen through a pidfd
//   on Asio, also for leaders it did not start (adopted ones), and recorded only once the kernel
//   reports it;
// - a handle is the leader's pid + start time, so a reused pid is never taken for the instance;
// - instances outlive the driver: a new driver given the handles adopts them.
// REQUIRES: used from the io_context's thread only.
class ProcessDriver final : public Driver {
 public:
  // How the processes of one instance are kept together.
  enum class Isolation {
    kAuto,     // a cgroup per instance where the machine allows it, else kSession
    kCgroup,   // the same, but an error is logged when cgroups cannot be used
    kSession,  // the session of the leader and the KILN_* environment its processes inherit
  };

  struct Options {
    std::filesystem::path log_dir;  // STATE/logs
    const ArtifactStore* artifacts = nullptr;
    int port_first = 20000;
    int port_last = 29999;
    // Identity of this controller (KILN_CONTROLLER in each instance's environment): List()
    // returns only instances with it, so two kilnd on one machine never touch each other's.
    std::string controller_id;
    Isolation isolation = Isolation::kAuto;
    // Where the controller's cgroup kiln-<controller_id> is made; empty: in kilnd's own cgroup
    // (under systemd that needs Delegate=yes, and KillMode=process so instances outlive kilnd).
    std::filesystem::path cgroup_parent;
    // The soft RLIMIT_NOFILE instances start with (kilnd raises its own to the hard limit at
    // start; instances get what kilnd was started with). 0: inherit kilnd's.
    uint64_t instance_nofile_soft = 0;
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
  // Removes the instance's log files (STATE/logs/<instance>.log and its rotated copies).
  void Discard(const std::string& instance) override;

  // kCgroup or kSession: what this driver does (decided at construction, logged once; a kernel
  // that refuses clone3 into a cgroup turns it to kSession at the first start).
  Isolation isolation() const;
  // The cgroup an instance of this driver runs in (whether or not it exists), in kCgroup mode.
  std::filesystem::path CgroupDirForTest(const std::string& instance) const;

  // How many instances this driver watches now (including the ones whose leftover processes it
  // is still waiting for).
  size_t WatchedCountForTest() const;
  // Runs what happens when the leader's pidfd reports readiness, as if it had, whether or not
  // the leader exited.
  void PidfdReadyForTest(const std::string& instance);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// The controller identity kilnd uses for a state directory: 16 hex digits of the SHA-256 of its
// absolute path.
std::string ControllerIdForStateDir(const std::filesystem::path& state_dir);

}  // namespace kiln
