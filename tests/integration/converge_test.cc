// kilnd converging real kiln-testsvc processes: cold start, rolling replacement, automatic
// rollback, drift, broken manifests, and SIGKILL of kilnd in the middle of a rollout.

#include <catch2/catch.hpp>

#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

const char* kRolling = "{strategy: rolling, max_surge: 1, max_unavailable: 1}";

TEST_CASE("kilnd converges from cold to N healthy instances", "[converge]") {
  KilndHarness h;
  h.Declare("web", "1.0", 3, kRolling);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 3; }));
  CHECK(WaitFor([&] { return h.TrackingProblems({"web"}).empty(); }));
  INFO(h.TrackingProblems({"web"}));
  CHECK(h.InstanceProcesses().size() == 3);
  CHECK(WaitFor([&] { return h.HasEvent("web", EventKind::kRolloutCompleted); }));
}

TEST_CASE("a rolling version change keeps replicas - max_unavailable available", "[converge]") {
  KilndHarness h;
  h.Declare("web", "1.0", 4, kRolling);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4; }));
  // v2 takes a while to listen, so the rollout has steps to observe.
  h.Declare("web", "2.0", 4, kRolling, ", \"--start-delay\", \"300ms\"");
  int lowest = 4;
  int samples = 0;
  bool done = WaitFor(
      [&] {
        lowest = std::min(lowest, h.Healthy("web"));
        ++samples;
        return h.Healthy("web", 2) == 4 && h.Live("web").size() == 4;
      },
      60s);
  REQUIRE(done);
  CHECK(samples > 5);
  CHECK(lowest >= 3);  // replicas 4 - max_unavailable 1
  for (const auto& i : h.Live("web")) CHECK(i.revision == 2);
  CHECK(WaitFor([&] { return h.TrackingProblems({"web"}).empty(); }));
}

TEST_CASE("a version that fails health is rolled back automatically and pinned", "[converge]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  h.Declare("web", "1.0", 2, policy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  const auto before = h.Live("web");
  h.Declare("web", "2.0", 2, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor(
      [&] {
        auto s = h.Service("web");
        return s.ok() && s->pinned_revision > 0;
      },
      60s));
  CHECK(h.HasEvent("web", EventKind::kRolloutFailed));
  CHECK(h.HasEvent("web", EventKind::kRolledBack));
  auto svc = *h.Service("web");
  CHECK(svc.pin_reason == "automatic rollback: rollout to revision 2 failed");
  // The v1 instances served throughout and still do.
  REQUIRE(WaitFor([&] { return h.Live("web").size() == 2 && h.Healthy("web") == 2; }));
  for (const auto& i : h.Live("web")) CHECK(i.revision == 1);
  CHECK(h.Live("web")[0].name == before[0].name);
}

TEST_CASE("a killed instance is replaced by a new one with a new id", "[converge]") {
  KilndHarness h;
  h.Declare("web", "1.0", 2, kRolling);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  auto victim = h.Live("web")[0];
  ::kill(std::atoi(victim.handle.c_str() + 4), SIGKILL);
  REQUIRE(WaitFor([&] {
    auto live = h.Live("web");
    return h.Healthy("web") == 2 &&
           std::none_of(live.begin(), live.end(), [&](auto& i) { return i.name == victim.name; });
  }));
  auto s = h.Store();
  auto gone = s->GetInstance(victim.name);
  CHECK(gone->state == InstanceState::kFailed);
  CHECK(gone->reason == "killed by SIGKILL");
  for (const auto& i : h.Live("web")) CHECK(i.id > victim.id);
}

TEST_CASE("a broken manifest keeps everything running and is reported", "[converge]") {
  KilndHarness h;
  h.Declare("web", "1.0", 2, kRolling);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  auto before = h.Live("web");
  WriteFile(h.manifests() / "web.yaml", "name: web\nversion: [oops\n");
  REQUIRE(WaitFor([&] {
    auto s = h.Service("web");
    return s.ok() && s->manifest_error.find("invalid YAML") != std::string::npos;
  }));
  CHECK(h.kilnd().WaitForStderr("manifest error", 5s));
  std::this_thread::sleep_for(500ms);
  auto after = h.Live("web");
  REQUIRE(after.size() == 2);
  CHECK(after[0].name == before[0].name);
  CHECK(after[1].name == before[1].name);
  CHECK(h.Healthy("web") == 2);
}

TEST_CASE("SIGKILL of kilnd mid-rollout, then restart, converges with nothing untracked",
          "[converge]") {
  KilndHarness h;
  const char* policy = "{strategy: rolling, max_surge: 2, max_unavailable: 1}";
  h.Declare("web", "1.0", 4, policy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4; }));
  // A slow-starting v2 stretches the rollout; kilnd dies at several points of it.
  h.Declare("web", "2.0", 4, policy, ", \"--start-delay\", \"300ms\"");
  for (auto after : {150ms, 400ms, 700ms, 250ms}) {
    std::this_thread::sleep_for(after);
    h.Kill9();
    h.Start();
    REQUIRE(h.WaitReady());
  }
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 4 && h.Live("web").size() == 4; }, 60s));
  std::string problems;
  CHECK(WaitFor(
      [&] {
        problems = h.TrackingProblems({"web"});
        return problems.empty();
      },
      10s));
  INFO(problems);
  CHECK(h.InstanceProcesses().size() == 4);
}

}  // namespace
}  // namespace kiln::testing
