// kilnd as a user runs it: a real process, a real state directory, real signals.

#include <signal.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "storage/sqlite.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/integration/process.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

// A manifest directory with one valid service whose artifact is a copy of /bin/true.
void WriteManifests(const TempDir& tmp) {
  WriteFile(tmp / "artifacts/app", ReadFile("/bin/true"));
  WriteFile(tmp / "manifests/web.yaml", R"(name: web
version: "1.0"
replicas: 2
artifact: {path: ../artifacts/app}
)");
}

TEST_CASE("kilnd loads manifests, opens its store and stops cleanly on SIGTERM", "[kilnd]") {
  TempDir tmp;
  WriteManifests(tmp);
  Child kilnd({BinPath("kilnd"), "--manifests", (tmp / "manifests").string(), "--state",
               (tmp / "state").string(), "--http-listen", ""},
              tmp.path());
  REQUIRE(kilnd.WaitForStderr("kilnd ready", 20s));
  // Manifests load off the main thread: "ready" may come first.
  REQUIRE(kilnd.WaitForStderr("manifests loaded", 20s));
  std::string log = kilnd.Stderr();
  CHECK(log.find("service loaded service=web version=1.0 replicas=2 strategy=rolling "
                 "template_hash=") != std::string::npos);
  CHECK(log.find("manifests loaded") != std::string::npos);
  CHECK(std::filesystem::exists(tmp / "state/kiln.db"));

  kilnd.Signal(SIGTERM);
  CHECK(kilnd.Wait(20s) == 0);
  CHECK(kilnd.Stderr().find("kilnd stopped") != std::string::npos);

  // The store it made has the current schema.
  auto db = sqlite::Database::Open((tmp / "state/kiln.db").string(), true, false);
  REQUIRE(db.ok());
  CHECK(db->QueryInt("v", "PRAGMA user_version")->value_or(0) >= 1);
}

TEST_CASE("kilnd logs every manifest error and keeps running", "[kilnd]") {
  TempDir tmp;
  WriteManifests(tmp);
  WriteFile(tmp / "manifests/bad.yaml", "name: bad\nversion: \"1\"\nreplicas: lots\n");
  Child kilnd({BinPath("kilnd"), "--manifests", (tmp / "manifests").string(), "--state",
               (tmp / "state").string(), "--log-format", "json", "--http-listen", ""},
              tmp.path());
  REQUIRE(kilnd.WaitForStderr("kilnd ready", 20s));
  // The loader and the reconciler log on threads of their own: wait for each line.
  CHECK(kilnd.WaitForStderr(R"("msg":"manifests loaded")", 20s));
  CHECK(kilnd.WaitForStderr(R"("msg":"manifest error")", 20s));
  CHECK(kilnd.WaitForStderr("bad.yaml:3:11: replicas: expected an integer, got \\\"lots\\\"", 20s));
  CHECK(kilnd.WaitForStderr(R"("msg":"service loaded","service":"web")", 20s));
  kilnd.Signal(SIGINT);
  CHECK(kilnd.Wait(20s) == 0);
}

TEST_CASE("kilnd refuses a state store it cannot open, with one clear line", "[kilnd]") {
  TempDir tmp;
  WriteManifests(tmp);
  WriteFile(tmp / "state/kiln.db", std::string(4096, 'x'));
  RunResult r = Run({BinPath("kilnd"), "--manifests", (tmp / "manifests").string(), "--state",
                     (tmp / "state").string(), "--http-listen", ""});
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("cannot open state store error=\"" + (tmp / "state/kiln.db").string() +
                   ": read database: file is not a database\"") != std::string::npos);
  CHECK(ReadFile(tmp / "state/kiln.db") == std::string(4096, 'x'));
}

TEST_CASE("the Prometheus file_sd file lists every running instance and follows a rollout",
          "[kilnd]") {
  KilndHarness h;
  const std::filesystem::path sd = h.tmp() / "sd/kiln.json";
  std::filesystem::create_directories(sd.parent_path());
  h.Declare("web", "1.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  h.Start({"--prometheus-sd-file", sd.string()});
  REQUIRE(h.WaitReady());
  // The file as Prometheus reads it: a JSON array of target groups. It is replaced by rename,
  // so it parses whenever it exists.
  auto groups = [&] {
    std::ifstream in(sd);
    return in ? nlohmann::json::parse(in) : nlohmann::json::array();
  };
  auto versions = [&] {
    std::multiset<std::string> out;
    for (const auto& g : groups()) out.insert(g["labels"]["version"].get<std::string>());
    return out;
  };
  REQUIRE(WaitFor([&] { return versions() == std::multiset<std::string>{"1.0", "1.0"}; }));
  for (const auto& g : groups()) {
    REQUIRE(g["targets"].size() == 1);
    CHECK(g["targets"][0].get<std::string>().rfind("127.0.0.1:", 0) == 0);
    CHECK(g["labels"]["service"] == "web");
    CHECK(g["labels"]["revision"] == "1");
    CHECK(g["labels"]["instance"].get<std::string>().rfind("web-", 0) == 0);
  }
  // Prometheus itself accepts it: promtool checks a config's file_sd files, labels included.
  const std::filesystem::path config = h.tmp() / "prometheus.yml";
  WriteFile(config,
            "scrape_configs:\n  - job_name: kiln-instances\n    file_sd_configs:\n"
            "      - files: [\"" +
                sd.string() + "\"]\n");
  RunResult promtool = Run({"/bin/sh", "-c", "promtool check config " + config.string()});
  INFO(promtool.out << promtool.err);
  CHECK(promtool.exit_code == 0);

  h.Declare("web", "2.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  REQUIRE(WaitFor([&] { return versions() == std::multiset<std::string>{"2.0", "2.0"}; }));
  for (const auto& g : groups()) CHECK(g["labels"]["revision"] == "2");
}

TEST_CASE("kilnd --help, --version and bad flags", "[kilnd]") {
  RunResult help = Run({BinPath("kilnd"), "--help"});
  CHECK(help.exit_code == 0);
  CHECK(help.out.find("--manifests") != std::string::npos);

  RunResult version = Run({BinPath("kilnd"), "--version"});
  CHECK(version.exit_code == 0);
  CHECK(version.out.rfind("kilnd ", 0) == 0);

  RunResult unknown = Run({BinPath("kilnd"), "--manifests", "m", "--state", "s", "--frobnicate"});
  CHECK(unknown.exit_code == 2);
  CHECK(unknown.err.find("--frobnicate") != std::string::npos);
  CHECK(unknown.err.find("Usage:") != std::string::npos);

  RunResult missing = Run({BinPath("kilnd")});
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("--manifests is required") != std::string::npos);

  RunResult bad_level =
      Run({BinPath("kilnd"), "--manifests", "m", "--state", "s", "--log-level", "loud"});
  CHECK(bad_level.exit_code == 2);

  RunResult bad_sd = Run({BinPath("kilnd"), "--manifests", "m", "--state", "s",
                          "--prometheus-sd-file", "/nonexistent-dir/kiln.json"});
  CHECK(bad_sd.exit_code == 2);
  CHECK(bad_sd.err.find("--prometheus-sd-file: directory /nonexistent-dir does not exist") !=
        std::string::npos);
}

}  // namespace
}  // namespace kiln::testing
