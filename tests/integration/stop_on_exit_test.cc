// kilnd --stop-instances-on-exit (what `make run` passes): on SIGINT a real kilnd stops every
// instance and kiln-proxy before it exits, adopted ones included; without it, they run on.

#include <catch2/catch.hpp>
#include <string>

#include "tests/integration/kilnd_harness.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

TEST_CASE("kilnd --stop-instances-on-exit stops instances and kiln-proxy on SIGINT",
          "[kilnd][stop-on-exit]") {
  KilndHarness h;
  const int port = FreePort();
  h.SetExtraYaml("expose: {port: " + std::to_string(port) + ", drain: 1s}\n");
  h.Declare("web", "1.0", 2,
            "{strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 100ms}");

  // Without the flag (a daemon under a service manager): SIGINT leaves everything running.
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  REQUIRE(WaitFor([&] { return h.ProxyProcesses().size() == 1; }));
  const auto instances = h.InstanceProcesses();
  const auto proxy = h.ProxyProcesses();
  REQUIRE(instances.size() == 2);
  h.kilnd().Signal(SIGINT);
  REQUIRE(h.kilnd().Wait(20s) == 0);
  CHECK(h.kilnd().Stderr().find("shutting down; instances keep running") != std::string::npos);
  CHECK(h.InstanceProcesses() == instances);
  CHECK(h.ProxyProcesses() == proxy);

  // With it: the next kilnd adopts them, and stops them all on SIGINT.
  h.Start({"--stop-instances-on-exit"});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  CHECK(h.InstanceProcesses() == instances);  // adopted, not replaced
  h.kilnd().Signal(SIGINT);
  REQUIRE(h.kilnd().Wait(60s) == 0);
  const std::string err = h.kilnd().Stderr();
  INFO(err);
  CHECK(err.find("stopping every instance and kiln-proxy before exiting") != std::string::npos);
  CHECK(Count(err, "instance stopped service=web") == 2);
  for (const auto& [pid, instance] : instances) {
    CHECK(err.find("instance=" + instance) != std::string::npos);
  }
  CHECK(err.find("kiln-proxy stopped") != std::string::npos);
  CHECK(err.find("every instance stopped stopped=2") != std::string::npos);
  CHECK(err.find("shutting down; instances stopped") != std::string::npos);
  CHECK(h.ControllerProcesses().empty());
  CHECK(h.ProxyProcesses().empty());
}

}  // namespace
}  // namespace kiln::testing
