#pragma once

// Several Docker engines as several hosts (docs/operations.md "Image services"): one DockerDriver
// per engine, placement of new instances, and each engine's health.

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "deploy/driver.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class DockerDriver;

// The name a bare --docker-host URL gets.
inline constexpr char kDefaultDockerHostName[] = "default";

// One --docker-host: "name=a,unix:///run/a.sock", or a bare "unix:///run/a.sock" (named
// kDefaultDockerHostName).
struct DockerHostConfig {
  std::string name;
  std::string endpoint;
};

// INVALID_ARGUMENT naming what is wrong with one flag's value.
StatusOr<DockerHostConfig> ParseDockerHostFlag(const std::string& flag);
// Every flag parsed; names unique and [a-z0-9-] (1 to 63 characters, not starting or ending
// with '-'), endpoints usable and not given twice.
StatusOr<std::vector<DockerHostConfig>> ParseDockerHostFlags(const std::vector<std::string>& flags);

// The host name and container id of a handle this driver made ("docker:a/<id>", or
// "docker:<id>" from before hosts had names: host kDefaultDockerHostName); nullopt for a handle
// that is not a container's. For views (the API shows where an instance runs).
std::optional<std::pair<std::string, std::string>> ParseDockerHandle(const std::string& id);

// What status, the API and /metrics show of one host.
struct DockerHostStatus {
  std::string name;
  std::string endpoint;    // "" for a host that is not configured
  bool configured = true;  // false: stored instances name it, but kilnd has no such --docker-host
  bool up = true;
  std::string last_error;  // why it is down (or why its last ping failed)
  int64_t since_ms = 0;    // unix ms of the last change between up and down
  int instances = 0;       // containers placed there that kiln tracks
  int left_running = 0;    // not configured: containers of stored instances left on it
  std::map<std::string, int> per_service;
};

// Handles are "docker:<host>/<container id>"; a handle written before hosts had names
// ("docker:<container id>") belongs to the host named kDefaultDockerHostName.
//
// Placement: a new instance goes to an up host among those its spec allows (all when
// spec.hosts is empty) with the fewest instances of its service, then the fewest instances
// overall, then the first name. Start fails with INVALID_ARGUMENT when no host the spec allows is
// configured (retrying cannot help), UNAVAILABLE when every allowed host is down.
//
// Health: every engine is pinged every ping_interval (each ping bounded by ping_timeout). An
// engine that has not answered for down_after is down: each of its instances is reported ended
// with ExitInfo::lost, nothing is placed on it, and Stop of an instance there reports it gone at
// once. When it answers again, every container of this controller on it that is not tracked (the
// lost ones) is removed first, and only then is it up again.
// REQUIRES: used from the io_context's thread only, except Hosts().
class DockerHostsDriver final : public Driver {
 public:
  struct Options {
    std::vector<DockerHostConfig> hosts;
    std::string controller_id;
    std::string publish_ip = "127.0.0.1";
    Duration ping_interval{1000};
    Duration ping_timeout{2000};
    Duration down_after{10'000};  // --docker-host-timeout
  };
  // A host went down (up = false) or answered again; `message` says so for events and logs.
  using HostFn = std::function<void(const std::string& host, bool up, const std::string& message)>;

  static StatusOr<std::unique_ptr<DockerHostsDriver>> Create(boost::asio::io_context& io,
                                                             Options options);
  ~DockerHostsDriver() override;

  void SetHostCallback(HostFn fn);
  // Every configured host, then hosts that stored instances named but are not configured, by
  // name. Any thread.
  std::vector<DockerHostStatus> Hosts() const;

  // Driver
  void SetExitCallback(ExitFn fn) override;
  void Start(const InstanceSpec& spec, StartFn done) override;
  void Stop(const InstanceHandle& handle, Duration grace, StopFn done) override;
  StatusOr<bool> IsRunning(const InstanceHandle& handle) override;
  // Every up host's containers; fails when an up host cannot list (recovery then waits rather
  // than take its instances for lost). A host already down is left out.
  StatusOr<std::vector<RunningInstance>> List() override;
  // FAILED_PRECONDITION naming the host when the handle's host is not configured: the container
  // is left running there, the host is listed as not configured with it.
  Status Adopt(const InstanceHandle& handle) override;

 private:
  struct Host;
  struct Placed {
    std::string host;
    std::string service;
    bool started = false;    // Start reported success, or adopted
    bool stopping = false;   // Stop asked
    bool abandoned = false;  // its host went down during its start
  };

  DockerHostsDriver(boost::asio::io_context& io, Options options);
  Host* Find(const std::string& name);
  // The host and the inner handle ("docker:<container id>") of an outer handle.
  StatusOr<std::pair<Host*, InstanceHandle>> Route(const InstanceHandle& handle);
  std::string HostOfHandle(const std::string& id) const;
  void SchedulePing(Host& h);
  void OnPing(Host& h, const Status& s);
  void MarkDown(Host& h, const std::string& why);
  void Publish();

  boost::asio::io_context& io_;
  Options options_;
  std::vector<std::unique_ptr<Host>> hosts_;  // by name
  std::map<std::string, Placed> placed_;      // by instance
  std::map<std::string, int> missing_;        // unconfigured host -> containers left there
  ExitFn exit_fn_;
  HostFn host_fn_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);

  mutable std::mutex snapshot_mu_;  // guards snapshot_ (read by the API and metrics threads)
  std::vector<DockerHostStatus> snapshot_;
};

}  // namespace kiln
