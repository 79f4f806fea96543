// Reconciler scenarios with a fake driver, fake health and a FakeClock.

#include "controller/reconciler.h"

#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <cerrno>

#include "tests/controller/reconciler_fixture.h"
#include "tests/fakes/simulated_time_source.h"

namespace kiln {
namespace {

using testing::ReconcilerFixture;
using namespace std::chrono_literals;

// Cold start of `replicas` instances of v1, all healthy, rollout completed.
void ColdStart(ReconcilerFixture& f, int replicas, const std::string& extra = "") {
  f.Declare("v1", replicas, extra);
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.Advance(10s);  // past any min_healthy_time
  REQUIRE(f.Converge().ok());
  REQUIRE(f.Count(1) == replicas);
  REQUIRE(f.Rollout().state == RolloutState::kCompleted);
}

// Drives a rollout to its end, reporting new instances healthy as they start and checking the
// invariants at every step: available never below `min_available`, total never above `max_total`.
void RollOut(ReconcilerFixture& f, int min_available, int max_total, int max_steps = 100) {
  REQUIRE(f.Converge().ok());
  for (int step = 0; step < max_steps && f.Rollout().state != RolloutState::kCompleted; ++step) {
    REQUIRE(f.Converge().ok());
    int total = 0;
    for (const auto& i : f.Live()) total += i.state != InstanceState::kDraining;
    CHECK(total <= max_total);
    CHECK(f.Available() >= min_available);
    f.AllHealthy();
    REQUIRE(f.Converge().ok());
    f.Advance(1s);
  }
  REQUIRE(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("cold start creates the replicas and completes the first rollout", "[reconciler]") {
  ReconcilerFixture f;
  f.Declare("v1", 3);
  REQUIRE(f.Converge().ok());
  // Intent first: three rows, all started by the driver, none healthy yet.
  CHECK(f.Live().size() == 3);
  CHECK(f.driver.starts.size() == 3);
  for (const auto& i : f.Live()) CHECK(i.state == InstanceState::kStarting);
  CHECK(f.Rollout().state == RolloutState::kProgressing);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kCompleted);
  CHECK(f.store->GetRevision("web", 1)->available_ms > 0);
  CHECK(f.HasEvent(EventKind::kRevisionCreated));
  CHECK(f.HasEvent(EventKind::kInstanceHealthy));
  CHECK(f.HasEvent(EventKind::kRolloutCompleted));
  // The artifact went into the store and instances run it by digest.
  CHECK(f.artifacts->Has(f.driver.starts[0].artifact_sha256));
  // Steady: another pass does nothing.
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 3);
}

TEST_CASE("min_healthy_time delays availability", "[reconciler]") {
  ReconcilerFixture f;
  f.Declare("v1", 2, "update: {min_healthy_time: 5s}\n");
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kProgressing);
  CHECK_FALSE(f.scheduler.timers.empty());  // a timer, not a sweep, notices it
  f.Advance(5s);
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("rolling: surge and unavailable as counts and percentages", "[reconciler]") {
  struct Case {
    int replicas;
    std::string update;
    int min_available;
    int max_total;
    int first_creates;
  };
  // first_creates: new instances once the first passes settle (the fake driver stops at once).
  for (const Case& c : {Case{4, "{max_surge: 1, max_unavailable: 0}", 4, 5, 1},
                        Case{4, "{max_surge: 0, max_unavailable: 1}", 3, 4, 1},
                        Case{10, "{max_surge: 25%, max_unavailable: 25%}", 8, 13, 5},
                        Case{10, "{max_surge: 100%, max_unavailable: 0}", 10, 20, 10},
                        Case{3, "{}", 3, 4, 1}}) {  // defaults: 25% (rounds up to 1), 0
    INFO(c.replicas << " " << c.update);
    ReconcilerFixture f;
    ColdStart(f, c.replicas, "update: " + c.update + "\n");
    f.Declare("v2", c.replicas, "update: " + c.update + "\n");
    REQUIRE(f.Converge().ok());
    CHECK(f.Count(2) == c.first_creates);
    RollOut(f, c.min_available, c.max_total);
    CHECK(f.Count(1) == 0);
    CHECK(f.Count(2) == c.replicas);
  }
}

TEST_CASE("plan shows what the next pass would do, without doing it", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2, "update: {max_surge: 1, max_unavailable: 1}\n");
  auto steady = f.reconciler->Plan("web");
  REQUIRE(steady.ok());
  CHECK(steady->new_revision == 0);
  CHECK(steady->create == 0);
  CHECK(steady->destroy.empty());
  // A new template is declared; no pass has run yet.
  f.Declare("v2", 2, "update: {max_surge: 1, max_unavailable: 1}\n");
  auto next = f.reconciler->Plan("web");
  REQUIRE(next.ok());
  CHECK(next->new_revision == 2);
  CHECK(next->target_revision == 2);
  CHECK(next->create == 1);
  CHECK(next->destroy.size() == 1);
  CHECK(f.store->ListRevisions("web")->size() == 1);  // nothing was written
  CHECK(f.driver.starts.size() == 2);                 // nothing was started
  CHECK(f.reconciler->Plan("nope").status().code() == StatusCode::kNotFound);
}

TEST_CASE("instances of an equal template are never replaced", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  // Same template, different replicas and policy: no new revision, no replacement.
  f.Declare("v1", 3, "update: {max_surge: 2}\nhistory_limit: 3\n");
  REQUIRE(f.Converge().ok());
  CHECK(f.store->ListRevisions("web")->size() == 1);
  CHECK(f.Count(1) == 3);
  CHECK(f.driver.stops.empty());
}

TEST_CASE("recreate stops every old instance before starting new ones", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 3, "update: {strategy: recreate}\n");
  f.Declare("v2", 3, "update: {strategy: recreate}\n");
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.stops.size() == 3);  // all old stopped (the fake stops at once)
  CHECK(f.Count(2) == 3);             // then the next pass started the new set
  CHECK(f.Count(1) == 0);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("blue-green starts a full new set and switches at once", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 3, "update: {strategy: blue-green}\n");
  f.Declare("v2", 3, "update: {strategy: blue-green}\n");
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(2) == 3);
  CHECK(f.Count(1) == 3);  // the old set serves until the new one is available
  // Two of three healthy: still nothing destroyed.
  auto live = f.Live();
  int reported = 0;
  for (const auto& i : live) {
    if (i.revision == 2 && reported < 2) reported += f.health.Report(i.name, true);
  }
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 3);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 0);
  CHECK(f.Rollout().state == RolloutState::kCompleted);
}

TEST_CASE("canary waits for promotion, then rolls on", "[reconciler]") {
  ReconcilerFixture f;
  const std::string policy = "update: {strategy: canary, canary: 1}\n";
  ColdStart(f, 3, policy);
  CHECK(f.reconciler->Promote("web", "alice").code() == StatusCode::kFailedPrecondition);
  f.Declare("v2", 3, policy);
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(2) == 1);
  CHECK(f.Count(1) == 3);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.Advance(10s);
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kWaitingPromotion);
  CHECK(f.Count(2) == 1);
  CHECK(f.Count(1) == 3);
  REQUIRE(f.reconciler->Promote("web", "alice").ok());
  RollOut(f, 3, 4);
  CHECK(f.Count(2) == 3);
  auto events = *f.store->ReadEvents({.service = "web", .limit = 100000});
  bool promoted_by_alice = false;
  for (const auto& e : events)
    promoted_by_alice |= e.kind == EventKind::kPromoted && e.actor == "alice";
  CHECK(promoted_by_alice);
}

TEST_CASE("canary with auto_promote continues by itself", "[reconciler]") {
  ReconcilerFixture f;
  const std::string policy = "update: {strategy: canary, canary: 2, auto_promote: true}\n";
  ColdStart(f, 4, policy);
  f.Declare("v2", 4, policy);
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(2) == 2);
  RollOut(f, 4, 6);
  CHECK(f.HasEvent(EventKind::kPromoted));
}

TEST_CASE("a new instance not healthy by healthy_deadline fails and is replaced", "[reconciler]") {
  ReconcilerFixture f;
  f.Declare("v1", 1, "update: {healthy_deadline: 30s}\n");
  REQUIRE(f.Converge().ok());
  std::string first = f.Live().at(0).name;
  f.Advance(30s);
  REQUIRE(f.Converge().ok());
  auto failed = *f.store->GetInstance(first);
  CHECK(failed.state == InstanceState::kFailed);
  CHECK(failed.reason == "not healthy within healthy_deadline 30s (no probe answered yet)");
  CHECK(std::find(f.driver.stops.begin(), f.driver.stops.end(), first) != f.driver.stops.end());
  REQUIRE(f.Live().size() == 1);
  CHECK(f.Live()[0].name != first);
}

TEST_CASE("a failed rollout rolls back to the last available revision and pins", "[reconciler]") {
  ReconcilerFixture f;
  const std::string policy = "update: {healthy_deadline: 20s, progress_deadline: 60s}\n";
  ColdStart(f, 2, policy);
  f.Declare("v2", 2, policy);
  // v2 never becomes healthy: deadlines pass, nothing progresses.
  for (int i = 0; i < 10 && f.Rollout().state != RolloutState::kFailed; ++i) {
    REQUIRE(f.Converge().ok());
    f.Advance(20s);
  }
  REQUIRE(f.Converge().ok());
  ServiceRecord svc = f.Service();
  CHECK(f.HasEvent(EventKind::kRolloutFailed));
  CHECK(f.HasEvent(EventKind::kRolledBack));
  REQUIRE(svc.pinned_revision == 3);
  CHECK(svc.desired_revision == 2);
  CHECK(svc.pin_reason == "automatic rollback: rollout to revision 2 failed");
  auto r3 = *f.store->GetRevision("web", 3);
  CHECK(r3.source == RevisionSource::kRollback);
  CHECK(r3.actor == "auto");
  CHECK(r3.rolled_back_from == 1);
  CHECK(r3.template_hash == f.store->GetRevision("web", 1)->template_hash);
  // The v1 instances were never replaced (same template as the pin); v2 ones are gone.
  CHECK(f.Count(1) == 2);
  CHECK(f.Count(2) == 0);
  CHECK(f.Rollout().to_revision == 3);

  // The manifest keeps declaring v2: the pin holds.
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().pinned_revision == 3);
  // The fix: a new template lifts the pin.
  f.Declare("v3", 2, policy);
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().pinned_revision == 0);
  CHECK(f.Service().desired_revision == 4);
  CHECK(f.HasEvent(EventKind::kPinLifted));
  CHECK(f.Count(4) >= 1);
}

TEST_CASE("operator rollback and unpin", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  f.Declare("v2", 2);
  RollOut(f, 2, 3);
  CHECK(f.reconciler->Rollback("web", 2, "", "bob").status().message() ==
        "revision 2 of web has the current template; nothing to roll back to");
  CHECK(f.reconciler->Rollback("nope", 0, "", "bob").status().code() == StatusCode::kNotFound);
  auto rev = f.reconciler->Rollback("web", 0, "bad deploy", "bob");
  REQUIRE(rev.ok());
  CHECK(rev->number == 3);
  CHECK(rev->rolled_back_from == 1);
  CHECK(f.Service().pin_reason == "rollback by bob: bad deploy");
  RollOut(f, 2, 3);
  CHECK(f.Count(3) == 2);
  StatusOr<int64_t> unpinned = f.reconciler->Unpin("web", "bob");
  REQUIRE(unpinned.ok());
  CHECK(*unpinned == 2);  // what the manifest declares
  CHECK(f.reconciler->Unpin("web", "bob").status().code() == StatusCode::kFailedPrecondition);
  RollOut(f, 2, 3);
  CHECK(f.Count(2) == 2);  // back to what the manifest declares
}

TEST_CASE("pause holds a rollout - paused time does not count toward progress_deadline",
          "[reconciler]") {
  ReconcilerFixture f;
  const std::string policy = "update: {progress_deadline: 60s}\n";
  ColdStart(f, 3, policy);
  f.Declare("v2", 3, policy);
  REQUIRE(f.Converge().ok());
  REQUIRE(f.reconciler->Pause("web", "investigating", "carol").ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  const int v2_at_pause = f.Count(2);
  f.Advance(10min);
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kPaused);
  CHECK(f.Count(2) == v2_at_pause);
  REQUIRE(f.reconciler->Resume("web", "carol").ok());
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state != RolloutState::kFailed);
  CHECK(f.Rollout().paused_ms >= 600'000);
  RollOut(f, 3, 4);
}

TEST_CASE("progress seen before a restart still counts after it", "[reconciler]") {
  ReconcilerFixture f;
  const std::string policy =
      "update: {max_surge: 1, max_unavailable: 0, min_healthy_time: 0s, healthy_deadline: 5m, "
      "progress_deadline: 60s}\n";
  ColdStart(f, 2, policy);
  f.Declare("v2", 2, policy);
  REQUIRE(f.Converge().ok());
  REQUIRE(f.Count(2) == 1);
  const int64_t began = f.Rollout().last_progress_ms;
  CHECK(f.Rollout().seen_new_available == 0);
  f.Advance(50s);
  // kilnd restarts; meanwhile the new instance becomes healthy: that is progress.
  f.MakeReconciler();
  REQUIRE(f.reconciler->Recover().ok());
  f.Load();
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().last_progress_ms == began + 50'000);
  f.Advance(20s);  // 70 s after the rollout began, 20 s after its progress
  REQUIRE(f.Converge().ok());
  CHECK(f.Rollout().state == RolloutState::kProgressing);
}

TEST_CASE("history_limit prunes old revisions and their artifacts, never the ones in use",
          "[reconciler]") {
  ReconcilerFixture f;
  const std::string extra = "history_limit: 2\n";
  ColdStart(f, 1, extra);
  const std::string v1_digest = f.driver.starts[0].artifact_sha256;
  f.Declare("v2", 1, extra);
  RollOut(f, 1, 2);
  f.Declare("v3", 1, extra);
  RollOut(f, 1, 2);
  auto revisions = *f.store->ListRevisions("web");
  REQUIRE(revisions.size() == 2);
  CHECK(revisions[0].number == 3);
  CHECK(revisions[1].number == 2);  // the last available before the current: kept for rollback
  CHECK_FALSE(f.artifacts->Has(v1_digest));
  CHECK(f.artifacts->Has(f.driver.starts.back().artifact_sha256));
  // Instance rows of the pruned revision went with it.
  for (const auto& i : *f.store->ListInstances("web", true)) CHECK(i.revision != 1);
}

TEST_CASE("scaling mid-rollout and without a new revision", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  f.Declare("v1", 5);
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 5);
  CHECK(f.store->ListRevisions("web")->size() == 1);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.Declare("v2", 5);
  REQUIRE(f.Converge().ok());
  f.Declare("v2", 2);  // scale down in the middle
  RollOut(f, 2, 7);
  CHECK(f.Count(2) == 2);
  CHECK(f.Count(1) == 0);
}

TEST_CASE("drift: an exited instance is replaced by a new id of the same revision",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  std::string victim = f.Live()[0].name;
  f.driver.Exit(victim, 3);
  auto gone = *f.store->GetInstance(victim);
  CHECK(gone.state == InstanceState::kFailed);
  CHECK(gone.reason == "exited with code 3");
  CHECK(gone.exit_code == 3);
  REQUIRE(f.Converge().ok());
  auto live = f.Live();
  REQUIRE(live.size() == 2);
  for (const auto& i : live) {
    CHECK(i.name != victim);
    CHECK(i.revision == 1);
  }
  CHECK(f.store->ListRevisions("web")->size() == 1);
}

TEST_CASE("drift: an unhealthy instance is replaced, never restarted in place", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  std::string sick = f.Live()[0].name;
  REQUIRE(f.health.Report(sick, false, "http 503 from 127.0.0.1:1/healthz"));
  auto s = *f.store->GetInstance(sick);
  CHECK(s.state == InstanceState::kUnhealthy);
  CHECK(s.replace_reason == "health failing: http 503 from 127.0.0.1:1/healthz");
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.store->GetInstance(sick)->state == InstanceState::kTerminated);
  CHECK(f.Count(1) == 2);
  CHECK(f.Available() == 2);
}

TEST_CASE("drift: an artifact altered in the store is restored and its instances replaced",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  const std::string digest = f.driver.starts[0].artifact_sha256;
  const auto stored = f.artifacts->PathFor(digest);
  std::filesystem::permissions(stored, std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::add);
  testing::WriteFile(stored, "tampered bits");
  f.Advance(61s);
  // An exit makes the next pass start an instance: the bytes are checked first.
  auto live = f.Live();
  f.driver.Exit(live[0].name, 1);
  REQUIRE(f.Converge().ok());
  CHECK(f.artifacts->Verify(digest).ok());  // restored from the manifest's source
  CHECK(f.HasEvent(EventKind::kArtifactDrift));
  CHECK(f.store->GetInstance(live[1].name)->replace_reason.rfind("artifact drift: ", 0) == 0);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.store->GetInstance(live[1].name)->state == InstanceState::kTerminated);
  CHECK(f.Available() == 2);
}

TEST_CASE("drift: an altered artifact with no source to restore it starts nothing",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  const std::string digest = f.driver.starts[0].artifact_sha256;
  std::filesystem::permissions(f.artifacts->PathFor(digest), std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::add);
  testing::WriteFile(f.artifacts->PathFor(digest), "tampered bits");
  testing::WriteFile(f.tmp / "artifacts/app-v1", "changed source");
  f.Advance(61s);
  f.driver.Exit(f.Live()[0].name, 1);
  Status s = f.Converge();
  CHECK(s.code() == StatusCode::kDataLoss);
  CHECK(s.message().find("no longer matches its digest") != std::string::npos);
  CHECK(f.driver.starts.size() == 1);  // the intent is recorded, the start waits
  REQUIRE(f.Live().size() == 1);
  CHECK(f.Live()[0].state == InstanceState::kPending);
  // The source has the bytes again: the next pass restores and starts.
  testing::WriteFile(f.tmp / "artifacts/app-v1", "app v1");
  f.Advance(61s);
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 2);
  CHECK(f.artifacts->Verify(digest).ok());
}

TEST_CASE("an exit the store could not take is recorded on the next pass", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  std::string victim = f.Live()[0].name;
  f.faults->FailCommits(testing::FaultyStore::Fault::kDiskFull,
                        testing::FaultyStore::kUntilCleared);
  f.driver.Exit(victim, 9);
  CHECK(f.store->GetInstance(victim)->state == InstanceState::kHealthy);  // not recorded yet
  CHECK(f.faults->failed_commits() > 0);
  // Metrics and webhooks saw nothing of the pass that was rolled back.
  CHECK_FALSE(f.Delivered(EventKind::kInstanceExited, victim));
  f.faults->Clear();
  Status first = f.Converge();  // may still report the earlier failure; the retry succeeds
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.store->GetInstance(victim)->state == InstanceState::kFailed);
  CHECK(f.Delivered(EventKind::kInstanceExited, victim));
  CHECK(f.Live().size() == 1);
  CHECK(f.Live()[0].name != victim);
}

TEST_CASE("an operator replaces one instance: a new one first, then the old goes", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  std::string old = f.Live()[0].name;
  REQUIRE(f.reconciler->ReplaceInstance(old, "stuck", "dave").ok());
  REQUIRE(f.Converge().ok());
  CHECK(f.store->GetInstance(old)->state == InstanceState::kHealthy);  // still serving
  CHECK(f.Live().size() == 3);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.store->GetInstance(old)->state == InstanceState::kTerminated);
  CHECK(f.Live().size() == 2);
  CHECK(f.reconciler->ReplaceInstance(old, "", "dave").code() == StatusCode::kFailedPrecondition);
  CHECK(f.reconciler->ReplaceInstance("web-999", "", "dave").code() == StatusCode::kNotFound);
}

TEST_CASE("a broken manifest keeps the last good desired state", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  testing::WriteFile(
      f.tmp / "m/web.yaml",
      "name: web\nversion: \"v2\"\nreplicas: lots\nartifact: {path: ../artifacts/app-v2}\n");
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 2);
  CHECK(f.driver.stops.empty());
  INFO(f.Service().manifest_error);
  CHECK(f.Service().manifest_error.find("replicas: expected an integer") != std::string::npos);
  CHECK(f.HasEvent(EventKind::kManifestError));
  // Fixed: the error clears.
  f.Declare("v1", 2);
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().manifest_error.empty());
}

TEST_CASE("an empty or missing directory never retires every service", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  std::filesystem::remove(f.tmp / "m/web.yaml");
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 2);
  CHECK(f.Service().manifest_error.find("declares no services") != std::string::npos);
  std::filesystem::remove_all(f.tmp / "m");
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(f.Count(1) == 2);
  CHECK(f.driver.stops.empty());
}

TEST_CASE("a service removed from a readable directory is retired", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  f.Declare("v1", 1, "", "api");
  REQUIRE(f.Converge().ok());
  std::filesystem::remove(f.tmp / "m/web.yaml");
  f.Load();
  REQUIRE(f.Converge().ok());
  // Not at once: --retire-after (60s by default) first, shown as the time it will happen.
  CHECK(f.HasEvent(EventKind::kServiceMissing));
  CHECK(f.Live("web").size() == 2);
  CHECK(f.Service("web").retire_at_ms == ToUnixMillis(f.clock.SystemNow()) + 60'000);
  f.Advance(59s);
  REQUIRE(f.Converge().ok());
  CHECK(f.Live("web").size() == 2);
  CHECK_FALSE(f.Service("web").retired);
  f.Advance(1s);  // the timer set by the first pass fires
  REQUIRE(f.Converge().ok());
  CHECK(f.Live("web").empty());
  CHECK(f.Service("web").retired);
  CHECK(f.HasEvent(EventKind::kServiceRetired));
  CHECK(f.Live("api").size() == 1);
}

TEST_CASE("files removed one by one retire nothing when they come back in time", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  f.Declare("v1", 1, "", "api");
  f.Declare("v1", 1, "", "db");
  REQUIRE(f.Converge().ok());
  std::filesystem::rename(f.tmp / "m/web.yaml", f.tmp / "web.yaml.bak");
  f.Load();
  REQUIRE(f.Converge().ok());
  f.Advance(20s);
  std::filesystem::rename(f.tmp / "m/api.yaml", f.tmp / "api.yaml.bak");
  f.Load();
  REQUIRE(f.Converge().ok());
  f.Advance(30s);
  std::filesystem::rename(f.tmp / "web.yaml.bak", f.tmp / "m/web.yaml");
  std::filesystem::rename(f.tmp / "api.yaml.bak", f.tmp / "m/api.yaml");
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(f.HasEvent(EventKind::kRetirementCancelled, "web"));
  CHECK(f.HasEvent(EventKind::kRetirementCancelled, "api"));
  CHECK(f.Service("web").retire_at_ms == 0);
  f.Advance(120s);
  REQUIRE(f.Converge().ok());
  for (const char* name : {"web", "api", "db"}) {
    CHECK_FALSE(f.Service(name).retired);
    CHECK(f.Live(name).size() == 1);
  }
  CHECK_FALSE(f.HasEvent(EventKind::kServiceRetired, "web"));
}

TEST_CASE("a crash-looping service backs off: 10s doubling, reset after it runs well",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  auto exit_current = [&] {
    auto live = f.Live();
    REQUIRE(live.size() == 1);
    f.driver.Exit(live[0].name, 3);
  };
  // One failure of a long-running instance is replaced at once.
  exit_current();
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 2);
  CHECK(f.Service().crash_count == 1);
  // The second failure in a row waits 10s, the third 20s, then 40s.
  exit_current();
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 2);
  CHECK(f.Live().empty());
  ServiceRecord svc = f.Service();
  CHECK(svc.crash_count == 2);
  CHECK(svc.next_start_ms == ToUnixMillis(f.clock.SystemNow()) + 10'000);
  const Condition* degraded = FindCondition(svc.conditions, ConditionType::kDegraded);
  REQUIRE(degraded != nullptr);
  CHECK(degraded->status);
  CHECK(degraded->reason == "CrashLoopBackOff");
  CHECK(degraded->message.find("exited with code 3") != std::string::npos);
  f.Advance(9s);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 2);
  f.Advance(1s);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 3);
  exit_current();
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().next_start_ms == ToUnixMillis(f.clock.SystemNow()) + 20'000);
  f.Advance(20s);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 4);
  exit_current();
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().next_start_ms == ToUnixMillis(f.clock.SystemNow()) + 40'000);

  // Repeated exits are one aggregated event, counted.
  auto events = *f.store->ReadEvents({.service = "web", .limit = 1000});
  int exited_rows = 0;
  for (const auto& e : events) {
    if (e.kind != EventKind::kInstanceExited) continue;
    ++exited_rows;
    CHECK(e.count == 4);
    CHECK(e.first_ms < e.time_ms);
  }
  CHECK(exited_rows == 1);

  // It runs well: healthy for a minute after the last failure resets the back-off.
  f.Advance(40s);
  REQUIRE(f.Converge().ok());
  REQUIRE(f.driver.starts.size() == 5);
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.Advance(60s);
  REQUIRE(f.Converge().ok());
  CHECK(f.Service().crash_count == 0);
  CHECK(FindCondition(f.Service().conditions, ConditionType::kDegraded)->reason !=
        "CrashLoopBackOff");
  exit_current();  // a failure after that is again replaced at once
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == 6);
}

TEST_CASE("the back-off is capped at 5 minutes, and a new revision starts at once",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  for (int i = 0; i < 12; ++i) {
    auto live = f.Live();
    if (live.empty()) {
      f.Advance(300s);
      REQUIRE(f.Converge().ok());
      live = f.Live();
    }
    REQUIRE(live.size() == 1);
    f.driver.Exit(live[0].name, 1);
    REQUIRE(f.Converge().ok());
  }
  CHECK(f.Service().next_start_ms - ToUnixMillis(f.clock.SystemNow()) == 300'000);
  const size_t starts = f.driver.starts.size();
  f.Declare("v2", 1);  // the fix
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.starts.size() == starts + 1);
  CHECK(f.Service().crash_count == 0);
}

TEST_CASE("a start error retrying cannot fix fails the rollout at once and rolls back",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  f.driver.fail_starts_permanently = true;
  f.driver.fail_next_start = "cannot execute /nonexistent/x: No such file or directory";
  f.Declare("v2", 2, "update: {max_surge: 1, max_unavailable: 0}\n");
  REQUIRE(f.Converge().ok());
  // Failed at once, not after progress_deadline; rolled back to revision 1's template.
  CHECK(f.HasEvent(EventKind::kRolloutFailed));
  CHECK(f.HasEvent(EventKind::kRolledBack));
  ServiceRecord svc = f.Service();
  CHECK(svc.pinned_revision == 3);
  CHECK(svc.start_error.empty());  // it was revision 2's; the target is now revision 3
  CHECK(f.Count(1) == 2);          // the old instances never stopped
  auto events = *f.store->ReadEvents({.service = "web", .limit = 1000});
  bool said = false;
  for (const auto& e : events) {
    said |= e.kind == EventKind::kRolloutFailed &&
            e.message.find("cannot start: start web-") != std::string::npos &&
            e.message.find("/nonexistent/x") != std::string::npos;
  }
  CHECK(said);
}

TEST_CASE("a first revision that cannot start is Degraded and retried only every 5 minutes",
          "[reconciler]") {
  ReconcilerFixture f;
  f.driver.fail_starts_permanently = true;
  f.driver.fail_next_start = "the process driver needs an artifact";
  f.Declare("v1", 1);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.start_count == 1);
  ServiceRecord svc = f.Service();
  REQUIRE(FindCondition(svc.conditions, ConditionType::kDegraded) != nullptr);
  CHECK(FindCondition(svc.conditions, ConditionType::kDegraded)->reason == "StartError");
  CHECK(f.Rollout().state == RolloutState::kFailed);
  f.Advance(299s);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.start_count == 1);
  f.Advance(1s);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.start_count == 2);  // it works now: the start error clears
  CHECK(f.Service().start_error.empty());
}

TEST_CASE("every probe result is recorded, and a missed deadline says what the probe saw",
          "[reconciler]") {
  ReconcilerFixture f;
  f.Declare("v1", 1, "update: {healthy_deadline: 8s}\n");
  REQUIRE(f.Converge().ok());
  const std::string name = f.Live()[0].name;
  ProbeResult r{.instance = name, .healthy = false, .reason = "connect refused 127.0.0.1:20001"};
  REQUIRE(f.health.ReportResult(r));
  f.Advance(2s);
  r.reason = "http 503 from 127.0.0.1:20001/healthz";
  REQUIRE(f.health.ReportResult(r));
  REQUIRE(f.health.ReportResult(r));  // the same again writes nothing new
  InstanceRecord inst = *f.store->GetInstance(name);
  CHECK(inst.state == InstanceState::kStarting);
  CHECK(inst.last_probe == "http 503 from 127.0.0.1:20001/healthz");
  CHECK_FALSE(inst.last_probe_ok);
  CHECK(inst.first_probe_failure == "connect refused 127.0.0.1:20001");
  CHECK(inst.probe_failing_since_ms == ToUnixMillis(f.clock.SystemNow()) - 2000);
  f.Advance(6s);
  REQUIRE(f.Converge().ok());
  inst = *f.store->GetInstance(name);
  CHECK(inst.state == InstanceState::kFailed);
  CHECK(inst.reason.find("last probe: http 503 from 127.0.0.1:20001/healthz") != std::string::npos);
  CHECK(inst.reason.find("first: connect refused") != std::string::npos);
}

TEST_CASE("a probe that fails for kilnd's own reason blames no instance", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  for (const auto& inst : f.Live()) {
    for (int i = 0; i < 5; ++i) {
      REQUIRE(f.health.ReportResult({.instance = inst.name,
                                     .healthy = false,
                                     .reason = "connect failed: Too many open files",
                                     .local_error = true}));
    }
  }
  REQUIRE(f.Converge().ok());
  for (const auto& inst : f.Live()) {
    CHECK(inst.state == InstanceState::kHealthy);
    CHECK(inst.replace_reason.empty());
    // Nothing was written for a local failure: the last result is still the instance's own.
    CHECK(inst.last_probe_ok);
    CHECK(inst.last_probe == "http 200");
  }
  CHECK(f.reconciler->local_probe_error().message == "connect failed: Too many open files");
  CHECK(f.reconciler->local_probe_error().count == 10);
  CHECK(f.Live().size() == 2);
  CHECK(f.driver.starts.size() == 2);
}

TEST_CASE("periodic verification finds a tampered artifact and replaces what runs it",
          "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  const std::string digest = f.driver.starts[0].artifact_sha256;
  auto in_use = f.reconciler->ArtifactsInUse();
  REQUIRE(std::find(in_use.begin(), in_use.end(), digest) != in_use.end());
  const auto stored = f.artifacts->PathFor(digest);
  std::filesystem::permissions(stored, std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::add);
  testing::WriteFile(stored, "tampered bits");
  // What the daemon's verifier thread does, then hands back.
  auto identity = Reconciler::IdentityOf(stored);
  Status v = f.artifacts->Verify(digest);
  REQUIRE(v.code() == StatusCode::kDataLoss);
  f.reconciler->OnArtifactVerified(digest, v, identity);
  CHECK(f.artifacts->Verify(digest).ok());  // restored from the source
  CHECK(f.HasEvent(EventKind::kArtifactDrift));
  for (const auto& inst : f.Live()) CHECK(inst.replace_reason.rfind("artifact drift: ", 0) == 0);
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  CHECK(f.Available() == 2);
  for (const auto& inst : f.Live()) CHECK(inst.replace_reason.empty());
}

TEST_CASE("no instance is started without its intent committed", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  // The disk is full: the pass fails before acting.
  f.faults->FailCommits(testing::FaultyStore::Fault::kDiskFull,
                        testing::FaultyStore::kUntilCleared);
  f.Declare("v1", 30);
  Status s = f.Converge();
  CHECK(s.code() == StatusCode::kResourceExhausted);
  CHECK(f.driver.starts.size() == 1);
  CHECK(f.Live().size() == 1);
  // Space again: it resumes.
  f.faults->Clear();
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.Live().size() == 30);
}

// One commit fails (busy, disk full, I/O error): the pass reports the store's error, nothing is
// started or stopped and nothing of the pass is kept; the next pass converges.
TEST_CASE("a pass whose commit fails acts on nothing and the next pass converges",
          "[reconciler][faults]") {
  using Fault = testing::FaultyStore::Fault;
  auto [fault, code, text] = GENERATE(table<Fault, StatusCode, std::string>({
      {Fault::kBusy, StatusCode::kUnavailable, "database is locked"},
      {Fault::kDiskFull, StatusCode::kResourceExhausted, "database or disk is full"},
      {Fault::kIoError, StatusCode::kUnavailable, "disk I/O error"},
  }));
  INFO(text);
  ReconcilerFixture f;
  ColdStart(f, 3);
  const size_t events = f.EventKinds().size();

  // Scaling down would stop two.
  f.Declare("v1", 1);
  f.faults->FailCommits(fault);
  Status s = f.Converge();
  CHECK(s.code() == code);
  CHECK(s.message().find(text) != std::string::npos);
  CHECK(s.message().find(f.store->path()) != std::string::npos);
  CHECK(f.faults->WriteFailure().code() == code);
  CHECK(f.driver.stops.empty());
  CHECK(f.driver.starts.size() == 3);
  CHECK(f.Count(1) == 3);
  for (const auto& i : f.Live()) CHECK(i.state == InstanceState::kHealthy);
  CHECK(f.EventKinds().size() == events);
  // The fault has cleared: the retried pass converges.
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.faults->WriteFailure().ok());
  CHECK(f.Count(1) == 1);
  CHECK(f.driver.stops.size() == 2);

  // A new version would write revision 2 and start an instance of it.
  f.Declare("v2", 1);
  f.faults->FailCommits(fault);
  CHECK(f.Converge().code() == code);
  CHECK(f.driver.starts.size() == 3);
  CHECK(f.store->ListRevisions("web")->size() == 1);
  CHECK(f.Count(1) == 1);
  f.scheduler.queue.emplace_back("web");
  REQUIRE(f.Converge().ok());
  CHECK(f.store->ListRevisions("web")->size() == 2);
  CHECK(f.Count(2) == 1);
  CHECK(f.driver.starts.size() == 4);
  CHECK(f.faults->failed_commits() == 2);
}

TEST_CASE("a busy store is retried by the work queue after its backoff", "[reconciler][faults]") {
  ReconcilerFixture f;
  ColdStart(f, 1);
  f.Declare("v1", 3);  // recorded as the desired state; no pass runs it
  f.reconciler.reset();
  // kilnd's wiring: a work queue on simulated time runs the passes.
  testing::SimulatedTimeSource time;
  boost::asio::io_context io;
  Reconciler* reconciler = nullptr;
  WorkQueue queue(
      io, time, {}, [&](const std::string& name) { return reconciler->Reconcile(name); },
      [&] { return reconciler->ServiceNames(); });
  Reconciler real(*f.faults, f.driver, f.health, *f.artifacts, f.clock, queue, {});
  reconciler = &real;
  REQUIRE(real.Recover().ok());
  real.ApplyManifests(LoadManifestDir(f.tmp / "m"));
  f.faults->FailCommits(testing::FaultyStore::Fault::kBusy);
  time.AdvanceAndRun(Duration(4), io);
  CHECK(f.faults->failed_commits() == 1);
  CHECK(queue.Retries() == 1);
  CHECK(f.driver.starts.size() == 1);
  CHECK(f.Live().size() == 1);
  time.AdvanceAndRun(Duration(1), io);  // the first backoff is 5 ms
  CHECK(f.driver.starts.size() == 3);
  CHECK(f.Live().size() == 3);
  CHECK(queue.Retries() == 1);
}

TEST_CASE("a full disk during an artifact put refuses the revision, the old keeps running",
          "[reconciler][faults]") {
  ReconcilerFixture f;
  ColdStart(f, 2);
  const auto stored = f.tmp / "state/artifacts";
  auto files = [](const std::filesystem::path& dir) {
    size_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
    return n;
  };
  REQUIRE(files(stored / "sha256") == 1);
  // v2's artifact is several chunks; the disk fills after its first 64 KiB.
  testing::WriteFile(f.tmp / "artifacts/app-v2", std::string(size_t{256} * 1024, 'b'));
  size_t room = size_t{64} * 1024;
  f.artifacts->SetWriterForTest([&room](int fd, const void* data, size_t size) -> ssize_t {
    if (room == 0) {
      errno = ENOSPC;
      return -1;
    }
    ssize_t w = ::write(fd, data, std::min(size, room));
    if (w > 0) room -= static_cast<size_t>(w);
    return w;
  });
  f.Declare("v2", 2);
  // The pass keeps converging to revision 1 and says why revision 2 was not written.
  REQUIRE(f.Converge().ok());
  CHECK(room == 0);  // it failed partway through the copy
  const std::string error = f.Service().manifest_error;
  INFO(error);
  CHECK(error.find("revision of web refused") != std::string::npos);
  CHECK(error.find((f.tmp / "artifacts/app-v2").string()) != std::string::npos);
  CHECK(error.find("No space left on device") != std::string::npos);
  CHECK(f.HasEvent(EventKind::kManifestError));
  CHECK(f.store->ListRevisions("web")->size() == 1);
  CHECK(files(stored / "sha256") == 1);
  CHECK(files(stored / "tmp") == 0);
  CHECK(f.Count(1) == 2);
  CHECK(f.Available() == 2);
  CHECK(f.driver.starts.size() == 2);
  CHECK(f.driver.stops.empty());
  // Space again: the next pass writes revision 2 and rolls out.
  f.artifacts->SetWriterForTest(nullptr);
  f.scheduler.queue.emplace_back("web");
  RollOut(f, 2, 3);
  CHECK(f.store->ListRevisions("web")->size() == 2);
  CHECK(f.Count(2) == 2);
  CHECK(f.Count(1) == 0);
  CHECK(files(stored / "tmp") == 0);
  CHECK(f.Service().manifest_error.empty());
}

// Crash between intent and action, at each point: a new reconciler over the same store and
// the same (fake) running instances recovers.
TEST_CASE("recovery after a crash at each point of a step", "[reconciler]") {
  ReconcilerFixture f;
  ColdStart(f, 2);

  SECTION("after the intent to start, before the start") {
    f.driver.defer_starts = true;
    f.Declare("v1", 3);
    REQUIRE(f.Converge().ok());
    REQUIRE(f.driver.deferred.size() == 1);
    std::string pending = f.driver.deferred[0].first.instance;
    f.driver.deferred.clear();  // kilnd died before the driver ran it
    f.driver.defer_starts = false;
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    CHECK(f.store->GetInstance(pending)->state == InstanceState::kFailed);
    f.Load();
    REQUIRE(f.Converge().ok());
    CHECK(f.Count(1) == 3);
  }
  SECTION("after the start, before it was recorded") {
    f.driver.defer_starts = true;
    f.Declare("v1", 3);
    REQUIRE(f.Converge().ok());
    auto [spec, done] = f.driver.deferred.at(0);
    f.driver.deferred.clear();
    REQUIRE(f.driver.Run(spec).ok());  // the process runs; kilnd died before recording it
    f.driver.defer_starts = false;
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    auto adopted = *f.store->GetInstance(spec.instance);
    CHECK(adopted.state == InstanceState::kStarting);
    CHECK(f.driver.adopted.count(spec.instance));
    f.Load();
    REQUIRE(f.Converge().ok());
    CHECK(f.Count(1) == 3);
    CHECK(f.driver.starts.size() == 3);  // nothing was started twice
  }
  SECTION("after the intent to stop, before the stop") {
    std::string victim = f.Live()[0].name;
    REQUIRE(f.store->TransitionInstance(victim, InstanceState::kDraining, {}).ok());
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    CHECK(f.store->GetInstance(victim)->state == InstanceState::kTerminated);
    CHECK(f.driver.running.count(victim) == 0);
  }
  SECTION("an instance gone while kilnd was down is lost and replaced") {
    std::string victim = f.Live()[0].name;
    f.driver.running.erase(victim);
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    CHECK(f.store->GetInstance(victim)->state == InstanceState::kLost);
    f.Load();
    REQUIRE(f.Converge().ok());
    CHECK(f.Count(1) == 2);
  }
  SECTION("an instance running with kiln's identity but unknown to the store is stopped") {
    InstanceSpec ghost;
    ghost.instance = "web-77";
    ghost.service = "web";
    REQUIRE(f.driver.Run(ghost).ok());
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    CHECK(f.driver.running.count("web-77") == 0);
    CHECK(f.HasEvent(EventKind::kUnknownInstanceStopped));
  }
  SECTION("a broken manifest at start-up keeps the remembered desired state") {
    f.MakeReconciler();
    REQUIRE(f.reconciler->Recover().ok());
    testing::WriteFile(f.tmp / "m/web.yaml", "name: web\nversion: [\n");
    f.Load();
    REQUIRE(f.Converge().ok());
    CHECK(f.Count(1) == 2);
    CHECK_FALSE(f.Service().retired);
  }
}

}  // namespace
}  // namespace kiln
