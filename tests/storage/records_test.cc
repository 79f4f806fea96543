#include "storage/records.h"

#include <catch2/catch.hpp>
#include <cctype>
#include <set>
#include <string>

namespace kiln {
namespace {

// Every value of a table round-trips through its name, names are unique and non-empty, and a
// name outside the table (or a near miss of one) is rejected.
template <typename E, size_t N, typename NameFn, typename ParseFn>
void CheckTable(const std::array<NamedValue<E>, N>& table, NameFn name, ParseFn parse) {
  std::set<std::string_view> seen;
  for (size_t i = 0; i < N; ++i) {
    const E value = static_cast<E>(i);
    const std::string_view n = name(value);
    INFO(n);
    CHECK(table[i].value == value);
    CHECK_FALSE(n.empty());
    CHECK(n != "unknown");
    CHECK(seen.insert(n).second);
    REQUIRE(parse(n).has_value());
    CHECK(*parse(n) == value);
    CHECK_FALSE(parse(std::string(n) + " ").has_value());
    std::string upper(n);
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (upper != n) CHECK_FALSE(parse(upper).has_value());
  }
  CHECK_FALSE(parse("").has_value());
  CHECK_FALSE(parse("bogus").has_value());
  CHECK(name(static_cast<E>(N)) == "unknown");
}

TEST_CASE("instance states: every name round-trips, an unknown one is rejected", "[records]") {
  CheckTable(kInstanceStateNames, InstanceStateName, ParseInstanceState);
  CHECK(InstanceStateName(InstanceState::kDraining) == "draining");
}

TEST_CASE("rollout states: every name round-trips, an unknown one is rejected", "[records]") {
  CheckTable(kRolloutStateNames, RolloutStateName, ParseRolloutState);
  // The names the database, the API and logs have always used.
  CHECK(RolloutStateName(RolloutState::kProgressing) == "progressing");
  CHECK(RolloutStateName(RolloutState::kPaused) == "paused");
  CHECK(RolloutStateName(RolloutState::kWaitingPromotion) == "waiting_promotion");
  CHECK(RolloutStateName(RolloutState::kCompleted) == "completed");
  CHECK(RolloutStateName(RolloutState::kFailed) == "failed");
  CHECK(RolloutStateName(RolloutState::kSuperseded) == "superseded");
}

TEST_CASE("revision sources: every name round-trips, an unknown one is rejected", "[records]") {
  CheckTable(kRevisionSourceNames, RevisionSourceName, ParseRevisionSource);
  CHECK(RevisionSourceName(RevisionSource::kManifest) == "manifest");
  CHECK(RevisionSourceName(RevisionSource::kRollback) == "rollback");
}

TEST_CASE("condition types: every name round-trips, an unknown one is rejected", "[records]") {
  CheckTable(kConditionTypeNames, ConditionTypeName, ParseConditionType);
  CHECK(ConditionTypeName(ConditionType::kAvailable) == "Available");
  CHECK(ConditionTypeName(ConditionType::kProgressing) == "Progressing");
  CHECK(ConditionTypeName(ConditionType::kDegraded) == "Degraded");
}

TEST_CASE("event kinds: every name round-trips, an unknown one is rejected", "[records]") {
  CheckTable(kEventKindNames, EventKindName, ParseEventKind);
  // Every kind kiln has ever written, as the database, WatchEvents and metrics know them.
  const std::set<std::string_view> expected = {"artifact_drift",
                                               "host_down",
                                               "host_up",
                                               "instance_adopted",
                                               "instance_created",
                                               "instance_draining",
                                               "instance_drained",
                                               "instance_exited",
                                               "instance_failed",
                                               "instance_healthy",
                                               "instance_lost",
                                               "instance_start_failed",
                                               "instance_started",
                                               "instance_terminated",
                                               "instance_unhealthy",
                                               "manifest_error",
                                               "paused",
                                               "pin_lifted",
                                               "promoted",
                                               "replace_requested",
                                               "resumed",
                                               "retirement_cancelled",
                                               "revision_created",
                                               "rolled_back",
                                               "rollout_completed",
                                               "rollout_failed",
                                               "rollout_started",
                                               "service_missing",
                                               "service_retired",
                                               "unknown_instance_stopped",
                                               "unpinned",
                                               "waiting_promotion"};
  std::set<std::string_view> names;
  for (const auto& entry : kEventKindNames) names.insert(entry.name);
  CHECK(names == expected);
}

TEST_CASE("strategies: every name round-trips, an unknown one is rejected", "[records]") {
  for (Strategy s :
       {Strategy::kRolling, Strategy::kRecreate, Strategy::kBlueGreen, Strategy::kCanary}) {
    INFO(StrategyName(s));
    REQUIRE(ParseStrategy(StrategyName(s)).has_value());
    CHECK(*ParseStrategy(StrategyName(s)) == s);
  }
  CHECK(StrategyName(Strategy::kBlueGreen) == "blue-green");
  CHECK_FALSE(ParseStrategy("blue_green").has_value());
  CHECK_FALSE(ParseStrategy("").has_value());
}

TEST_CASE("instance transitions follow the lifecycle, without a store", "[records]") {
  InstanceRecord r;
  r.name = "web-1";
  REQUIRE(ApplyTransition(r, InstanceState::kStarting,
                          {.reason = "started", .handle = "h", .pid = 42, .port = 20001}, 100)
              .ok());
  CHECK(r.state == InstanceState::kStarting);
  CHECK(r.started_ms == 100);
  CHECK(r.pid == 42);
  CHECK(r.handle == "h");
  CHECK(r.port == 20001);
  REQUIRE(ApplyTransition(r, InstanceState::kHealthy, {.reason = "ok"}, 200).ok());
  CHECK(r.healthy_since_ms == 200);
  CHECK(r.handle == "h");  // unset fields are kept
  REQUIRE(ApplyTransition(r, InstanceState::kUnhealthy, {}, 300).ok());
  CHECK(r.healthy_since_ms == 0);
  REQUIRE(ApplyTransition(r, InstanceState::kFailed, {.exit_code = 3}, 400).ok());
  CHECK(r.finished_ms == 400);
  CHECK(r.exit_code == 3);
  CHECK(CheckReplaceable(r).code() == StatusCode::kFailedPrecondition);
  CHECK(CheckReplaceable(r).message() == "instance web-1 is failed, not running");

  const InstanceRecord before = r;
  Status s = ApplyTransition(r, InstanceState::kStarting, {.reason = "again"}, 500);
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(s.message() == "instance web-1: illegal transition failed -> starting");
  CHECK(r.state == before.state);  // refused: unchanged
  CHECK(r.reason == before.reason);
  CHECK(r.state_changed_ms == before.state_changed_ms);
}

TEST_CASE("rollout states: completed, failed and superseded are final", "[records]") {
  for (const auto& [state, name] : kRolloutStateNames) {
    INFO(name);
    const bool final = state == RolloutState::kCompleted || state == RolloutState::kFailed ||
                       state == RolloutState::kSuperseded;
    CHECK(IsFinal(state) == final);
    CHECK(IsActive(state) == !final);
  }
}

TEST_CASE("revision rules: written once, deleted only when unreferenced", "[records]") {
  RevisionRecord r{.service = "web", .number = 2, .template_hash = "h", .template_json = "{}"};
  CHECK(CheckNewRevision(r, false).ok());
  CHECK(CheckNewRevision(r, true).message() ==
        "web revision 2 is already written; revisions are immutable");
  r.template_json.clear();
  CHECK(CheckNewRevision(r, false).code() == StatusCode::kInvalidArgument);
  CHECK(CheckRevisionDeletable("web", 2, 0).ok());
  CHECK(CheckRevisionDeletable("web", 2, 3).message() ==
        "web revision 2 is still referenced by 3 instance(s)");
}

TEST_CASE("a repeat within the window folds into the newer event", "[records]") {
  EventRecord first{.time_ms = 1000, .service = "web", .aggregate_key = "k", .count = 1};
  EventRecord again{.time_ms = 5000, .service = "web", .aggregate_key = "k"};
  REQUIRE(AggregateRepeat(first, 10'000, again));
  CHECK(again.count == 2);
  CHECK(again.first_ms == 1000);
  EventRecord third{.time_ms = 9000, .service = "web", .aggregate_key = "k"};
  REQUIRE(AggregateRepeat(again, 10'000, third));
  CHECK(third.count == 3);
  CHECK(third.first_ms == 1000);
  EventRecord late{.time_ms = 30'000, .service = "web", .aggregate_key = "k"};
  CHECK_FALSE(AggregateRepeat(third, 10'000, late));
  CHECK(late.count == 1);
  EventRecord other{.time_ms = 9500, .service = "web", .aggregate_key = "j"};
  CHECK_FALSE(AggregateRepeat(third, 10'000, other));
}

TEST_CASE("a condition is found by its type", "[records]") {
  std::vector<Condition> c = {{ConditionType::kAvailable, true, "MinimumReplicasAvailable", ""},
                              {ConditionType::kDegraded, true, "StartError", "no such file"}};
  REQUIRE(FindCondition(c, ConditionType::kDegraded) != nullptr);
  CHECK(FindCondition(c, ConditionType::kDegraded)->reason == "StartError");
  CHECK(FindCondition(c, ConditionType::kProgressing) == nullptr);
}

}  // namespace
}  // namespace kiln
