#pragma once

// A driver without processes: instances "run" in a map. Starts and stops complete at once (on
// the caller's stack); tests make instances exit and make the next start fail.

#include <map>
#include <set>
#include <string>
#include <vector>

#include "deploy/driver.h"

namespace kiln::testing {

class FakeDriver final : public Driver {
 public:
  // Driver
  void SetExitCallback(ExitFn fn) override { exit_fn_ = std::move(fn); }

  void Start(const InstanceSpec& spec, StartFn done) override {
    ++start_count;
    if (record_starts) starts.push_back(spec);
    if (!fail_next_start.empty()) {
      std::string why = std::exchange(fail_next_start, "");
      if (fail_starts_permanently)
        return done(InvalidArgumentError("start " + spec.instance + ": " + why));
      return done(FailedPreconditionError("start " + spec.instance + ": " + why));
    }
    if (defer_starts) {
      deferred.emplace_back(spec, std::move(done));
      return;
    }
    done(Run(spec));
  }

  void Stop(const InstanceHandle& h, Duration, StopFn done) override {
    stops.push_back(h.instance);
    running.erase(h.instance);
    done(ExitInfo{h.instance, std::nullopt, 15, true});
  }

  StatusOr<bool> IsRunning(const InstanceHandle& h) override {
    return running.count(h.instance) > 0;
  }

  StatusOr<std::vector<RunningInstance>> List() override {
    std::vector<RunningInstance> out;
    for (const auto& [name, r] : running) out.push_back(r);
    return out;
  }

  Status Adopt(const InstanceHandle& h) override {
    auto it = running.find(h.instance);
    if (it == running.end() || it->second.handle.id != h.id)
      return NotFoundError(h.instance + " is gone");
    adopted.insert(h.instance);
    return Status::Ok();
  }

  // Test controls.
  StatusOr<InstanceHandle> Run(const InstanceSpec& spec) {
    InstanceHandle h{spec.instance, "fake:" + std::to_string(++next_id_), "127.0.0.1",
                     20000 + next_id_};
    running[spec.instance] = {h, spec.service, spec.revision};
    return h;
  }
  // The instance exits by itself.
  void Exit(const std::string& instance, int code) {
    running.erase(instance);
    exit_fn_(ExitInfo{instance, code, std::nullopt, true});
  }
  // Completes the starts held back with defer_starts.
  void CompleteDeferred() {
    auto d = std::move(deferred);
    deferred.clear();
    for (auto& [spec, done] : d) done(Run(spec));
  }
  std::vector<std::string> StartedNames() const {
    std::vector<std::string> out;
    for (const auto& s : starts) out.push_back(s.instance);
    return out;
  }

  std::vector<InstanceSpec> starts;
  bool record_starts = true;  // benchmarks turn it off to measure the reconciler, not the fake
  size_t start_count = 0;
  std::vector<std::string> stops;
  std::map<std::string, RunningInstance> running;
  std::set<std::string> adopted;
  std::string fail_next_start;
  bool fail_starts_permanently = false;  // the failure is one retrying cannot fix
  bool defer_starts = false;
  std::vector<std::pair<InstanceSpec, StartFn>> deferred;

 private:
  ExitFn exit_fn_;
  int next_id_ = 0;
};

}  // namespace kiln::testing
