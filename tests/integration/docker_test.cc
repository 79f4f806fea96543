// Image services: kilnd with --docker-host against a real dockerd started by the test
// (tests/deploy/docker_engine.h), running kiln-testsvc images made offline.

#include <catch2/catch.hpp>

#include "deploy/docker_hosts.h"
#include "tests/deploy/docker_engine.h"
#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

const char* kRolling = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

std::string ImageManifest(const std::string& name, const std::string& version, int replicas,
                          const std::string& image) {
  return "name: " + name + "\nversion: \"" + version + "\"\nreplicas: " + std::to_string(replicas) +
         "\nimage: " + image +
         "\nport: 8080\ncommand: [\"/kiln-testsvc\", \"--host\", \"0.0.0.0\", "
         "\"--version-string\", \"" +
         version +
         "\"]\nhealth: {http: {path: /healthz}, interval: 100ms, timeout: 500ms, "
         "failure_threshold: 2}\nupdate: " +
         kRolling + "\n";
}

// The engine's containers of this kilnd (its controller id), exited ones too.
size_t Containers(DockerEngine& engine, const KilndHarness& h) {
  return engine.Containers("kiln.controller=" + ControllerIdForStateDir(h.state())).size();
}

// The service's events, one a line, for a failing check to show.
std::string EventLines(KilndHarness& h, const std::string& service) {
  std::string out;
  for (const auto& e : h.Events(service)) {
    out += std::string(EventKindName(e.kind)) + ": " + e.message + "\n";
  }
  return out;
}

std::string SkipReason(DockerEngine& engine) {
  std::string why = engine.Start();
  if (!why.empty()) std::printf("SKIPPED: cannot start a Docker engine: %s\n", why.c_str());
  return why;
}

TEST_CASE("an image service converges rolls to a new image and replaces a killed container",
          "[docker]") {
  DockerEngine engine;
  if (!SkipReason(engine).empty()) return;
  KilndHarness h;
  const std::string v1 = engine.ImportTestImage("1.0");
  const std::string v2 = engine.ImportTestImage("2.0");
  REQUIRE(v1.rfind("sha256:", 0) == 0);
  REQUIRE(v2.rfind("sha256:", 0) == 0);
  WriteFile(h.manifests() / "web.yaml", ImageManifest("web", "1.0", 2, "kiln-test/web@" + v1));
  h.Start({"--docker-host", engine.endpoint()});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }, 60s));
  CHECK(Containers(engine, h) == 2);
  for (const auto& i : h.Live("web")) {
    CHECK(i.handle.rfind("docker:default/", 0) == 0);  // a bare --docker-host is "default"
    CHECK(HttpRequest(i.port, "/").body == "1.0\n");   // through the published port
  }

  // docker kill of one container: replaced by a new instance.
  const auto before = h.Live("web");
  REQUIRE(before.size() == 2);
  REQUIRE(engine.Kill(ParseDockerHandle(before[0].handle)->second));
  REQUIRE(WaitFor(
      [&] {
        auto live = h.Live("web");
        if (live.size() != 2 || h.Healthy("web") != 2) return false;
        for (const auto& i : live) {
          if (i.name == before[0].name) return false;
        }
        return true;
      },
      60s));
  // Its end is recorded with the engine's exit code: reported by the event stream, or seen by
  // the stop of an instance whose health failed first (the engine's die event can come later
  // than the first refused probe).
  INFO(EventLines(h, "web"));
  CHECK_THAT(EventLines(h, "web"),
             Catch::Contains("instance " + before[0].name + " exited with code 137") ||
                 Catch::Contains("instance " + before[0].name + " stopped: exited with code 137"));
  CHECK(WaitFor([&] { return Containers(engine, h) == 2; }));

  // A new image: a rolling update to revision 2.
  WriteFile(h.manifests() / "web.yaml", ImageManifest("web", "2.0", 2, "kiln-test/web@" + v2));
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }, 90s));
  for (const auto& i : h.Live("web")) CHECK(HttpRequest(i.port, "/").body == "2.0\n");
  CHECK(WaitFor([&] { return Containers(engine, h) == 2; }));
}

TEST_CASE("kilnd SIGKILLed adopts its containers after a restart without duplicates", "[docker]") {
  DockerEngine engine;
  if (!SkipReason(engine).empty()) return;
  KilndHarness h;
  const std::string v1 = engine.ImportTestImage("1.0");
  REQUIRE(v1.rfind("sha256:", 0) == 0);
  WriteFile(h.manifests() / "web.yaml", ImageManifest("web", "1.0", 3, "kiln-test/web@" + v1));
  h.Start({"--docker-host", engine.endpoint()});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 3; }, 60s));
  std::set<std::string> names;
  for (const auto& i : h.Live("web")) names.insert(i.name);

  h.Kill9();
  CHECK(Containers(engine, h) == 3);  // instances outlive kilnd
  h.Start({"--docker-host", engine.endpoint()});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 3; }, 60s));
  INFO(EventLines(h, "web"));
  CHECK_FALSE(h.HasEvent("web", EventKind::kInstanceLost));
  std::set<std::string> after;
  for (const auto& i : h.Live("web")) after.insert(i.name);
  CHECK(after == names);
  CHECK(Containers(engine, h) == 3);

  // The exit stream of the new kilnd sees a container killed now.
  const auto live = h.Live("web");
  REQUIRE(engine.Kill(ParseDockerHandle(live[0].handle)->second));
  REQUIRE(WaitFor(
      [&] {
        auto now = h.Live("web");
        bool replaced = true;
        for (const auto& i : now) replaced &= i.name != live[0].name;
        return replaced && h.Healthy("web") == 3;
      },
      60s));
  CHECK(WaitFor([&] { return Containers(engine, h) == 3; }));
}

TEST_CASE("an image that does not exist is reported on the service", "[docker]") {
  DockerEngine engine;
  if (!SkipReason(engine).empty()) return;
  KilndHarness h;
  // A registry that refuses connections: nothing can be pulled from it.
  const std::string missing = "127.0.0.1:1/kiln/missing@sha256:" + std::string(64, '0');
  WriteFile(h.manifests() / "web.yaml", ImageManifest("web", "1.0", 2, missing));
  h.Start({"--docker-host", engine.endpoint()});
  REQUIRE(h.WaitReady());
  // Pulling may work later (the registry may come up): the starts fail and back off.
  std::string error;
  REQUIRE(WaitFor([&] {
    for (const auto& e : h.Events("web")) {
      if (e.kind == EventKind::kInstanceStartFailed) error = e.message;
    }
    return !error.empty();
  }));
  CHECK_THAT(error, Catch::Contains(missing));
  CHECK_THAT(error, Catch::Contains("not found on engine " + engine.endpoint()));
  CHECK(Containers(engine, h) == 0);
}

TEST_CASE("an image service without --docker-host fails its starts with a clear error",
          "[docker]") {
  KilndHarness h;
  WriteFile(h.manifests() / "web.yaml",
            ImageManifest("web", "1.0", 2, "kiln-test/web@sha256:" + std::string(64, '1')));
  h.Start();
  REQUIRE(h.WaitReady());
  const std::string error = h.WaitStartError("web");
  REQUIRE(!error.empty());
  CHECK_THAT(error, Catch::Contains("no Docker engine configured: start kilnd with --docker-host"));
  // Retrying cannot help: the crash-loop back-off holds the starts back (not thousands).
  std::this_thread::sleep_for(2s);
  int started = 0;
  for (const auto& e : h.Events("web")) started += e.kind == EventKind::kInstanceStartFailed;
  CHECK(started < 50);
}

}  // namespace
}  // namespace kiln::testing
