#include "deploy/routing_driver.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "deploy/docker_driver.h"

namespace kiln {

RoutingDriver::RoutingDriver(boost::asio::io_context& io, std::unique_ptr<Driver> processes,
                             std::unique_ptr<Driver> containers)
    : io_(io), processes_(std::move(processes)), containers_(std::move(containers)) {}

RoutingDriver::~RoutingDriver() = default;

Status RoutingDriver::NoEngine(const std::string& instance) const {
  return InvalidArgumentError("start " + instance +
                              ": no Docker engine configured: start kilnd with --docker-host");
}

Driver* RoutingDriver::For(const InstanceHandle& handle) {
  if (IsDockerHandle(handle.id)) return containers_.get();
  return processes_.get();
}

void RoutingDriver::SetExitCallback(ExitFn fn) {
  if (containers_) containers_->SetExitCallback(fn);
  processes_->SetExitCallback(std::move(fn));
}

void RoutingDriver::Start(const InstanceSpec& spec, StartFn done) {
  if (spec.image.empty()) return processes_->Start(spec, std::move(done));
  if (containers_) return containers_->Start(spec, std::move(done));
  boost::asio::post(io_, [done = std::move(done), s = NoEngine(spec.instance)] { done(s); });
}

void RoutingDriver::Stop(const InstanceHandle& handle, Duration grace, StopFn done) {
  Driver* d = For(handle);
  if (d == nullptr) {
    done(FailedPreconditionError("stop " + handle.instance +
                                 ": a container, and no Docker engine configured: start kilnd "
                                 "with --docker-host"));
    return;
  }
  d->Stop(handle, grace, std::move(done));
}

StatusOr<bool> RoutingDriver::IsRunning(const InstanceHandle& handle) {
  Driver* d = For(handle);
  if (d == nullptr) {
    return FailedPreconditionError("instance " + handle.instance +
                                   " is a container, and no Docker engine is configured");
  }
  return d->IsRunning(handle);
}

StatusOr<std::vector<RunningInstance>> RoutingDriver::List() {
  ASSIGN_OR_RETURN(std::vector<RunningInstance> all, processes_->List());
  if (containers_) {
    ASSIGN_OR_RETURN(std::vector<RunningInstance> more, containers_->List());
    for (auto& r : more) all.push_back(std::move(r));
  }
  return all;
}

Status RoutingDriver::Adopt(const InstanceHandle& handle) {
  Driver* d = For(handle);
  if (d == nullptr) {
    return FailedPreconditionError("instance " + handle.instance +
                                   " is a container, and no Docker engine is configured");
  }
  return d->Adopt(handle);
}

void RoutingDriver::Discard(const std::string& instance) {
  processes_->Discard(instance);
  if (containers_) containers_->Discard(instance);
}

}  // namespace kiln
