// Decide is a pure function of records: these cases build them by hand, with no store, clock or
// driver. The reconciler scenarios (reconciler_test.cc, plan_pass_test.cc) run it through
// Reconcile and Plan.

#include "controller/decide.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

constexpr int64_t kNow = 1'000'000;

RevisionRecord Revision(int64_t number, const std::string& hash, int64_t available_ms = 0) {
  RevisionRecord r;
  r.service = "web";
  r.number = number;
  r.template_hash = hash;
  r.available_ms = available_ms;
  return r;
}

InstanceRecord Instance(int64_t id, int64_t revision, InstanceState state) {
  InstanceRecord i;
  i.id = id;
  i.name = "web-" + std::to_string(id);
  i.service = "web";
  i.revision = revision;
  i.state = state;
  i.created_ms = kNow - 100'000 + id;
  if (state != InstanceState::kPending) i.started_ms = kNow - 90'000;
  if (state == InstanceState::kHealthy) i.healthy_since_ms = kNow - 80'000;
  return i;
}

// web: 2 replicas, revision 1 ("h1") available and running on 2 healthy instances, revision 2
// ("h2") the target, and a rollout to it in progress since kNow - 1000 (so the loader also read
// what a rollback would go back to).
PassInput RollingToRevision2() {
  PassInput in;
  in.spec.name = "web";
  in.spec.replicas = 2;
  in.spec.update.max_surge = {1, false};
  in.service.name = "web";
  in.service.desired_revision = 2;
  in.service_exists = true;
  in.template_hash = in.desired_hash = "h2";
  in.target = Revision(2, "h2");
  in.last_available = {Revision(1, "h1", kNow - 500'000)};
  in.next_revision = 3;
  in.template_hashes = {{1, "h1"}, {2, "h2"}};
  in.instances = {Instance(1, 1, InstanceState::kHealthy), Instance(2, 1, InstanceState::kHealthy)};
  RolloutRecord r;
  r.id = 7;
  r.service = "web";
  r.from_revision = 1;
  r.to_revision = 2;
  r.state = RolloutState::kProgressing;
  r.started_ms = r.last_progress_ms = kNow - 1000;
  r.seen_new_available = 0;
  r.seen_old_total = 2;
  in.rollout = r;
  in.now_ms = kNow;
  return in;
}

PassResult MustDecide(const PassInput& in) {
  StatusOr<PassResult> r = Decide(in);
  REQUIRE(r.ok());
  return *std::move(r);
}

bool HasEvent(const PassResult& r, EventKind kind) {
  for (const PassEvent& e : r.events) {
    if (e.kind == kind) return true;
  }
  return false;
}

const Condition& ConditionOf(const PassResult& r, ConditionType type) {
  for (const Condition& c : r.service.conditions) {
    if (c.type == type) return c;
  }
  FAIL("no such condition");
  return r.service.conditions.front();
}

TEST_CASE("decide: a rolling step surges one and keeps the rollout", "[decide]") {
  const PassResult r = MustDecide(RollingToRevision2());
  CHECK(r.create == 1);
  CHECK(r.create_revision == 2);
  CHECK(r.drain.empty());  // max_unavailable 0: nothing goes before a new one is available
  CHECK_FALSE(r.rollout_is_new);
  CHECK(r.rollout.state == RolloutState::kProgressing);
  CHECK(r.events.empty());
  CHECK(r.wake_at_ms == kNow - 1000 + 600'000);  // the progress deadline
  CHECK(ConditionOf(r, ConditionType::kProgressing).reason == "NewRevisionProgressing");
}

TEST_CASE("decide: a new target supersedes the unfinished rollout and starts afresh", "[decide]") {
  PassInput in = RollingToRevision2();
  in.rollout->to_revision = 3;  // the rollout in progress went elsewhere, and was promoted
  in.rollout->promoted = true;
  in.spec.update.strategy = Strategy::kCanary;
  in.service.crash_count = 3;
  in.service.next_start_ms = kNow + 50'000;
  const PassResult r = MustDecide(in);
  REQUIRE(r.superseded);
  CHECK(r.superseded->id == 7);
  CHECK(r.superseded->state == RolloutState::kSuperseded);
  CHECK(r.rollout_is_new);
  CHECK(r.rollout.id == 0);
  CHECK(r.rollout.from_revision == 3);
  CHECK(r.rollout.to_revision == 2);
  CHECK_FALSE(r.rollout.promoted);
  CHECK(r.service.crash_count == 0);  // a new target does not wait out the old back-off
  CHECK(HasEvent(r, EventKind::kRolloutStarted));
  CHECK(r.plan.summary == "canary: starting 1 canary instance(s)");
  CHECK(r.create == 1);
}

TEST_CASE("decide: an instance past healthy_deadline fails and is replaced", "[decide]") {
  PassInput in = RollingToRevision2();
  in.instances.push_back(Instance(3, 2, InstanceState::kStarting));
  in.instances.back().started_ms = kNow - 60'000;
  const PassResult r = MustDecide(in);
  REQUIRE(r.failed.size() == 1);
  CHECK(r.failed[0].instance == "web-3");
  CHECK(r.failed[0].to == InstanceState::kFailed);
  CHECK(r.failed[0].reason == "not healthy within healthy_deadline 1m (no probe answered yet)");
  CHECK(r.service.crash_count == 1);
  CHECK(HasEvent(r, EventKind::kInstanceFailed));
  CHECK(r.create == 1);  // its replacement: the first failure is replaced at once
}

TEST_CASE("decide: a crash-looping service creates nothing before next_start_ms", "[decide]") {
  PassInput in = RollingToRevision2();
  in.service.crash_count = 2;
  in.service.last_crash_ms = kNow - 1000;
  in.service.crash_reason = "web-3 exited with code 1";
  in.service.next_start_ms = kNow + 9000;
  const PassResult r = MustDecide(in);
  CHECK(r.create == 0);
  CHECK(r.plan.summary == "crash-looping: web-3 exited with code 1; next start in 9s");
  CHECK(r.wake_at_ms == kNow + 9000);
  CHECK(ConditionOf(r, ConditionType::kDegraded).reason == "CrashLoopBackOff");
}

TEST_CASE("decide: a rollout past its progress deadline fails and rolls back", "[decide]") {
  PassInput in = RollingToRevision2();
  in.rollout->last_progress_ms = kNow - 600'000;
  const PassResult r = MustDecide(in);
  CHECK(r.rollout.state == RolloutState::kFailed);
  CHECK(HasEvent(r, EventKind::kRolloutFailed));
  REQUIRE(r.rollback);
  CHECK(r.rollback->from.number == 1);  // the last one fully available, of another template
  CHECK(r.rollback->number == 3);       // written as the next revision
  CHECK(r.rollback->reason == "rollout to revision 2 failed");
  CHECK(r.service.pinned_revision == 3);
  CHECK(r.service.pin_reason == "automatic rollback: rollout to revision 2 failed");
  CHECK(r.requeue_now);
  CHECK(r.create == 0);  // no step towards the failed target
  CHECK(r.drain.empty());
  CHECK(ConditionOf(r, ConditionType::kDegraded).reason == "Pinned");

  SECTION("with nothing to roll back to, it says why") {
    in.last_available.clear();
    const PassResult none = MustDecide(in);
    CHECK(none.rollout.state == RolloutState::kFailed);
    CHECK_FALSE(none.rollback);
    CHECK(none.no_rollback == "no earlier revision of web was ever fully available");
    CHECK(ConditionOf(none, ConditionType::kDegraded).reason == "RolloutFailed");
  }
}

TEST_CASE("decide: the last old instance goes and the rollout completes", "[decide]") {
  PassInput in = RollingToRevision2();
  in.instances = {Instance(1, 1, InstanceState::kHealthy), Instance(3, 2, InstanceState::kHealthy),
                  Instance(4, 2, InstanceState::kHealthy)};
  PassResult r = MustDecide(in);
  REQUIRE(r.drain.size() == 1);
  CHECK(r.drain[0].instance == "web-1");
  CHECK(r.drain[0].reason == "replaced by revision 2");
  CHECK(r.rollout.last_progress_ms == kNow);  // (2 new available, 1 old) differs from last seen
  CHECK(r.rollout.state == RolloutState::kProgressing);
  // The next pass, with it gone.
  in.instances.erase(in.instances.begin());
  in.rollout = r.rollout;
  r = MustDecide(in);
  CHECK(r.rollout.state == RolloutState::kCompleted);
  CHECK(r.rollout.finished_ms == kNow);
  CHECK(r.mark_available);
  CHECK(HasEvent(r, EventKind::kRolloutCompleted));
  CHECK(ConditionOf(r, ConditionType::kAvailable).status);
}

TEST_CASE("decide: a new template becomes the next revision, lifts a pin, and is the target",
          "[decide]") {
  PassInput in = RollingToRevision2();
  in.rollout->state = RolloutState::kCompleted;
  in.service.pinned_revision = 3;  // an earlier rollback, of revision 1's template
  in.target = Revision(3, "h1", kNow - 500'000);
  in.instances = {Instance(1, 3, InstanceState::kHealthy), Instance(2, 3, InstanceState::kHealthy)};
  in.template_hashes = {{3, "h1"}};
  in.next_revision = 4;
  in.template_hash = "h4";  // the manifest now declares a fix
  in.spec.file = "/m/web.yaml";
  in.spec.tmpl.version = "v4";
  in.manifest_sha256 = "abc";
  const PassResult r = MustDecide(in);
  REQUIRE(r.revision);
  CHECK(r.revision->number == 4);
  CHECK(r.revision->template_hash == "h4");
  CHECK(r.revision->source == RevisionSource::kManifest);
  CHECK(r.revision->manifest_file == "/m/web.yaml");
  CHECK(r.revision->manifest_sha256 == "abc");
  CHECK(r.service.desired_revision == 4);
  CHECK(r.service.pinned_revision == 0);
  CHECK(r.service.pin_reason.empty());
  CHECK(r.target_revision == 4);
  REQUIRE(r.events.size() >= 3);
  CHECK(r.events[0].kind == EventKind::kRevisionCreated);
  CHECK(r.events[0].message == "revision 4 of web (version v4) from /m/web.yaml");
  CHECK(r.events[1].kind == EventKind::kPinLifted);
  CHECK(r.events[2].kind == EventKind::kRolloutStarted);
  CHECK(r.rollout_is_new);
  CHECK(r.rollout.to_revision == 4);
  CHECK(r.create == 1);  // max_surge 1 towards revision 4
  CHECK(r.create_revision == 4);

  SECTION("the same template again writes nothing") {
    in.desired_hash = "h2";
    in.template_hash = "h2";
    CHECK_FALSE(MustDecide(in).revision);
  }
}

TEST_CASE("decide: a refused artifact is a manifest error, or the pass's error at first",
          "[decide]") {
  PassInput in = RollingToRevision2();
  in.template_hash = "h9";
  in.artifact = NotFoundError("cannot read artifact /a/app: No such file or directory");
  const PassResult r = MustDecide(in);
  CHECK_FALSE(r.revision);
  CHECK(r.target_revision == 2);  // it keeps converging to what it has
  CHECK(r.service.manifest_error ==
        "revision of web refused: cannot read artifact /a/app: No such file or directory");
  CHECK(HasEvent(r, EventKind::kManifestError));
  CHECK(ConditionOf(r, ConditionType::kDegraded).reason == "ManifestError");

  in.service.desired_revision = 0;  // nothing to converge to yet
  in.service_exists = false;
  StatusOr<PassResult> first = Decide(in);
  REQUIRE_FALSE(first.ok());
  CHECK(first.status().code() == StatusCode::kNotFound);
  CHECK(first.status().message() ==
        "revision of web refused: cannot read artifact /a/app: No such file or directory");
}

TEST_CASE("decide: a service no longer declared waits, then is retired and drained", "[decide]") {
  PassInput in;
  in.declared = false;
  in.service_exists = true;
  in.service.name = "web";
  in.service.manifest_file = "/m/web.yaml";
  in.instances = {Instance(1, 1, InstanceState::kHealthy), Instance(2, 1, InstanceState::kPending),
                  Instance(3, 1, InstanceState::kDraining)};
  in.now_ms = kNow;
  in.options.retire_after = Duration(60'000);
  PassResult r = MustDecide(in);
  CHECK(r.service.retire_at_ms == kNow + 60'000);
  CHECK(r.wake_at_ms == kNow + 60'000);
  REQUIRE(r.events.size() == 1);
  CHECK(r.events[0].kind == EventKind::kServiceMissing);
  CHECK(r.events[0].message ==
        "web is no longer declared in the manifests (was in /m/web.yaml); retiring it in 1m "
        "unless it comes back");
  CHECK(r.drain.empty());

  in.service = r.service;
  in.now_ms = kNow + 60'000;
  r = MustDecide(in);
  CHECK(r.service.retired);
  REQUIRE(r.events.size() == 1);
  CHECK(r.events[0].kind == EventKind::kServiceRetired);
  REQUIRE(r.drain.size() == 2);  // not the one already draining
  CHECK(r.drain[0].instance == "web-1");
  CHECK(r.drain[1].instance == "web-2");
  CHECK(r.drain[0].reason == "service retired");
  CHECK(r.plan.destroy == std::vector<std::string>{"web-1", "web-2"});  // none of them starts

  in.service_exists = false;  // never recorded: nothing to do
  in.service = {.name = "web"};
  r = MustDecide(in);
  CHECK(r.events.empty());
  CHECK(r.drain.empty());
  CHECK(r.wake_at_ms == 0);
}

TEST_CASE("decide: the back-off follows from the failures recorded", "[decide]") {
  const DecideOptions o;  // 10 s doubling, at most 5 min
  ServiceRecord svc;
  CHECK(NextStartMs(svc, o) == 0);
  CountFailure(svc, "web-1 exited with code 1", 1000);
  CHECK(svc.crash_count == 1);
  CHECK(svc.crash_reason == "web-1 exited with code 1");
  CHECK(NextStartMs(svc, o) == 1000);  // the first failure is replaced at once
  CountFailure(svc, "web-2 exited with code 1", 2000);
  CHECK(NextStartMs(svc, o) == 12'000);
  CountFailure(svc, "web-3 exited with code 1", 3000);
  CHECK(NextStartMs(svc, o) == 23'000);
  for (int i = 0; i < 10; ++i) CountFailure(svc, "web-4 exited with code 1", 4000);
  CHECK(NextStartMs(svc, o) == 304'000);

  ServiceRecord cannot_start;
  CountFailure(cannot_start, "cannot execute /x", 1000, /*permanent=*/true, 2);
  CHECK(cannot_start.start_error == "cannot execute /x");
  CHECK(cannot_start.start_error_revision == 2);
  CHECK(NextStartMs(cannot_start, o) == 301'000);
}

}  // namespace
}  // namespace kiln
