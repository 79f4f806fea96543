// The process driver with real processes (kiln-testsvc), real signals and real ports.

#include "deploy/process_driver.h"

#include <signal.h>

#include <boost/asio/ip/tcp.hpp>
#include <catch2/catch.hpp>
#include <set>
#include <thread>

#include "deploy/proc.h"
#include "deploy/prober.h"
#include "tests/deploy/deploy_test_util.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::PortWindow;
using testing::RunUntil;
using testing::TempDir;

struct DriverFixture {
  DriverFixture() : store(*ArtifactStore::Open(tmp / "artifacts")) {
    svc_digest = *store.Put(testing::TestServicePath());
    driver = MakeDriver();
    driver->SetExitCallback([this](const ExitInfo& e) { exits.push_back(e); });
  }
  ~DriverFixture() {
    // Leave nothing running, whatever the test did.
    if (!driver) driver = MakeDriver();
    auto running = driver->List();
    if (running.ok()) {
      for (const auto& r : *running) {
        StatusOr<bool> alive = driver->IsRunning(r.handle);
        if (alive.ok() && *alive) ::kill(-std::stoi(r.handle.id.substr(4)), SIGKILL);
      }
    }
  }

  std::unique_ptr<ProcessDriver> MakeDriver() {
    ProcessDriver::Options o;
    o.log_dir = tmp / "logs";
    o.artifacts = &store;
    o.port_first = PortWindow();
    o.port_last = PortWindow() + testing::kPortWindowSize - 1;
    o.controller_id = ControllerIdForStateDir(tmp.path());
    return std::make_unique<ProcessDriver>(io, o);
  }

  InstanceSpec Spec(const std::string& instance, std::vector<std::string> extra = {}) {
    InstanceSpec s;
    s.instance = instance;
    s.service = "web";
    s.revision = 1;
    s.artifact_sha256 = svc_digest;
    s.command = {"{artifact}", "--version-string", "v1"};
    s.command.insert(s.command.end(), extra.begin(), extra.end());
    s.env = {{"GREETING", "hello"}};
    return s;
  }

  StatusOr<InstanceHandle> StartSync(const InstanceSpec& spec) {
    std::optional<StatusOr<InstanceHandle>> result;
    driver->Start(spec, [&](StatusOr<InstanceHandle> r) { result = std::move(r); });
    RunUntil(io, [&] { return result.has_value(); });
    return std::move(*result);
  }

  StatusOr<ExitInfo> StopSync(const InstanceHandle& h, Duration grace) {
    std::optional<StatusOr<ExitInfo>> result;
    driver->Stop(h, grace, [&](StatusOr<ExitInfo> r) { result = std::move(r); });
    RunUntil(io, [&] { return result.has_value(); }, 30s);
    REQUIRE(result.has_value());
    return std::move(*result);
  }

  // Waits until the instance answers its HTTP health check.
  bool WaitHealthy(const InstanceHandle& h) {
    Prober prober(io);
    ProbeTarget t;
    t.instance = h.instance;
    t.port = h.port;
    t.check.kind = ProbeKind::kHttp;
    t.check.http_path = "/healthz";
    t.check.interval = 20ms;
    bool healthy = false;
    prober.Watch(t, [&](const ProbeResult& r) { healthy = r.healthy; });
    return RunUntil(io, [&] { return healthy; }, 20s);
  }

  TempDir tmp;
  boost::asio::io_context io;
  ArtifactStore store;
  std::string svc_digest;
  std::unique_ptr<ProcessDriver> driver;
  std::vector<ExitInfo> exits;
};

pid_t PidOf(const InstanceHandle& h) { return std::stoi(h.id.substr(4)); }

TEST_CASE("start runs the artifact from the store with kiln's environment - stop ends it",
          "[driver]") {
  DriverFixture f;
  auto h = f.StartSync(f.Spec("web-1"));
  REQUIRE(h.ok());
  CHECK(h->port >= PortWindow());
  CHECK(h->port < PortWindow() + testing::kPortWindowSize);
  REQUIRE(f.WaitHealthy(*h));
  CHECK(*f.driver->IsRunning(*h));

  // Runs the stored copy, in its own session, with exactly kiln's environment.
  pid_t pid = PidOf(*h);
  CHECK(std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/exe") ==
        f.store.PathFor(f.svc_digest));
  CHECK(proc::ReadStat(pid)->session == pid);
  auto env = proc::ReadEnviron(pid);
  CHECK(env["KILN_SERVICE"] == "web");
  CHECK(env["KILN_REVISION"] == "1");
  CHECK(env["KILN_INSTANCE"] == "web-1");
  CHECK(env["PORT"] == std::to_string(h->port));
  CHECK(env["GREETING"] == "hello");
  CHECK(env.count("HOME") == 0);

  auto stopped = f.StopSync(*h, 5s);
  REQUIRE(stopped.ok());
  CHECK(stopped->exit_code == 0);  // the test service exits cleanly on SIGTERM
  CHECK_FALSE(*f.driver->IsRunning(*h));
  CHECK(f.exits.empty());  // a requested stop is not reported as an unexpected exit
  CHECK(f.driver->WatchedCountForTest() == 0);
  // Its output went to STATE/logs/<instance>.log.
  std::string log = testing::ReadFile(f.tmp / "logs/web-1.log");
  CHECK(log.find("kiln-testsvc v1 listening on 127.0.0.1:" + std::to_string(h->port)) !=
        std::string::npos);
}

TEST_CASE("an exit is reported with its code - a kill with its signal", "[driver]") {
  DriverFixture f;
  auto a = f.StartSync(f.Spec("web-1", {"--exit-after", "100ms", "--exit-code", "3"}));
  auto b = f.StartSync(f.Spec("web-2"));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 1; }));
  CHECK(f.exits[0].instance == "web-1");
  CHECK(f.exits[0].exit_code == 3);
  CHECK(f.exits[0].Describe() == "exited with code 3");

  ::kill(PidOf(*b), SIGKILL);
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 2; }));
  CHECK(f.exits[1].instance == "web-2");
  CHECK(f.exits[1].signal == SIGKILL);
  CHECK(f.exits[1].Describe() == "killed by SIGKILL");
}

TEST_CASE("an instance that ignores SIGTERM is killed after the grace period", "[driver]") {
  DriverFixture f;
  auto h = f.StartSync(f.Spec("web-1", {"--ignore-sigterm"}));
  REQUIRE(h.ok());
  REQUIRE(f.WaitHealthy(*h));
  auto begin = std::chrono::steady_clock::now();
  auto stopped = f.StopSync(*h, 300ms);
  auto took = std::chrono::steady_clock::now() - begin;
  REQUIRE(stopped.ok());
  CHECK(stopped->signal == SIGKILL);
  CHECK(took >= 300ms);  // not before the grace period: it was given its chance
  CHECK_FALSE(*f.driver->IsRunning(*h));
}

TEST_CASE("a new driver adopts the instances an earlier one started", "[driver]") {
  DriverFixture f;
  std::vector<InstanceHandle> handles;
  for (int i = 1; i <= 3; ++i) {
    auto h = f.StartSync(f.Spec("web-" + std::to_string(i)));
    REQUIRE(h.ok());
    handles.push_back(*h);
  }
  // kilnd "restarts": the driver goes away, the instances stay.
  f.driver.reset();
  for (const auto& h : handles) CHECK(proc::ReadStat(PidOf(h)).ok());

  f.driver = f.MakeDriver();
  f.driver->SetExitCallback([&](const ExitInfo& e) { f.exits.push_back(e); });
  auto listed = f.driver->List();
  REQUIRE(listed.ok());
  std::set<std::string> names;
  for (const auto& r : *listed) {
    names.insert(r.handle.instance);
    CHECK(r.service == "web");
    CHECK(r.revision == 1);
  }
  CHECK(names == std::set<std::string>{"web-1", "web-2", "web-3"});
  for (const auto& h : handles) REQUIRE(f.driver->Adopt(h).ok());
  CHECK(f.driver->WatchedCountForTest() == 3);

  // Exits of adopted instances are seen.
  ::kill(PidOf(handles[0]), SIGKILL);
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 1; }));
  CHECK(f.exits[0].instance == "web-1");
  // A new start after adoption does not take an adopted instance's port.
  auto h4 = f.StartSync(f.Spec("web-4"));
  REQUIRE(h4.ok());
  CHECK(h4->port != handles[1].port);
  CHECK(h4->port != handles[2].port);
  for (const auto& h : {handles[1], handles[2], *h4}) REQUIRE(f.StopSync(h, 5s).ok());
  CHECK(f.driver->List()->empty());
}

TEST_CASE("a handle whose pid now belongs to another process is not taken for the instance",
          "[driver]") {
  DriverFixture f;
  // This test's own pid, with the wrong start time: what a reused pid looks like.
  pid_t me = ::getpid();
  uint64_t start = proc::ReadStat(me)->start_time;
  InstanceHandle h{"web-9", "pid:" + std::to_string(me) + ":" + std::to_string(start + 1), "", 0};
  Status adopted = f.driver->Adopt(h);
  CHECK(adopted.code() == StatusCode::kNotFound);
  CHECK(adopted.message() == "instance web-9 is gone: pid " + std::to_string(me) +
                                 " now belongs to another process");
  CHECK_FALSE(*f.driver->IsRunning(h));
  // Stopping it is a no-op that reports it gone, and signals nothing.
  auto stopped = f.StopSync(h, 100ms);
  REQUIRE(stopped.ok());
  CHECK_FALSE(stopped->status_known);

  InstanceHandle gone{"web-8", "pid:999999999:1", "", 0};
  CHECK(f.driver->Adopt(gone).code() == StatusCode::kNotFound);
  CHECK(f.driver->Adopt({"web-7", "garbage", "", 0}).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("failed starts are clear errors and leave nothing running", "[driver]") {
  DriverFixture f;
  auto missing = f.Spec("web-1");
  missing.artifact_sha256 = std::string(64, 'e');
  auto r1 = f.StartSync(missing);
  REQUIRE_FALSE(r1.ok());
  CHECK(r1.status().message() == "start web-1: artifact sha256:eeeeeeeeeeee at " +
                                     f.store.PathFor(std::string(64, 'e')).string() +
                                     ": No such file or directory");

  testing::WriteFile(f.tmp / "not-a-program", "this is text, not a program\n");
  std::string text_digest = *f.store.Put(f.tmp / "not-a-program");
  auto not_exec = f.Spec("web-2");
  not_exec.artifact_sha256 = text_digest;
  auto r2 = f.StartSync(not_exec);
  REQUIRE_FALSE(r2.ok());
  CHECK(r2.status().message() == "start web-2: cannot execute " +
                                     f.store.PathFor(text_digest).string() + ": Exec format error");

  auto bad_cmd = f.Spec("web-3");
  bad_cmd.command = {"/nonexistent/server", "{port}"};
  auto r3 = f.StartSync(bad_cmd);
  REQUIRE_FALSE(r3.ok());
  CHECK(r3.status().message() ==
        "start web-3: cannot execute /nonexistent/server: No such file or directory");

  CHECK(f.driver->WatchedCountForTest() == 0);
  CHECK(f.driver->List()->empty());
  auto ok = f.StartSync(f.Spec("web-4"));
  REQUIRE(ok.ok());
  REQUIRE(f.StopSync(*ok, 5s).ok());
}

TEST_CASE("a port in use by another program is skipped", "[driver]") {
  DriverFixture f;
  boost::asio::ip::tcp::acceptor squatter(
      f.io, {boost::asio::ip::make_address("0.0.0.0"), static_cast<uint16_t>(PortWindow())});
  auto h = f.StartSync(f.Spec("web-1"));
  REQUIRE(h.ok());
  CHECK(h->port == PortWindow() + 1);
  REQUIRE(f.StopSync(*h, 5s).ok());
}

TEST_CASE("200 concurrent starts never share a port", "[driver]") {
  DriverFixture f;
  constexpr int kCount = 200;
  std::vector<std::optional<StatusOr<InstanceHandle>>> results(kCount);
  for (int i = 0; i < kCount; ++i) {
    f.driver->Start(f.Spec("web-" + std::to_string(i + 1)),
                    [&, i](StatusOr<InstanceHandle> r) { results[i] = std::move(r); });
  }
  REQUIRE(RunUntil(f.io, [&] {
    return std::all_of(results.begin(), results.end(), [](auto& r) { return r.has_value(); });
  }));
  std::set<int> ports;
  for (auto& r : results) {
    REQUIRE(r->ok());
    ports.insert((*r)->port);
  }
  CHECK(ports.size() == kCount);
  // Every one of them could listen on its port (a collision would make one exit with code 3).
  Prober prober(f.io);
  int healthy = 0;
  for (auto& r : results) {
    ProbeTarget t;
    t.instance = (*r)->instance;
    t.port = (*r)->port;
    t.check.kind = ProbeKind::kTcp;
    t.check.interval = 50ms;
    prober.Watch(t, [&](const ProbeResult& p) { healthy += p.healthy ? 1 : 0; });
  }
  CHECK(RunUntil(f.io, [&] { return healthy == kCount; }, 60s));
  CHECK(f.exits.empty());
  int stopped = 0;
  for (auto& r : results) f.driver->Stop(**r, 5s, [&](StatusOr<ExitInfo>) { ++stopped; });
  CHECK(RunUntil(f.io, [&] { return stopped == kCount; }, 60s));
  CHECK(f.driver->List()->empty());
}

TEST_CASE("changing the artifact's source after the put does not change what runs", "[driver]") {
  DriverFixture f;
  std::filesystem::copy_file(testing::TestServicePath(), f.tmp / "svc");
  std::string digest = *f.store.Put(f.tmp / "svc");
  testing::WriteFile(f.tmp / "svc", "#!/bin/sh\necho tampered\n");  // overwrite the source
  auto spec = f.Spec("web-1");
  spec.artifact_sha256 = digest;
  auto h = f.StartSync(spec);
  REQUIRE(h.ok());
  CHECK(f.WaitHealthy(*h));  // still the real service
  CHECK(f.store.Verify(digest).ok());
  REQUIRE(f.StopSync(*h, 5s).ok());
}

}  // namespace
}  // namespace kiln
