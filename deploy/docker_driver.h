#pragma once

#include <memory>
#include <string>

#include "deploy/driver.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

// Instances as containers of one Docker engine, driven through its HTTP API (never the docker
// CLI). One instance is one container named kiln-<instance>:
// - image: the spec's `name@sha256:<hex>`; pulled by that digest when the engine does not hold
//   it. An engine that holds an image whose own ID is sha256:<hex> (one made by `docker import`
//   or `docker load`, which has no repository digest) runs that image: the pin is met all the
//   same, since an image ID is the digest of the image's configuration;
// - labels kiln.instance, kiln.service, kiln.revision and kiln.controller (the controller id):
//   List and the exit stream see only this controller's containers;
// - environment KILN_SERVICE, KILN_REVISION, KILN_INSTANCE, PORT (the container port) and the
//   manifest's env; `command` (with {port}, {instance}, {service}, {revision} expanded) replaces
//   the image's; restart policy "no": a container that ends is replaced, never restarted;
// - the spec's container port published on options.publish_ip with a port the engine picks,
//   read back into the handle (host publish_ip, port that port);
// - handle id "docker:<container id>";
// - exits nobody asked for arrive on the engine's /events stream (die events with this
//   controller's label), reconnected with since= after a drop so none is missed; the container
//   is then removed.
// REQUIRES: used from the io_context's thread only.
class DockerDriver final : public Driver {
 public:
  struct Options {
    std::string endpoint = "unix:///run/docker.sock";  // --docker-host
    std::string controller_id;
    std::string publish_ip = "127.0.0.1";
    Duration request_timeout{30'000};  // one API call (stop: plus the grace period)
    Duration sync_timeout{10'000};     // the synchronous calls (List, IsRunning, Adopt)
    Duration pull_timeout{600'000};    // pulling one image
  };

  // INVALID_ARGUMENT for an endpoint that is not a usable address. Does not talk to the engine
  // yet: an engine that is down is reported by the calls that need it.
  static StatusOr<std::unique_ptr<DockerDriver>> Create(boost::asio::io_context& io,
                                                        Options options);
  // Stops watching; containers keep running.
  ~DockerDriver() override;

  // Driver
  void SetExitCallback(ExitFn fn) override;
  // Errors: INVALID_ARGUMENT when retrying cannot help (no image in the spec, an image that does
  // not exist or that the registry refuses, a command the image cannot run); UNAVAILABLE when
  // the engine cannot be reached (the message names its address); the engine's own words
  // otherwise ("port conflict: ...").
  void Start(const InstanceSpec& spec, StartFn done) override;
  // POST /containers/ID/stop?t=<grace>, then its exit code from inspect, then removal.
  void Stop(const InstanceHandle& handle, Duration grace, StopFn done) override;
  // The next three block on the engine for at most options.sync_timeout: the interface is
  // synchronous and they run at start-up recovery and rarely after.
  // True while the container exists (running, or exited but not removed: a Stop removes it).
  StatusOr<bool> IsRunning(const InstanceHandle& handle) override;
  // Every container with this controller's label, exited ones included.
  StatusOr<std::vector<RunningInstance>> List() override;
  // NOT_FOUND when the container is gone or no longer runs (it is then removed).
  Status Adopt(const InstanceHandle& handle) override;

  const std::string& endpoint() const;

  // For host health (DockerHostsDriver): OK when the engine answers /_ping within `timeout`.
  // `done` runs on the io_context, never inline.
  void Ping(Duration timeout, std::function<void(Status)> done);
  // The engine is taken for gone: stops watching every container and reports no exit for any
  // (the caller reports them lost). A Start or Stop under way still reports to its callback.
  void ForgetAll();
  // Removes every container of this controller that the driver does not watch (those it forgot
  // and any others nobody tracks); `done` gets how many it removed. For an engine that answers
  // again after its instances were given up.
  void RemoveUnwatched(std::function<void(StatusOr<int>)> done);

 private:
  struct Impl;
  explicit DockerDriver(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// INVALID_ARGUMENT when `endpoint` is not an engine address the driver can use (--docker-host).
Status CheckDockerEndpoint(const std::string& endpoint);

// Whether a handle is one of the Docker driver's.
bool IsDockerHandle(const std::string& id);

}  // namespace kiln
