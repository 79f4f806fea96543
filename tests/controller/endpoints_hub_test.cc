// Pools of exposed services and drain before stop: which instance is in a pool, when a
// snapshot is served, and when a draining instance may be stopped (the hub alone, then the
// reconciler on a real SQLite file with a fake driver).

#include "controller/endpoints_hub.h"

#include <algorithm>
#include <catch2/catch.hpp>

#include "tests/controller/reconciler_fixture.h"

namespace kiln {
namespace {

using testing::ReconcilerFixture;

InstanceRecord Inst(const std::string& name, int64_t revision, InstanceState state,
                    int64_t healthy_since = 0, int port = 20001) {
  InstanceRecord i;
  i.name = name;
  i.service = "web";
  i.revision = revision;
  i.state = state;
  i.healthy_since_ms = healthy_since;
  i.port = port;
  i.host = "127.0.0.1";
  return i;
}

ProxyReportData ReportOf(const std::string& kilnd_id, uint64_t version,
                         std::vector<ProxyEndpointReport> endpoints) {
  ProxyReportData r;
  r.proxy = "p1";
  r.kilnd_id = kilnd_id;
  r.version = version;
  r.routes.push_back(ProxyRouteReport{.service = "web",
                                      .listen_host = "127.0.0.1",
                                      .listen_port = 8080,
                                      .bound_port = 8080,
                                      .bind_error = "",
                                      .rejected_connections = 0,
                                      .endpoints = std::move(endpoints)});
  return r;
}

ServicePool PoolWith(std::vector<PoolEndpoint> endpoints) {
  ServicePool p;
  p.service = "web";
  p.expose.port = 8080;
  p.endpoints = std::move(endpoints);
  return p;
}

TEST_CASE("pool state: available instances take connections, others do not", "[pool]") {
  const int64_t now = 100'000;
  std::vector<InstanceRecord> live = {
      Inst("web-1", 1, InstanceState::kHealthy, now - 10'000),
      Inst("web-2", 1, InstanceState::kHealthy, now - 1'000),
      Inst("web-3", 1, InstanceState::kStarting),
      Inst("web-4", 1, InstanceState::kDraining, now - 60'000),
  };
  const std::optional<RolloutRecord> none;
  CHECK(PoolStateOf(live[0], live, none, now, 5'000) == PoolState::kReady);
  // Healthy, but not yet for min_healthy_time: the clock alone moves it into the pool.
  CHECK(PoolStateOf(live[1], live, none, now, 5'000) == PoolState::kNotReady);
  CHECK(NextPoolChangeMs(live, now, 5'000) == now + 4'000);
  CHECK(PoolStateOf(live[2], live, none, now, 5'000) == PoolState::kNotReady);
  CHECK(PoolStateOf(live[3], live, none, now, 5'000) == PoolState::kDraining);
}

TEST_CASE("pool state: blue-green switches the pool from the old set to the new at once",
          "[pool]") {
  const int64_t now = 100'000;
  RolloutRecord ro;
  ro.from_revision = 1;
  ro.to_revision = 2;
  ro.strategy = Strategy::kBlueGreen;
  ro.state = RolloutState::kProgressing;
  std::vector<InstanceRecord> live = {
      Inst("web-1", 1, InstanceState::kHealthy, 1'000),
      Inst("web-2", 2, InstanceState::kHealthy, 2'000),
  };
  // While the old set serves, the new one is held back, available or not.
  CHECK(PoolStateOf(live[0], live, ro, now, 0) == PoolState::kReady);
  CHECK(PoolStateOf(live[1], live, ro, now, 0) == PoolState::kNotReady);
  // The pass that drains the old set puts the new set in.
  live[0].state = InstanceState::kDraining;
  CHECK(PoolStateOf(live[0], live, ro, now, 0) == PoolState::kDraining);
  CHECK(PoolStateOf(live[1], live, ro, now, 0) == PoolState::kReady);
  // A rolling rollout follows availability: both serve.
  live[0].state = InstanceState::kHealthy;
  ro.strategy = Strategy::kRolling;
  CHECK(PoolStateOf(live[1], live, ro, now, 0) == PoolState::kReady);
}

TEST_CASE("endpoints hub: nothing is served before the whole view is published", "[pool]") {
  FakeClock clock;
  EndpointsHub hub(clock, "run-a", std::chrono::milliseconds(500));
  hub.Publish("web", PoolWith({{.instance = "web-1", .port = 20001, .state = PoolState::kReady}}));
  CHECK_FALSE(hub.WaitForChange("", 0, Duration(0)));
  hub.MarkReady();
  REQUIRE(hub.WaitForChange("", 0, Duration(0)));
  const EndpointsHub::Snapshot first = hub.Current();
  CHECK(first.kilnd_id == "run-a");
  REQUIRE(first.services.size() == 1);
  // Resumed with what was applied: nothing new until a pool changes.
  CHECK_FALSE(hub.WaitForChange("run-a", first.version, Duration(0)));
  // Another kilnd's snapshot is never current.
  CHECK(hub.WaitForChange("run-b", first.version, Duration(0)));
  // The same pool again changes nothing; another one is a new version.
  hub.Publish("web", PoolWith({{.instance = "web-1", .port = 20001, .state = PoolState::kReady}}));
  CHECK(hub.Current().version == first.version);
  hub.Publish("web", std::nullopt);
  CHECK(hub.Current().version > first.version);
  CHECK(hub.Current().services.empty());
}

TEST_CASE("endpoints hub: traffic totals only grow as proxies forget endpoints or restart",
          "[pool]") {
  FakeClock clock;
  EndpointsHub hub(clock, "run-a", std::chrono::milliseconds(500));
  auto connections = [&hub](int64_t revision) {
    return hub.Totals().by_revision[{"web", revision}].connections;
  };
  ProxyReportData r =
      ReportOf("run-a", 1,
               {{.instance = "web-1", .revision = 1, .total_connections = 5, .bytes_in = 100},
                {.instance = "web-2", .revision = 2, .total_connections = 3}});
  r.started_ms = 1000;
  r.routes[0].rejected_connections = 2;
  hub.Report(r);
  CHECK(connections(1) == 5);
  CHECK(connections(2) == 3);
  // web-1 drained and the proxy forgot it: its connections stay counted.
  r.routes[0].endpoints.erase(r.routes[0].endpoints.begin());
  r.routes[0].endpoints[0].total_connections = 4;
  hub.Report(r);
  CHECK(connections(1) == 5);
  CHECK(hub.Totals().by_revision[{"web", 1}].bytes_in == 100);
  CHECK(connections(2) == 4);
  // The proxy restarted: it counts from zero, the totals go on from where they were.
  r.started_ms = 2000;
  r.routes[0].endpoints[0].total_connections = 1;
  r.routes[0].rejected_connections = 0;
  hub.Report(r);
  CHECK(connections(2) == 5);
  CHECK(hub.Totals().rejected_by_service["web"] == 2);
  // A proxy that went silent is no longer live, but what it counted stays.
  clock.Advance(std::chrono::seconds(10));
  CHECK(hub.LiveReports().empty());
  CHECK(connections(2) == 5);
}

TEST_CASE(
    "endpoints hub: drained once every live proxy applied the pool without it and closed "
    "its connections",
    "[pool]") {
  FakeClock clock;
  EndpointsHub hub(clock, "run-a", std::chrono::milliseconds(500));
  hub.Publish("web", PoolWith({{.instance = "web-1", .port = 20001, .state = PoolState::kReady}}));
  hub.MarkReady();
  const uint64_t with = hub.Current().version;
  // Still in the pool: never drained.
  hub.Report(ReportOf("run-a", with, {{.instance = "web-1", .open_connections = 0}}));
  CHECK_FALSE(hub.Drain("web-1").drained);

  hub.Publish("web",
              PoolWith({{.instance = "web-1", .port = 20001, .state = PoolState::kDraining}}));
  const uint64_t without = hub.Current().version;
  // The proxy has not applied it yet.
  CHECK_FALSE(hub.Drain("web-1").drained);
  // Applied, one connection still open.
  hub.Report(ReportOf("run-a", without,
                      {{.instance = "web-1",
                        .state = ProxyEndpointReport::State::kDraining,
                        .open_connections = 1}}));
  EndpointsHub::DrainStatus st = hub.Drain("web-1");
  CHECK_FALSE(st.drained);
  CHECK(st.open_connections == 1);
  CHECK(st.proxies == 1);
  // A report from another kilnd's snapshot does not count as applied.
  hub.Report(ReportOf("run-old", without + 5, {}));
  CHECK_FALSE(hub.Drain("web-1").drained);
  // Closed: drained.
  hub.Report(ReportOf("run-a", without, {}));
  CHECK(hub.Drain("web-1").drained);
  // A proxy that stops reporting no longer counts; with none, only the drain timeout stops it.
  clock.Advance(std::chrono::seconds(2));
  st = hub.Drain("web-1");
  CHECK(st.proxies == 0);
  CHECK_FALSE(st.drained);
}

// A reconciler with stable addresses: `web` exposed on 18080 with the given drain.
struct ExposedFixture : ReconcilerFixture {
  ExposedFixture() : hub(clock, "run-a", std::chrono::milliseconds(500)) {
    Reconciler::Options o;
    o.endpoints = &hub;
    reconciler =
        std::make_unique<Reconciler>(*faults, driver, health, *artifacts, clock, scheduler, o);
    REQUIRE(reconciler->Recover().ok());
  }
  void DeclareExposed(const std::string& version, int replicas) {
    Declare(version, replicas, "expose: {port: 18080, drain: 10s}\n");
  }
  // The proxy applies the current snapshot and reports `open` connections on `instance`.
  void ProxyReports(const std::string& instance = "", int64_t open = 0) {
    std::vector<ProxyEndpointReport> eps;
    if (!instance.empty()) eps.push_back({.instance = instance, .open_connections = open});
    hub.Report(ReportOf("run-a", hub.Current().version, eps));
    reconciler->OnProxyReport();
  }
  bool Stopped(const std::string& instance) {
    return std::count(driver.stops.begin(), driver.stops.end(), instance) > 0;
  }
  std::vector<std::string> Ready() {
    std::vector<std::string> out;
    for (const auto& s : hub.Current().services) {
      for (const auto& e : s.endpoints) {
        if (e.state == PoolState::kReady) out.push_back(e.instance);
      }
    }
    return out;
  }
  EndpointsHub hub;
};

TEST_CASE(
    "drain before stop: a replaced instance leaves the pool and is stopped only once no "
    "proxy has a connection open to it",
    "[pool]") {
  ExposedFixture f;
  f.DeclareExposed("v1", 1);
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  REQUIRE(f.Ready() == std::vector<std::string>{"web-1"});
  f.ProxyReports("web-1", 1);

  f.DeclareExposed("v2", 1);  // rolling: web-2 starts beside web-1
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  // web-1 is draining: out of the pool, but its connection goes on, so it is not stopped.
  CHECK(f.Ready() == std::vector<std::string>{"web-2"});
  CHECK(f.Live()[0].state == InstanceState::kDraining);
  f.ProxyReports("web-1", 1);
  REQUIRE(f.Converge().ok());
  CHECK_FALSE(f.Stopped("web-1"));
  // The connection closes: the next report stops it.
  f.ProxyReports();
  REQUIRE(f.Converge().ok());
  CHECK(f.Stopped("web-1"));
  CHECK(f.HasEvent(EventKind::kInstanceDrained));
  auto kinds = f.EventKinds();
  auto drained = std::find(kinds.begin(), kinds.end(), EventKind::kInstanceDrained);
  CHECK(std::find(drained, kinds.end(), EventKind::kInstanceTerminated) != kinds.end());
}

TEST_CASE("drain before stop: `drain` passed stops the instance with connections still open",
          "[pool]") {
  ExposedFixture f;
  f.DeclareExposed("v1", 2);
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.ProxyReports();
  f.DeclareExposed("v1", 1);  // scale 2 -> 1
  REQUIRE(f.Converge().ok());
  std::string draining;
  for (const auto& i : f.Live()) {
    if (i.state == InstanceState::kDraining) draining = i.name;
  }
  REQUIRE_FALSE(draining.empty());
  f.ProxyReports(draining, 3);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.stops.empty());
  f.Advance(std::chrono::seconds(9));
  f.ProxyReports(draining, 3);
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.stops.empty());
  f.Advance(std::chrono::seconds(1));  // the pass woken at the deadline stops it
  REQUIRE(f.Converge().ok());
  REQUIRE(f.driver.stops.size() == 1);
  CHECK(f.Live().size() == 1);
}

TEST_CASE("drain before stop: a kilnd restarted mid-drain keeps draining", "[pool]") {
  ExposedFixture f;
  f.DeclareExposed("v1", 2);
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  f.DeclareExposed("v1", 1);
  REQUIRE(f.Converge().ok());
  REQUIRE(f.driver.stops.empty());
  std::string draining;
  for (const auto& i : f.Live()) {
    if (i.state == InstanceState::kDraining) draining = i.name;
  }
  REQUIRE_FALSE(draining.empty());

  // A new kilnd: a new hub (new run id), recovery adopts both and publishes the pools before
  // serving any snapshot.
  EndpointsHub hub2(f.clock, "run-b", std::chrono::milliseconds(500));
  Reconciler::Options o;
  o.endpoints = &hub2;
  f.reconciler = std::make_unique<Reconciler>(*f.faults, f.driver, f.health, *f.artifacts, f.clock,
                                              f.scheduler, o);
  REQUIRE(f.reconciler->Recover().ok());
  f.Load();
  REQUIRE(f.Converge().ok());
  CHECK(hub2.ready());
  CHECK(hub2.Current().services.size() == 1);
  CHECK(f.driver.stops.empty());  // no proxy has reported to this kilnd yet
  // A proxy still on the old kilnd's snapshot does not count; one on this one's does.
  hub2.Report(ReportOf("run-a", 99, {}));
  f.reconciler->OnProxyReport();
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.stops.empty());
  hub2.Report(ReportOf("run-b", hub2.Current().version, {}));
  f.reconciler->OnProxyReport();
  REQUIRE(f.Converge().ok());
  CHECK(f.driver.stops == std::vector<std::string>{draining});
}

}  // namespace
}  // namespace kiln
