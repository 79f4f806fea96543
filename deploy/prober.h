#pragma once

// Health probes (exec, tcp, http) on Asio. Each watched instance is probed every interval with a
// timeout; results arrive as healthy/unhealthy transitions with the reason. A probe never blocks
// the event loop and never outlives its instance: Unwatch cancels what is in flight.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "spec/health_check.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

struct ProbeTarget {
  std::string instance;
  HealthCheck check;
  std::string host = "127.0.0.1";
  int port = 0;  // the instance's port; the check's own port wins when set
  std::map<std::string, std::string> env;  // for exec probes (PORT, KILN_INSTANCE, ...)
};

struct ProbeResult {
  std::string instance;
  bool healthy = false;
  // "http 200 from 127.0.0.1:20001/healthz", "http 503 from ...", "connect refused
  // 127.0.0.1:20001", "timeout after 500ms", "exec exited with code 1".
  std::string reason;
  // The health state changed with this result: the first success (healthy),
  // `failure_threshold` consecutive failures after being healthy (unhealthy), a success after
  // that (healthy again).
  bool transition = false;
  // The probe could not run for a reason of kilnd's own (out of descriptors or memory): it says
  // nothing about the instance, and never counts toward its failure threshold.
  bool local_error = false;
};

// What the reconciler needs from health checking (tests use a fake).
class HealthWatcher {
 public:
  // Called with every probe result; `transition` marks the ones that change the health state.
  using TransitionFn = std::function<void(const ProbeResult&)>;

  virtual ~HealthWatcher() = default;
  // Starts probing at once, then every interval. Watching an instance again replaces the target.
  virtual void Watch(const ProbeTarget& target, TransitionFn on_transition) = 0;
  virtual void Unwatch(const std::string& instance) = 0;
};

// REQUIRES: used from the io_context's thread only.
class Prober final : public HealthWatcher {
 public:
  explicit Prober(boost::asio::io_context& io);
  ~Prober() override;

  // HealthWatcher
  void Watch(const ProbeTarget& target, TransitionFn on_transition) override;
  void Unwatch(const std::string& instance) override;

  // The latest result of an instance's probe, whether or not it was a transition.
  std::optional<ProbeResult> Last(const std::string& instance) const;
  size_t WatchedCount() const;

  // Runs one probe and reports its result; the building block of Watch, exposed for tests.
  void ProbeOnce(const ProbeTarget& target, std::function<void(ProbeResult)> done);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln
