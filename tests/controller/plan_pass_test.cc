// Plan and pass cannot disagree: in every reconciler scenario, before each pass, what
// Reconciler::Plan says the next pass does is exactly what the pass then commits (the revision
// it writes for a new template, the instances it creates for the target, the instances it
// drains).

#include <catch2/catch.hpp>
#include <map>
#include <set>

#include "controller/reconciler.h"
#include "tests/controller/reconciler_fixture.h"

namespace kiln {
namespace {

using testing::ReconcilerFixture;
using namespace std::chrono_literals;

// What one pass committed: the revisions it wrote, read from its events, and the instances it
// created and drained, read from the instance rows (lifecycle events of a crash-looping service
// are aggregated, so they do not count instances).
struct Committed {
  int64_t revision_created = 0;  // a revision written for a new template
  int64_t rolled_back = 0;       // a revision written to roll back
  std::vector<int64_t> created;  // the revision of each instance created
  std::set<std::string> drained;
};

std::map<std::string, InstanceRecord> Rows(ReconcilerFixture& f, const std::string& service) {
  std::map<std::string, InstanceRecord> out;
  for (InstanceRecord& i : *f.store->ListInstances(service, /*include_final=*/true)) {
    out[i.name] = std::move(i);
  }
  return out;
}

Committed CommittedSince(ReconcilerFixture& f, const std::string& service, int64_t after_seq,
                         const std::map<std::string, InstanceRecord>& before) {
  Committed c;
  auto events = f.store->ReadEvents({.after_seq = after_seq, .service = service, .limit = 100000});
  REQUIRE(events.ok());
  for (const EventRecord& e : *events) {
    if (e.kind == EventKind::kRevisionCreated) c.revision_created = e.revision;
    if (e.kind == EventKind::kRolledBack) c.rolled_back = e.revision;
  }
  for (const auto& [name, now] : Rows(f, service)) {
    auto was = before.find(name);
    if (was == before.end()) {
      c.created.push_back(now.revision);
      continue;
    }
    // Drained: draining now, or already stopped (the fake driver stops at once).
    const bool serving = IsLive(was->second.state) && was->second.state != InstanceState::kDraining;
    if (serving &&
        (now.state == InstanceState::kDraining || now.state == InstanceState::kTerminated)) {
      c.drained.insert(name);
    }
  }
  return c;
}

// Plans the next pass of `service`, runs that pass, and checks that it committed the plan.
// Returns the number of passes checked (0 for a service Plan does not know).
int PlannedPass(ReconcilerFixture& f, const std::string& service) {
  std::string before;
  for (const InstanceRecord& i : f.Live(service)) {
    before += " " + i.name + ":" + std::string(InstanceStateName(i.state)) +
              (i.replace_reason.empty() ? "" : "(replace)");
  }
  INFO("live before the pass:" << before);
  const auto rows = Rows(f, service);
  StatusOr<Reconciler::NextStep> plan = f.reconciler->Plan(service);
  const int64_t seq = *f.store->LatestEventSeq();
  Status pass = f.reconciler->Reconcile(service);
  REQUIRE(pass.ok());
  if (!plan.ok()) {
    REQUIRE(plan.status().code() == StatusCode::kNotFound);
    return 0;
  }
  const Committed did = CommittedSince(f, service, seq, rows);
  INFO("plan: " << plan->summary << "; target " << plan->target_revision << ", create "
                << plan->create << ", destroy " << plan->destroy.size());
  CHECK(did.revision_created == plan->new_revision);
  CHECK(did.rolled_back == plan->rollback_revision);
  CHECK(static_cast<int>(did.created.size()) == plan->create);
  for (int64_t r : did.created) CHECK(r == plan->target_revision);
  CHECK(did.drained == std::set<std::string>(plan->destroy.begin(), plan->destroy.end()));
  return 1;
}

// Fixture::Converge, with every pass planned first and checked.
int Converge(ReconcilerFixture& f) {
  int checked = 0;
  for (int i = 0; i < 10000 && !f.scheduler.queue.empty(); ++i) {
    std::string name = f.scheduler.queue.front();
    f.scheduler.queue.pop_front();
    checked += PlannedPass(f, name);
  }
  return checked;
}

// Runs passes, reporting new instances healthy and moving time by `tick`, until the latest
// rollout is no longer active (or `steps` run out). Returns the passes checked.
int Drive(ReconcilerFixture& f, Duration tick = 1s, int steps = 100, bool healthy = true) {
  int checked = Converge(f);
  for (int step = 0; step < steps && IsActive(f.Rollout().state); ++step) {
    if (healthy) f.AllHealthy();
    checked += Converge(f);
    f.Advance(tick);
    checked += Converge(f);
  }
  return checked;
}

int ColdStart(ReconcilerFixture& f, int replicas, const std::string& extra) {
  f.Declare("v1", replicas, extra);
  int checked = Drive(f);
  f.Advance(10s);
  checked += Converge(f);
  REQUIRE(f.Rollout().state == RolloutState::kCompleted);
  return checked;
}

TEST_CASE("plan equals pass: rolling", "[reconciler][plan]") {
  for (const std::string update :
       {"{max_surge: 1, max_unavailable: 0}", "{max_surge: 0, max_unavailable: 1}",
        "{max_surge: 25%, max_unavailable: 25%}"}) {
    INFO(update);
    ReconcilerFixture f;
    const std::string policy = "update: " + update + "\n";
    ColdStart(f, 4, policy);
    f.Declare("v2", 4, policy);
    CHECK(Drive(f) > 3);
    CHECK(f.Rollout().state == RolloutState::kCompleted);
    CHECK(f.Count(2) == 4);
  }
}

TEST_CASE("plan equals pass: recreate", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 3, "update: {strategy: recreate}\n");
  f.Declare("v2", 3, "update: {strategy: recreate}\n");
  CHECK(Drive(f) > 2);
  CHECK(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("plan equals pass: blue-green", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 3, "update: {strategy: blue-green, min_healthy_time: 2s}\n");
  f.Declare("v2", 3, "update: {strategy: blue-green, min_healthy_time: 2s}\n");
  CHECK(Drive(f) > 2);
  CHECK(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("plan equals pass: canary, promoted by an operator and automatically",
          "[reconciler][plan]") {
  ReconcilerFixture f;
  const std::string policy = "update: {strategy: canary, canary: 1}\n";
  ColdStart(f, 3, policy);
  f.Declare("v2", 3, policy);
  Drive(f, 1s, 5);
  REQUIRE(f.Rollout().state == RolloutState::kWaitingPromotion);
  REQUIRE(f.reconciler->Promote("web", "alice").ok());
  CHECK(Drive(f) > 2);
  CHECK(f.Rollout().state == RolloutState::kCompleted);
  // The next rollout, with auto_promote, starts unpromoted again.
  const std::string automatic = "update: {strategy: canary, canary: 2, auto_promote: true}\n";
  f.Declare("v3", 3, automatic);
  auto canaries = f.reconciler->Plan("web");
  REQUIRE(canaries.ok());
  CHECK(canaries->summary == "canary: starting 2 canary instance(s)");
  CHECK(canaries->create == 2);
  CHECK(Drive(f) > 2);
  CHECK(f.Rollout().state == RolloutState::kCompleted);
  CHECK(f.Count(3) == 3);
}

TEST_CASE("plan equals pass: scale up and down", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 2, "");
  f.Declare("v1", 5);
  CHECK(Converge(f) > 0);
  f.AllHealthy();
  Converge(f);
  CHECK(f.Count(1) == 5);
  f.Declare("v1", 1);
  CHECK(Converge(f) > 0);
  CHECK(f.Count(1) == 1);
  // Mid-rollout.
  f.Declare("v2", 4);
  Converge(f);
  f.Declare("v2", 2);
  CHECK(Drive(f) > 1);
  CHECK(f.Count(2) == 2);
}

TEST_CASE("plan equals pass: operator rollback and unpin", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 2, "");
  f.Declare("v2", 2);
  Drive(f);
  REQUIRE(f.reconciler->Rollback("web", 0, "bad deploy", "bob").ok());
  CHECK(Drive(f) > 1);
  CHECK(f.Count(3) == 2);
  REQUIRE(f.reconciler->Unpin("web", "bob").ok());
  CHECK(Drive(f) > 1);
  CHECK(f.Count(2) == 2);
}

TEST_CASE("plan equals pass: a failed rollout rolls back by itself", "[reconciler][plan]") {
  ReconcilerFixture f;
  const std::string policy = "update: {healthy_deadline: 20s, progress_deadline: 60s}\n";
  ColdStart(f, 2, policy);
  f.Declare("v2", 2, policy);
  // v2 never becomes healthy: its instances miss their deadline, the rollout fails.
  Drive(f, 20s, 10, /*healthy=*/false);
  CHECK(f.HasEvent(EventKind::kRolledBack));
  CHECK(f.Service().pinned_revision == 3);
  // The fix lifts the pin.
  f.Declare("v3", 2, policy);
  CHECK(Drive(f) > 1);
  CHECK(f.Count(4) == 2);
}

TEST_CASE("plan equals pass: replacing failed and unhealthy instances", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 3, "");
  auto live = f.Live();
  f.driver.Exit(live[0].name, 1);
  CHECK(Converge(f) > 0);
  f.health.Report(live[1].name, false);
  CHECK(Converge(f) > 0);
  REQUIRE(f.reconciler->ReplaceInstance(live[2].name, "", "carol").ok());
  // Two failures in a row: the second replacement waits out the crash-loop back-off (10s).
  for (int i = 0; i < 4; ++i) {
    f.AllHealthy();
    Converge(f);
    f.Advance(5s);
  }
  Converge(f);
  CHECK(f.Count(1) == 3);
  for (const auto& i : f.Live()) {
    CHECK(i.name != live[0].name);
    CHECK(i.name != live[1].name);
    CHECK(i.name != live[2].name);
  }
}

TEST_CASE("plan equals pass: a crash-looping service backs off", "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 1, "");
  for (int i = 0; i < 4; ++i) {
    f.driver.Exit(f.Live().at(0).name, 1);
    CHECK(Converge(f) > 0);
    f.Advance(5s);
    Converge(f);
    f.Advance(30s);
    Converge(f);
  }
  CHECK(f.Service().crash_count >= 2);
}

TEST_CASE("plan equals pass: a service removed from the manifests is retired",
          "[reconciler][plan]") {
  ReconcilerFixture f;
  ColdStart(f, 2, "");
  f.Declare("v1", 1, "", "api");
  Converge(f);
  std::filesystem::remove(f.tmp / "m/web.yaml");
  f.Load();
  StatusOr<Reconciler::NextStep> waiting = f.reconciler->Plan("web");
  REQUIRE(waiting.ok());
  CHECK(waiting->summary == "not declared in the manifests: retiring in 1m");
  CHECK(Converge(f) > 0);
  f.Advance(60s);
  StatusOr<Reconciler::NextStep> retiring = f.reconciler->Plan("web");
  REQUIRE(retiring.ok());
  CHECK(retiring->summary == "retired: stopping 2 instance(s)");
  CHECK(retiring->destroy.size() == 2);
  CHECK(Converge(f) > 0);
  CHECK(f.Live("web").empty());
  CHECK(f.reconciler->Plan("nothing").status().code() == StatusCode::kNotFound);
}

}  // namespace
}  // namespace kiln
