// `kilnctl rollout status` against a real kilnd: the CI gate after a manifest edit, a failed
// rollout rolled back automatically, a timeout, an older revision, and a kilnd restart mid-wait.

#include <catch2/catch.hpp>

#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

RunResult RolloutStatus(KilndHarness& h, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {BinPath("kilnctl"), "--addr", h.UnixAddr(),
                                   "rollout",          "status", "web"};
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv, 120s);
}

void StartConverged(KilndHarness& h, const char* policy) {
  h.Declare("web", "1.0", 2, policy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor(
      [&] { return h.Healthy("web", 1) == 2 && h.HasEvent("web", EventKind::kRolloutCompleted); }));
}

TEST_CASE("rollout status right after a manifest edit waits for the new revision to complete",
          "[kilnctl][rollout]") {
  KilndHarness h;
  StartConverged(h, kPolicy);
  // The CI gate: edit the manifest, then wait at once. kilnd may not have read the edit yet; the
  // wait must not end on revision 1's rollout, long completed.
  h.Declare("web", "2.0", 2, kPolicy);
  RunResult r = RolloutStatus(h, {"--timeout", "2m"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("web: rollout to revision 2 (rolling)") != std::string::npos);
  CHECK(r.out.find("web: rollout complete\n") != std::string::npos);
  CHECK(r.out.find("revision 1") == std::string::npos);
  CHECK(h.Healthy("web", 2) == 2);
  for (const auto& i : h.Live("web")) CHECK(i.revision == 2);

  // The older revision's rollout completed too, long ago: said at once, with what runs now.
  RunResult old = RolloutStatus(h, {"--revision", "1"});
  INFO(old.out << old.err);
  CHECK(old.exit_code == 0);
  CHECK(old.out == "web: rollout to revision 1 complete (the target is now revision 2)\n");
  // And a revision that was never written is refused rather than waited on forever... unless
  // it is the next one (a manifest edit to come): that waits, here until the timeout.
  RunResult next = RolloutStatus(h, {"--revision", "3", "--timeout", "1s"});
  CHECK(next.exit_code == 5);
  CHECK(next.out.find("waiting for revision 3 to be written (the latest is 2)") !=
        std::string::npos);
}

TEST_CASE("rollout status of a rollout that fails and is rolled back automatically exits 3",
          "[kilnctl][rollout]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  StartConverged(h, policy);
  h.Declare("web", "2.0", 2, policy, ", \"--unhealthy-after\", \"0s\"");
  RunResult r = RolloutStatus(h, {"--timeout", "2m"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 3);
  CHECK(r.err.rfind("kilnctl: rollout of web to revision 2 failed: ", 0) == 0);
  CHECK(r.err.find("web rolled back to the template of revision 1 as revision 3") !=
        std::string::npos);
  CHECK(r.err.find("pinned (automatic rollback: rollout to revision 2 failed)") !=
        std::string::npos);
  CHECK(r.out.find("rollout complete") == std::string::npos);
  // Asked again later, the answer is the same: revision 2 never completed.
  RunResult again = RolloutStatus(h, {"--revision", "2"});
  CHECK(again.exit_code == 3);
  CHECK(again.err.rfind("kilnctl: rollout of web to revision 2 failed: ", 0) == 0);
  // The rollback's own revision completes.
  RunResult back = RolloutStatus(h, {"--timeout", "1m"});
  INFO(back.out << back.err);
  CHECK(back.exit_code == 0);
  CHECK(back.out.find("web: rollout complete\n") != std::string::npos);
}

TEST_CASE("rollout status gives up at --timeout with exit 5 and what it saw last",
          "[kilnctl][rollout]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 10m, "
      "progress_deadline: 10m}";
  StartConverged(h, policy);
  h.Declare("web", "2.0", 2, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor([&] {
    auto s = h.Service("web");
    return s.ok() && s->desired_revision == 2;
  }));
  const auto begin = std::chrono::steady_clock::now();
  RunResult r = RolloutStatus(h, {"--timeout", "2s"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 5);
  CHECK(std::chrono::steady_clock::now() - begin < 20s);
  CHECK(r.err.rfind("kilnctl: timed out after 2s waiting for the rollout of web to revision 2; "
                    "last seen: web: rollout to revision 2 (rolling): progressing, 0/2 available",
                    0) == 0);
  // Bad durations are usage errors.
  RunResult bad = RolloutStatus(h, {"--timeout", "soon"});
  CHECK(bad.exit_code == 2);
}

TEST_CASE("rollout status keeps waiting through a kilnd restart and says so",
          "[kilnctl][rollout]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 2s}";
  StartConverged(h, policy);
  h.Declare("web", "2.0", 2, policy);
  REQUIRE(WaitFor([&] {
    auto s = h.Service("web");
    return s.ok() && s->desired_revision == 2;
  }));
  Child wait({BinPath("kilnctl"), "--addr", h.UnixAddr(), "--timeout", "2", "rollout", "status",
              "web", "--timeout", "2m"},
             h.tmp().path());
  REQUIRE(wait.WaitForStdout("web: rollout to revision 2", 30s));
  h.Kill9();
  REQUIRE(wait.WaitForStderr("retrying until the timeout", 30s));
  std::this_thread::sleep_for(1s);
  h.Start();
  REQUIRE(h.WaitReady());
  CHECK(wait.Wait(120s) == 0);
  INFO(wait.Stdout() << wait.Stderr());
  CHECK(wait.Stdout().find("web: reached kilnd again") != std::string::npos);
  CHECK(wait.Stdout().find("web: rollout complete\n") != std::string::npos);
}

}  // namespace
}  // namespace kiln::testing
