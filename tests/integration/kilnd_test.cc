// kilnd as a user runs it: a real process, a real state directory, real signals.

#include <signal.h>

#include <catch2/catch.hpp>

#include "storage/sqlite.h"
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
}

}  // namespace
}  // namespace kiln::testing
