#pragma once

#include <memory>

#include "deploy/driver.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

// One kilnd, two kinds of instance: specs with an image go to the container driver, the rest to
// the process driver; handles go back to the driver that made them (the container driver's
// start with "docker:"). List and IsRunning merge both; both drivers' exits reach the one exit
// callback.
//
// Without a container driver (kilnd started without --docker-host), an image service's
// instances fail to start with INVALID_ARGUMENT ("no Docker engine configured"): retrying
// cannot help, so the reconciler's crash-loop back-off applies.
// REQUIRES: used from the io_context's thread only, like the drivers it routes to.
class RoutingDriver final : public Driver {
 public:
  // `containers` may be null.
  RoutingDriver(boost::asio::io_context& io, std::unique_ptr<Driver> processes,
                std::unique_ptr<Driver> containers);
  ~RoutingDriver() override;

  // Driver
  void SetExitCallback(ExitFn fn) override;
  void Start(const InstanceSpec& spec, StartFn done) override;
  void Stop(const InstanceHandle& handle, Duration grace, StopFn done) override;
  StatusOr<bool> IsRunning(const InstanceHandle& handle) override;
  // Fails when either driver cannot list: start-up recovery then waits (and retries) rather
  // than take the other driver's instances for lost.
  StatusOr<std::vector<RunningInstance>> List() override;
  Status Adopt(const InstanceHandle& handle) override;
  void Discard(const std::string& instance) override;

  Driver& processes() { return *processes_; }
  Driver* containers() { return containers_.get(); }

 private:
  // The driver a handle belongs to; null for a container handle without a container driver.
  Driver* For(const InstanceHandle& handle);
  Status NoEngine(const std::string& instance) const;

  boost::asio::io_context& io_;
  std::unique_ptr<Driver> processes_;
  std::unique_ptr<Driver> containers_;
};

}  // namespace kiln
