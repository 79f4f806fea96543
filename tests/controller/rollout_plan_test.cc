#include "controller/rollout_plan.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

// n instances: target or old, available or not.
std::vector<PlanInstance> Make(int target_avail, int target_unavail, int old_avail,
                               int old_unavail) {
  std::vector<PlanInstance> v;
  int id = 0;
  auto add = [&](bool target, bool avail, int n) {
    for (int i = 0; i < n; ++i) {
      PlanInstance p;
      p.name = "web-" + std::to_string(++id);
      p.state = avail ? InstanceState::kHealthy : InstanceState::kStarting;
      p.is_target = target;
      p.available = avail;
      p.created_ms = id;
      v.push_back(p);
    }
  };
  add(false, true, old_avail);
  add(false, false, old_unavail);
  add(true, true, target_avail);
  add(true, false, target_unavail);
  return v;
}

TEST_CASE("rolling arithmetic", "[plan]") {
  PlanInput in;
  in.replicas = 10;
  in.policy.max_surge = {25, true};        // 3
  in.policy.max_unavailable = {25, true};  // 2
  in.instances = Make(0, 0, 10, 0);
  PlanOutput p = PlanStep(in);
  CHECK(p.create == 3);
  CHECK(p.destroy.size() == 2);
  CHECK(p.template_rollout);

  in.instances = Make(3, 0, 8, 0);  // 3 new available, 8 old: 11 total, 11 available
  p = PlanStep(in);
  CHECK(p.create == 2);          // up to 13 total, 10 new at most
  CHECK(p.destroy.size() == 3);  // keep 8 available

  in.instances = Make(0, 3, 8, 0);  // new ones not yet available
  p = PlanStep(in);
  CHECK(p.create == 2);
  CHECK(p.destroy.empty());  // 8 available = 10 - 2: none may go

  in.instances = Make(10, 0, 2, 0);
  p = PlanStep(in);
  CHECK(p.create == 0);
  CHECK(p.destroy.size() == 2);
}

TEST_CASE("unavailable old instances go first, and at once", "[plan]") {
  PlanInput in;
  in.replicas = 3;
  in.policy.max_surge = {1, false};
  in.policy.max_unavailable = {0, false};
  in.instances = Make(0, 0, 2, 1);
  PlanOutput p = PlanStep(in);
  REQUIRE(p.destroy.size() == 1);
  CHECK(p.destroy[0] == "web-3");
}

// Healthy but not yet available (inside min_healthy_time) still serves traffic.
void MarkHealthyNotAvailable(std::vector<PlanInstance>& v, const std::string& name) {
  for (auto& i : v) {
    if (i.name == name) {
      i.state = InstanceState::kHealthy;
      i.available = false;
    }
  }
}

TEST_CASE("a quick second deploy keeps healthy old instances that are not yet available",
          "[plan]") {
  // v1's 3 instances just became healthy (min_healthy_time not yet over) when v2 is declared.
  PlanInput in;
  in.replicas = 3;
  in.policy.max_surge = {1, false};
  in.policy.max_unavailable = {0, false};
  in.instances = Make(0, 0, 0, 3);
  for (const char* n : {"web-1", "web-2", "web-3"}) MarkHealthyNotAvailable(in.instances, n);
  PlanOutput p = PlanStep(in);
  CHECK(p.create == 1);
  CHECK(p.destroy.empty());  // none may go: 3 serve, 3 - 0 must stay

  // max_unavailable 1 lets exactly one go, and never a serving one before one that serves nothing.
  in.policy.max_unavailable = {1, false};
  in.instances = Make(0, 0, 1, 2);  // web-1 available, web-2 starting, web-3 healthy not available
  MarkHealthyNotAvailable(in.instances, "web-3");
  p = PlanStep(in);
  REQUIRE(p.destroy.size() == 1);
  CHECK(p.destroy[0] == "web-2");  // starting: serves nothing, goes at once; spare is 1 - 2 < 0

  in.instances = Make(2, 0, 2, 0);  // 2 new available + 2 old available, plus a serving old one
  in.instances.push_back({"web-9", InstanceState::kHealthy, false, false, false, 0});
  p = PlanStep(in);
  // 4 available, 2 must stay: two may go, the healthy-but-not-available one first.
  REQUIRE(p.destroy.size() == 2);
  CHECK(p.destroy[0] == "web-9");
}

TEST_CASE("replacement without a template change surges at least one", "[plan]") {
  PlanInput in;
  in.replicas = 2;
  in.policy.max_surge = {0, false};
  in.policy.max_unavailable = {1, false};
  in.instances = Make(2, 0, 0, 0);
  in.instances[0].replace = true;
  PlanOutput p = PlanStep(in);
  CHECK_FALSE(p.template_rollout);
  CHECK(p.create == 1);
}

TEST_CASE("scale down drops unavailable then newest", "[plan]") {
  PlanInput in;
  in.replicas = 2;
  in.instances = Make(3, 1, 0, 0);
  PlanOutput p = PlanStep(in);
  REQUIRE(p.destroy.size() == 2);
  CHECK(p.destroy[0] == "web-4");  // the unavailable one
  CHECK(p.destroy[1] == "web-3");  // then the newest available
}

TEST_CASE("paused holds a template rollout but not scaling", "[plan]") {
  PlanInput in;
  in.replicas = 3;
  in.paused = true;
  in.instances = Make(0, 0, 3, 0);
  CHECK(PlanStep(in).create == 0);
  in.instances = Make(2, 0, 0, 0);
  CHECK(PlanStep(in).create == 1);
}

TEST_CASE("recreate, blue-green and canary steps", "[plan]") {
  PlanInput in;
  in.replicas = 2;
  in.policy.strategy = Strategy::kRecreate;
  in.instances = Make(0, 0, 2, 0);
  PlanOutput p = PlanStep(in);
  CHECK(p.destroy.size() == 2);
  CHECK(p.create == 0);

  in.policy.strategy = Strategy::kBlueGreen;
  p = PlanStep(in);
  CHECK(p.create == 2);
  CHECK(p.destroy.empty());
  in.instances = Make(2, 0, 2, 0);
  CHECK(PlanStep(in).destroy.size() == 2);

  in.policy.strategy = Strategy::kCanary;
  in.policy.canary = 1;
  in.instances = Make(0, 0, 2, 0);
  p = PlanStep(in);
  CHECK(p.create == 1);
  CHECK(p.destroy.empty());
  in.instances = Make(1, 0, 2, 0);
  p = PlanStep(in);
  CHECK(p.waiting_promotion);
  in.promoted = true;
  p = PlanStep(in);
  CHECK_FALSE(p.waiting_promotion);
  CHECK(p.destroy.size() + static_cast<size_t>(p.create) > 0);
}

TEST_CASE("a service with nothing to do is up to date, whatever its strategy", "[plan]") {
  for (Strategy strategy : {Strategy::kRolling, Strategy::kRecreate, Strategy::kCanary}) {
    PlanInput in;
    in.replicas = 2;
    in.policy.strategy = strategy;
    in.instances = Make(2, 0, 0, 0);
    PlanOutput p = PlanStep(in);
    CHECK(p.create == 0);
    CHECK(p.destroy.empty());
    CHECK(p.summary == "up to date: 2 of 2 available");
    in.instances = Make(1, 0, 0, 0);  // one short: scaling, rolling mechanics
    p = PlanStep(in);
    CHECK(p.create == 1);
    CHECK(p.summary.rfind("rolling: ", 0) == 0);
  }
}

}  // namespace
}  // namespace kiln
