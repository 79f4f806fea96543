// Several Docker engines as several hosts: kilnd with two named --docker-host flags against two
// real dockerd started by the test (tests/deploy/docker_engine.h).

#include "deploy/docker_hosts.h"

#include <catch2/catch.hpp>

#include "tests/deploy/docker_engine.h"
#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/integration/process.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

std::string Manifest(const std::string& name, int replicas, const std::string& image,
                     const std::string& hosts = "") {
  return "name: " + name + "\nversion: \"1.0\"\nreplicas: " + std::to_string(replicas) +
         "\nimage: " + image +
         "\nport: 8080\ncommand: [\"/kiln-testsvc\", \"--host\", \"0.0.0.0\", "
         "\"--version-string\", \"1.0\"]\nhealth: {http: {path: /healthz}, interval: 100ms, "
         "timeout: 500ms, failure_threshold: 2}\nupdate: {strategy: rolling, max_surge: 1, "
         "max_unavailable: 0}\n" +
         (hosts.empty() ? "" : "hosts: " + hosts + "\n");
}

// Two engines named a and b, holding the same test image; `why` is set when they cannot run.
struct TwoHosts {
  DockerEngine a, b;
  std::string image;  // "kiln-test/web@sha256:..."
  std::string why;

  TwoHosts() {
    why = a.Start();
    if (why.empty()) why = b.Start();
    if (!why.empty()) {
      std::printf("SKIPPED: cannot start two Docker engines: %s\n", why.c_str());
      return;
    }
    const std::string id = a.ImportTestImage("1.0");
    if (id.rfind("sha256:", 0) != 0 || !a.CopyImageTo(b, id)) {
      why = "cannot make the test image on both engines";
      return;
    }
    image = "kiln-test/web@" + id;
  }
  std::vector<std::string> Flags(bool with_b = true) const {
    std::vector<std::string> f = {"--docker-host", "name=a," + a.endpoint()};
    if (with_b) f.insert(f.end(), {"--docker-host", "name=b," + b.endpoint()});
    f.insert(f.end(), {"--docker-host-timeout", "2s"});
    return f;
  }
};

size_t Containers(DockerEngine& engine, const KilndHarness& h) {
  return engine.Containers("kiln.controller=" + ControllerIdForStateDir(h.state())).size();
}

// Live instances of `service` per Docker host, from their recorded handles.
std::map<std::string, int> PerHost(KilndHarness& h, const std::string& service) {
  std::map<std::string, int> out;
  for (const auto& i : h.Live(service)) {
    if (auto d = ParseDockerHandle(i.handle)) ++out[d->first];
  }
  return out;
}

std::string AllEvents(KilndHarness& h) {
  std::string out;
  for (const auto& e : h.Events("")) {
    out += std::string(EventKindName(e.kind)) + " " + e.service + ": " + e.message + "\n";
  }
  return out;
}

bool HasHostEvent(KilndHarness& h, EventKind kind, const std::string& host) {
  for (const auto& e : h.Events("")) {
    if (e.kind == kind && e.message.find("Docker host " + host + " ") != std::string::npos) {
      return true;
    }
  }
  return false;
}

TEST_CASE("instances spread over two Docker hosts and move off a host that goes down", "[docker]") {
  TwoHosts hosts;
  if (!hosts.why.empty()) return;
  KilndHarness h;
  WriteFile(h.manifests() / "web.yaml", Manifest("web", 4, hosts.image));
  WriteFile(h.manifests() / "api.yaml", Manifest("api", 2, hosts.image, "[b]"));
  h.Start(hosts.Flags());
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4 && h.Healthy("api") == 2; }, 90s));
  INFO(AllEvents(h));
  // Cold start: web spread evenly, api only where its manifest allows.
  CHECK(PerHost(h, "web") == std::map<std::string, int>{{"a", 2}, {"b", 2}});
  CHECK(PerHost(h, "api") == std::map<std::string, int>{{"b", 2}});
  CHECK(Containers(hosts.a, h) == 2);
  CHECK(Containers(hosts.b, h) == 4);
  for (const auto& i : h.Live("web")) CHECK(HttpRequest(i.port, "/").body == "1.0\n");

  // Status: kilnctl hosts and /metrics.
  RunResult listed = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "hosts"});
  CHECK(listed.exit_code == 0);
  CHECK_THAT(listed.out, Catch::Contains("a ") && Catch::Contains(hosts.b.endpoint()) &&
                             Catch::Contains("api 2, web 2"));
  const std::string metrics = HttpRequest(h.HttpPort(), "/metrics").body;
  CHECK_THAT(metrics, Catch::Contains("kiln_docker_host_up{host=\"b\"} 1"));
  CHECK_THAT(metrics, Catch::Contains("kiln_docker_host_instances{host=\"b\",service=\"api\"} 2"));

  // Engine b stops answering: its instances are lost and web's are replaced on a; api, allowed
  // only on b, waits.
  const auto web_before = h.Live("web");
  hosts.b.KillDaemon();
  REQUIRE(WaitFor([&] { return HasHostEvent(h, EventKind::kHostDown, "b"); }, 30s));
  REQUIRE(WaitFor(
      [&] {
        return h.Healthy("web") == 4 && PerHost(h, "web") == std::map<std::string, int>{{"a", 4}};
      },
      60s));
  // Those on b ended: lost when b was marked down, or failed first by their health checks.
  std::set<std::string> live_now;
  for (const auto& i : h.Live("web")) live_now.insert(i.name);
  for (const auto& i : web_before) {
    if (ParseDockerHandle(i.handle)->first == "b") CHECK(live_now.count(i.name) == 0);
  }
  CHECK(h.Live("web").size() == 4);
  CHECK(h.Healthy("api") == 0);
  CHECK_THAT(HttpRequest(h.HttpPort(), "/metrics").body,
             Catch::Contains("kiln_docker_host_up{host=\"b\"} 0"));
  RunResult down = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "hosts"});
  CHECK_THAT(down.out, Catch::Contains("down for"));

  // b answers again: what kiln gave up there is removed, api comes back on b, web stays on a and
  // no service runs more than its replicas.
  REQUIRE(hosts.b.Relaunch().empty());
  REQUIRE(WaitFor([&] { return HasHostEvent(h, EventKind::kHostUp, "b"); }, 30s));
  REQUIRE(WaitFor([&] { return h.Healthy("api") == 2; }, 60s));
  CHECK(PerHost(h, "api") == std::map<std::string, int>{{"b", 2}});
  CHECK(PerHost(h, "web") == std::map<std::string, int>{{"a", 4}});
  CHECK(h.Live("web").size() == 4);
  CHECK(WaitFor([&] { return Containers(hosts.b, h) == 2; }, 30s));
  CHECK(Containers(hosts.a, h) == 4);
}

TEST_CASE("kilnd SIGKILLed adopts containers on both hosts and reports a host it lost",
          "[docker]") {
  TwoHosts hosts;
  if (!hosts.why.empty()) return;
  KilndHarness h;
  WriteFile(h.manifests() / "web.yaml", Manifest("web", 4, hosts.image));
  h.Start(hosts.Flags());
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4; }, 90s));
  std::set<std::string> names;
  for (const auto& i : h.Live("web")) names.insert(i.name);

  h.Kill9();
  h.Start(hosts.Flags());
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4; }, 60s));
  INFO(AllEvents(h));
  CHECK_FALSE(h.HasEvent("web", EventKind::kInstanceLost));
  std::set<std::string> after;
  for (const auto& i : h.Live("web")) after.insert(i.name);
  CHECK(after == names);
  CHECK(PerHost(h, "web") == std::map<std::string, int>{{"a", 2}, {"b", 2}});

  // Restarted without host b: its instances are lost, said so, and their containers are left
  // running there; replacements run on a.
  h.Kill9();
  h.Start(hosts.Flags(/*with_b=*/false));
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 4; }, 60s));
  CHECK(PerHost(h, "web") == std::map<std::string, int>{{"a", 4}});
  std::string lost;
  for (const auto& e : h.Events("web")) {
    if (e.kind == EventKind::kInstanceLost) lost = e.message;
  }
  CHECK_THAT(lost, Catch::Contains("Docker host \"b\"") && Catch::Contains("left running"));
  CHECK(Containers(hosts.b, h) == 2);
  RunResult listed = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "hosts"});
  CHECK_THAT(listed.out, Catch::Contains("not configured: 2 container(s)"));

  // Given b again, the next kilnd stops what was left there: no instance runs twice.
  h.Kill9();
  h.Start(hosts.Flags());
  REQUIRE(h.WaitReady());
  CHECK(WaitFor([&] { return Containers(hosts.b, h) == 0; }, 30s));
  CHECK(h.Healthy("web") == 4);
  CHECK(Containers(hosts.a, h) == 4);
}

TEST_CASE("a manifest naming a Docker host kilnd does not have is reported on the service",
          "[docker]") {
  DockerEngine engine;
  const std::string why = engine.Start();
  if (!why.empty()) {
    std::printf("SKIPPED: cannot start a Docker engine: %s\n", why.c_str());
    return;
  }
  KilndHarness h;
  WriteFile(h.manifests() / "web.yaml",
            Manifest("web", 2, "kiln-test/web@sha256:" + std::string(64, '1'), "[c]"));
  h.Start({"--docker-host", "name=a," + engine.endpoint()});
  REQUIRE(h.WaitReady());
  const std::string error = h.WaitStartError("web");
  REQUIRE(!error.empty());
  CHECK_THAT(error, Catch::Contains("hosts: [c]") && Catch::Contains("no such Docker host") &&
                        Catch::Contains("it has a"));
  std::this_thread::sleep_for(2s);
  int started = 0;
  for (const auto& e : h.Events("web")) started += e.kind == EventKind::kInstanceStartFailed;
  CHECK(started < 50);
  CHECK(Containers(engine, h) == 0);
}

}  // namespace
}  // namespace kiln::testing
