#pragma once

// A reconciler on a real SQLite file with a fake driver, fake health and a FakeClock: every
// scenario runs without sleeping, pass by pass.

#include <algorithm>
#include <deque>
#include <map>
#include <vector>

#include "common/clock.h"
#include "controller/reconciler.h"
#include "storage/sqlite_state_store.h"
#include "tests/fakes/fake_driver.h"
#include "tests/fakes/fake_health.h"
#include "tests/fakes/faulty_store.h"
#include "tests/test_util.h"

namespace kiln::testing {

// A scheduler that only records: the test decides when passes run.
class RecordingScheduler final : public PassScheduler {
 public:
  explicit RecordingScheduler(const FakeClock& clock) : clock_(clock) {}
  void Add(const std::string& name) override { queue.push_back(name); }
  void AddAfter(const std::string& name, Duration d) override {
    timers.insert({clock_.SteadyNow() + d, name});
  }
  // Moves timers that are due into the queue.
  void FireDue() {
    for (auto it = timers.begin(); it != timers.end() && it->first <= clock_.SteadyNow();) {
      queue.push_back(it->second);
      it = timers.erase(it);
    }
  }
  std::deque<std::string> queue;
  std::multimap<SteadyTime, std::string> timers;

 private:
  const FakeClock& clock_;
};

struct ReconcilerFixture {
  ReconcilerFixture() : scheduler(clock) {
    WriteFile(tmp / "artifacts/app-v1", "app v1");
    WriteFile(tmp / "artifacts/app-v2", "app v2");
    WriteFile(tmp / "artifacts/app-v3", "app v3");
    auto s = SqliteStateStore::Open({.path = (tmp / "kiln.db").string(), .clock = &clock});
    store = std::move(s).value();
    faults = std::make_unique<FaultyStore>(*store, store->path());
    artifacts = std::make_unique<ArtifactStore>(*ArtifactStore::Open(tmp / "state/artifacts"));
    MakeReconciler();
  }

  void MakeReconciler() {
    Reconciler::Options options;
    options.on_event = [this](const EventRecord& e) { delivered.push_back(e); };
    reconciler = std::make_unique<Reconciler>(*faults, driver, health, *artifacts, clock, scheduler,
                                              std::move(options));
  }
  // The events the reconciler handed to on_event (metrics, webhooks), in order.
  bool Delivered(EventKind kind, const std::string& instance) const {
    return std::any_of(delivered.begin(), delivered.end(), [&](const EventRecord& e) {
      return e.kind == kind && e.instance == instance;
    });
  }

  // Writes web.yaml with this version (artifact app-<version>) and extra YAML lines, and loads.
  void Declare(const std::string& version, int replicas, const std::string& extra = "",
               const std::string& name = "web") {
    WriteFile(tmp / "m" / (name + ".yaml"), "name: " + name + "\nversion: \"" + version +
                                                "\"\nreplicas: " + std::to_string(replicas) +
                                                "\nartifact: {path: ../artifacts/app-" + version +
                                                "}\nhealth: {http: {path: /healthz}}\n" + extra);
    Load();
  }
  void Load() { reconciler->ApplyManifests(LoadManifestDir(tmp / "m")); }

  // Runs queued passes until the queue is empty; returns the first error.
  Status Converge() {
    Status first;
    for (int i = 0; i < 10000 && !scheduler.queue.empty(); ++i) {
      std::string name = scheduler.queue.front();
      scheduler.queue.pop_front();
      Status s = reconciler->Reconcile(name);
      if (!s.ok() && first.ok()) first = s;
    }
    return first;
  }
  void Advance(Duration d) {
    clock.Advance(d);
    scheduler.FireDue();
  }
  // Reports every watched instance that is still starting as healthy.
  void AllHealthy(const std::string& service = "web") {
    for (const auto& inst : Live(service)) {
      if (inst.state == InstanceState::kStarting || inst.state == InstanceState::kUnhealthy) {
        health.Report(inst.name, true);
      }
    }
  }
  std::vector<InstanceRecord> Live(const std::string& service = "web") {
    return *store->ListInstances(service, false);
  }
  // Live instances of a revision that are not draining.
  int Count(int64_t revision, const std::string& service = "web") {
    int n = 0;
    for (const auto& i : Live(service)) {
      n += i.revision == revision && i.state != InstanceState::kDraining;
    }
    return n;
  }
  int Available(const std::string& service = "web", Duration min_healthy = Duration(0)) {
    int n = 0;
    int64_t now = ToUnixMillis(clock.SystemNow());
    for (const auto& i : Live(service)) {
      n += i.state == InstanceState::kHealthy && now - i.healthy_since_ms >= min_healthy.count();
    }
    return n;
  }
  ServiceRecord Service(const std::string& name = "web") { return *store->GetService(name); }
  RolloutRecord Rollout(const std::string& name = "web") { return *store->GetLatestRollout(name); }
  std::vector<EventKind> EventKinds(const std::string& service = "web") {
    std::vector<EventKind> out;
    auto events = store->ReadEvents({.service = service, .limit = 100000});
    for (const auto& e : *events) out.push_back(e.kind);
    return out;
  }
  bool HasEvent(EventKind kind, const std::string& service = "web") {
    auto k = EventKinds(service);
    return std::find(k.begin(), k.end(), kind) != k.end();
  }

  TempDir tmp;
  FakeClock clock;
  RecordingScheduler scheduler;
  std::unique_ptr<SqliteStateStore> store;
  // What the reconciler writes through: no faults unless a test arms them.
  std::unique_ptr<FaultyStore> faults;
  std::unique_ptr<ArtifactStore> artifacts;
  FakeDriver driver;
  FakeHealth health;
  std::unique_ptr<Reconciler> reconciler;
  std::vector<EventRecord> delivered;
};

}  // namespace kiln::testing
