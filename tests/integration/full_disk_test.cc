// kilnd restarting on a full disk: it starts, serves status and says why it is not ready, acts
// on nothing it cannot record, and recovers once there is space. The state directory is a small
// tmpfs of its own (the test needs root to mount it, as CI and `make test` have).

#include <sys/mount.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

// Fills the file system holding `dir` with one file; removing it frees the space again.
void Fill(const std::filesystem::path& file) {
  std::ofstream out(file, std::ios::binary);
  std::string block(1 << 16, 'x');
  while (out.write(block.data(), static_cast<std::streamsize>(block.size()))) {
  }
}

class TmpfsState {
 public:
  explicit TmpfsState(const std::filesystem::path& dir) : dir_(dir) {
    std::filesystem::create_directories(dir_);
    mounted_ = ::mount("tmpfs", dir_.c_str(), "tmpfs", 0, "size=48m") == 0;
  }
  ~TmpfsState() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }

 private:
  std::filesystem::path dir_;
  bool mounted_ = false;
};

TEST_CASE("kilnd restarted on a full disk serves status and recovers when space returns",
          "[full_disk]") {
  KilndHarness h;
  TmpfsState fs(h.state());
  if (!fs.mounted()) {
    // Only root can mount; `make test` and CI run as root, where this must work.
    REQUIRE(::geteuid() != 0);
    WARN("not root: cannot mount a small file system to fill; skipped");
    return;
  }
  h.Declare("web", "1.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor(
      [&] { return h.Healthy("web") == 2 && h.HasEvent("web", EventKind::kRolloutCompleted); }));
  SECTION("after SIGTERM") {
    h.kilnd().Signal(SIGTERM);
    REQUIRE(h.kilnd().Wait(10s) == 0);
  }
  SECTION("after SIGKILL") { h.Kill9(); }

  // The disk fills while kilnd is down, and one instance dies: recovery has something to write.
  const auto fill = h.state() / "fill";
  Fill(fill);
  const auto live = h.Live("web");
  REQUIRE(live.size() == 2);
  const pid_t victim = static_cast<pid_t>(std::atoi(live[0].handle.c_str() + 4));
  ::kill(-victim, SIGKILL);
  REQUIRE(WaitFor([&] { return h.InstanceProcesses().size() == 1; }));

  h.Start();
  REQUIRE(h.kilnd().WaitForStderr("cannot record start-up recovery", 20s));
  // No room for STATE/kilnd.addr either: kilnd says so and runs on. Its one TCP listener is HTTP.
  REQUIRE(h.kilnd().WaitForStderr("cannot write the address file", 20s));
  std::set<int> listening;
  REQUIRE(WaitFor([&] { return (listening = h.ListeningTcpPorts()).size() == 1; }));
  const int port = *listening.begin();
  HttpReply ready;
  REQUIRE(WaitFor([&] { return (ready = HttpRequest(port, "/readyz")).status != 0; }));
  INFO(ready.body);
  CHECK(ready.status == 503);
  CHECK(ready.body.find("\"recovered\":{\"error\":\"") != std::string::npos);
  auto checks = nlohmann::json::parse(ready.body, nullptr, false);
  REQUIRE(checks.is_object());
  CHECK(checks["checks"]["store_writable"]["ok"] == false);
  CHECK(checks["checks"]["store_writable"]["error"].get<std::string>().find("disk is full") !=
        std::string::npos);
  RunResult status = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status", "web"});
  CHECK(status.exit_code == 0);
  CHECK(status.out.find("Service:    web") != std::string::npos);
  // Nothing acted: the survivor still runs, no replacement was started.
  CHECK(h.InstanceProcesses().size() == 1);
  CHECK(h.kilnd().Wait(0ms) == -1);  // still running

  std::filesystem::remove(fill);
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }, 60s));
  CHECK(h.kilnd().WaitForStderr("start-up recovery recorded", 10s));
  CHECK(WaitFor([&] { return HttpRequest(port, "/readyz").status == 200; }));
  CHECK(WaitFor([&] { return h.TrackingProblems({"web"}).empty(); }));
  INFO(h.TrackingProblems({"web"}));
}

}  // namespace
}  // namespace kiln::testing
