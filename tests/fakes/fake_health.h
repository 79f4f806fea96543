#pragma once

// Health checking without sockets: tests report probe results by hand.

#include <map>
#include <string>

#include "deploy/prober.h"

namespace kiln::testing {

class FakeHealth final : public HealthWatcher {
 public:
  void Watch(const ProbeTarget& target, TransitionFn fn) override {
    watched[target.instance] = {target, std::move(fn)};
  }
  void Unwatch(const std::string& instance) override { watched.erase(instance); }

  // Reports a probe transition for a watched instance; false when it is not watched.
  bool Report(const std::string& instance, bool healthy, const std::string& reason = "") {
    auto it = watched.find(instance);
    if (it == watched.end()) return false;
    auto fn = it->second.second;  // the callback may unwatch
    fn({.instance = instance,
        .healthy = healthy,
        .reason = reason.empty() ? (healthy ? "http 200" : "http 503") : reason,
        .transition = true});
    return true;
  }

  // Reports any probe result (not necessarily a transition); false when it is not watched.
  bool ReportResult(const ProbeResult& r) {
    auto it = watched.find(r.instance);
    if (it == watched.end()) return false;
    auto fn = it->second.second;
    fn(r);
    return true;
  }

  std::map<std::string, std::pair<ProbeTarget, TransitionFn>> watched;
};

}  // namespace kiln::testing
