// Instances that cannot run, or run and fail, through a real kilnd: no start storms, and the
// reason is visible in status (kilnctl over gRPC) and the store.

#include <catch2/catch.hpp>

#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

int InstanceRows(KilndHarness& h, const std::string& service) {
  auto s = h.Store();
  if (!s) return 0;
  auto all = s->ListInstances(service, true);
  return all.ok() ? static_cast<int>(all->size()) : 0;
}

std::string Status(KilndHarness& h, const std::string& service) {
  return Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status", service}).out;
}

TEST_CASE("a command that cannot run fails the rollout at once, without a start storm",
          "[failing]") {
  KilndHarness h;
  WriteFile(h.manifests() / "broken.yaml",
            "name: broken\nversion: \"1\"\nreplicas: 3\nartifact: {path: " +
                BinPath("kiln-testsvc") + "}\ncommand: [\"/nonexistent/x\"]\n");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.HasEvent("broken", EventKind::kRolloutFailed); }));
  std::this_thread::sleep_for(3s);  // a storm would have made thousands of attempts by now
  CHECK(InstanceRows(h, "broken") <= 3);
  int log_files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(h.state() / "logs"))
    ++log_files;
  CHECK(log_files <= 3);
  auto svc = h.Service("broken");
  REQUIRE(svc.ok());
  const Condition* degraded = FindCondition(svc->conditions, ConditionType::kDegraded);
  REQUIRE(degraded != nullptr);
  CHECK(degraded->reason == "StartError");
  const std::string status = Status(h, "broken");
  INFO(status);
  CHECK(status.find("cannot start: ") != std::string::npos);
  CHECK(status.find("/nonexistent/x") != std::string::npos);
  CHECK(status.find("next try in ") != std::string::npos);
}

TEST_CASE("an instance that keeps exiting is restarted with back-off, shown in status",
          "[failing]") {
  KilndHarness h;
  h.Declare("flappy", "1", 1, "{strategy: rolling}",
            ", \"--exit-after\", \"300ms\", \"--exit-code\", \"3\"");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] {
    auto s = h.Service("flappy");
    return s.ok() && s->crash_count >= 2;
  }));
  std::this_thread::sleep_for(3s);  // inside the 10s back-off: no new attempt
  CHECK(InstanceRows(h, "flappy") == 2);
  const std::string status = Status(h, "flappy");
  INFO(status);
  CHECK(status.find("crash-looping: flappy-") != std::string::npos);
  CHECK(status.find("exited with code 3; next start in ") != std::string::npos);
  CHECK(status.find("CrashLoopBackOff") != std::string::npos);
}

TEST_CASE("why a new instance is not healthy is in status and in its failure", "[failing]") {
  KilndHarness h;
  h.Declare("sick", "1", 1, "{strategy: rolling, healthy_deadline: 2s}",
            ", \"--unhealthy-after\", \"0s\"");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] {
    auto live = h.Live("sick");
    return !live.empty() && live[0].last_probe.find("http 503") != std::string::npos;
  }));
  const std::string status = Status(h, "sick");
  INFO(status);
  CHECK(status.find("http 503 from 127.0.0.1:") != std::string::npos);
  REQUIRE(WaitFor([&] { return h.HasEvent("sick", EventKind::kInstanceFailed); }));
  bool explained = false;
  for (const auto& e : h.Events("sick")) {
    explained |= e.kind == EventKind::kInstanceFailed &&
                 e.message.find("not healthy within healthy_deadline 2s (last probe: http 503") !=
                     std::string::npos;
  }
  CHECK(explained);
}

}  // namespace
}  // namespace kiln::testing
