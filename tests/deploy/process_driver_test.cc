// The process driver with real processes (kiln-testsvc), real signals and real ports.

#include "deploy/process_driver.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/ip/tcp.hpp>
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "deploy/cgroup.h"
#include "deploy/prober.h"
#include "deploy/proc.h"
#include "tests/deploy/deploy_test_util.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::PortWindow;
using testing::RunUntil;
using testing::TempDir;

using Isolation = ProcessDriver::Isolation;

const char* Name(Isolation i) { return i == Isolation::kCgroup ? "cgroup" : "session"; }

struct DriverFixture {
  explicit DriverFixture(Isolation isolation = Isolation::kAuto)
      : store(*ArtifactStore::Open(tmp / "artifacts")), isolation(isolation) {
    svc_digest = *store.Put(testing::TestServicePath());
    driver = MakeDriver();
    driver->SetExitCallback([this](const ExitInfo& e) { exits.push_back(e); });
  }
  ~DriverFixture() {
    try {
      StopEverything();
    } catch (...) {
      std::fputs("DriverFixture: stopping the test's instances failed\n", stderr);
    }
  }

  // Leave nothing running, whatever the test did: every process of every instance.
  void StopEverything() {
    if (!driver) driver = MakeDriver();
    auto running = driver->List();
    if (!running.ok()) return;
    size_t stopped = 0;
    for (const auto& r : *running) {
      driver->Stop(r.handle, 0ms, [&](const StatusOr<ExitInfo>&) { ++stopped; });
    }
    RunUntil(io, [&] { return stopped == running->size(); });
  }

  std::unique_ptr<ProcessDriver> MakeDriver() {
    return std::make_unique<ProcessDriver>(io, MakeOptions());
  }

  ProcessDriver::Options MakeOptions() {
    ProcessDriver::Options o;
    o.log_dir = tmp / "logs";
    o.artifacts = &store;
    o.port_first = PortWindow();
    o.port_last = PortWindow() + testing::kPortWindowSize - 1;
    o.controller_id = ControllerId();
    o.isolation = isolation;
    o.instance_nofile_soft = instance_nofile_soft;
    return o;
  }
  uint64_t instance_nofile_soft = 0;

  // Starts the instance from another process that exits right after, like a kilnd that stopped:
  // the instance is not this process's child, as after a real restart of kilnd.
  StatusOr<InstanceHandle> StartElsewhere(const InstanceSpec& spec) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return InternalError("pipe");
    pid_t pid = ::fork();
    if (pid == 0) {
      ::close(p[0]);
      boost::asio::io_context other_io;
      ProcessDriver other(other_io, MakeOptions());
      std::string out;
      other.Start(spec, [&](StatusOr<InstanceHandle> r) {
        out = r.ok() ? r->id + " " + std::to_string(r->port) : "! " + r.status().message();
      });
      while (out.empty()) other_io.run_one();  // its watch of the instance keeps it busy
      ssize_t ignored = ::write(p[1], out.data(), out.size());
      (void)ignored;
      ::_exit(0);
    }
    ::close(p[1]);
    std::string out;
    char buf[256];
    for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) > 0;)
      out.append(buf, static_cast<size_t>(n));
    ::close(p[0]);
    ::waitpid(pid, nullptr, 0);
    size_t space = out.find(' ');
    if (out.empty() || out[0] == '!' || space == std::string::npos) return InternalError(out);
    InstanceHandle h{spec.instance, out.substr(0, space), "127.0.0.1",
                     std::stoi(out.substr(space + 1))};
    if (proc::ReadStat(PidOfId(h.id))->ppid == ::getpid()) return InternalError("still our child");
    return h;
  }
  static pid_t PidOfId(const std::string& id) { return std::stoi(id.substr(4)); }

  // kilnd "restarts": the driver goes away, the instances stay; a new one takes over.
  void Restart() {
    driver.reset();
    driver = MakeDriver();
    driver->SetExitCallback([this](const ExitInfo& e) { exits.push_back(e); });
  }

  std::string ControllerId() const { return ControllerIdForStateDir(tmp.path()); }

  // Every live process that carries the instance's identity, wherever it is.
  std::set<pid_t> ProcessesOf(const std::string& instance) const {
    std::set<pid_t> out;
    for (pid_t pid : proc::ListPids()) {
      auto env = proc::ReadEnviron(pid);
      auto st = proc::ReadStat(pid);
      if (st.ok() && st->state != 'Z' && env["KILN_CONTROLLER"] == ControllerId() &&
          env["KILN_INSTANCE"] == instance) {
        out.insert(pid);
      }
    }
    return out;
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
    RunUntil(
        io, [&] { return result.has_value(); }, 30s);
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
    return RunUntil(
        io, [&] { return healthy; }, 20s);
  }

  TempDir tmp;
  boost::asio::io_context io;
  ArtifactStore store;
  std::string svc_digest;
  Isolation isolation;
  std::unique_ptr<ProcessDriver> driver;
  std::vector<ExitInfo> exits;
};

pid_t PidOf(const InstanceHandle& h) { return std::stoi(h.id.substr(4)); }

std::set<std::string> OpenFds(pid_t pid) {
  std::set<std::string> out;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    out.insert(e.path().filename().string());
  }
  return out;
}

// A non-blocking wait that lets the io_context run for a while, for things that must NOT happen.
void RunFor(boost::asio::io_context& io, std::chrono::milliseconds how_long) {
  RunUntil(
      io, [] { return false; }, how_long);
}

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
  CHECK(adopted.message() ==
        "instance web-9 is gone: pid " + std::to_string(me) + " now belongs to another process");
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
  // The prober reports every result, so count instances, not results.
  std::set<std::string> healthy;
  for (auto& r : results) {
    ProbeTarget t;
    t.instance = (*r)->instance;
    t.port = (*r)->port;
    t.check.kind = ProbeKind::kTcp;
    t.check.interval = 50ms;
    prober.Watch(t, [&, name = t.instance](const ProbeResult& p) {
      if (p.healthy) healthy.insert(name);
    });
  }
  CHECK(RunUntil(
      f.io, [&] { return healthy.size() == kCount; }, 60s));
  CHECK(f.exits.empty());
  int stopped = 0;
  for (auto& r : results) f.driver->Stop(**r, 5s, [&](const StatusOr<ExitInfo>&) { ++stopped; });
  CHECK(RunUntil(
      f.io, [&] { return stopped == kCount; }, 60s));
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

TEST_CASE("an instance holds only stdin, stdout and stderr, whatever kilnd leaves open",
          "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  REQUIRE(f.driver->isolation() == isolation);  // this machine has a writable cgroup v2
  // What kilnd might hold without close-on-exec: a listening socket and a pipe.
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(listener >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  REQUIRE(::listen(listener, 4) == 0);
  int leaked[2];
  REQUIRE(::pipe(leaked) == 0);

  // A program that opens nothing itself, found through the instance's PATH; Start returns
  // once it has exec'd.
  auto spec = f.Spec("web-1");
  spec.command = {"sleep", "600"};
  auto h = f.StartSync(spec);
  ::close(listener);
  ::close(leaked[0]);
  ::close(leaked[1]);
  REQUIRE(h.ok());
  pid_t pid = PidOf(*h);
  CHECK(std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/exe").filename() ==
        "sleep");
  CHECK(OpenFds(pid) == std::set<std::string>{"0", "1", "2"});
  const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd/";
  CHECK(std::filesystem::read_symlink(fd_dir + "0") == "/dev/null");
  CHECK(std::filesystem::read_symlink(fd_dir + "1") == f.tmp / "logs/web-1.log");
  CHECK(std::filesystem::read_symlink(fd_dir + "2") == f.tmp / "logs/web-1.log");
  REQUIRE(f.StopSync(*h, 5s).ok());
}
TEST_CASE("instances start with the descriptor limit kilnd was started with, not its raised one",
          "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  f.instance_nofile_soft = 777;
  f.Restart();
  auto spec = f.Spec("web-1");
  spec.command = {"sleep", "600"};
  auto h = f.StartSync(spec);
  REQUIRE(h.ok());
  std::ifstream limits("/proc/" + std::to_string(PidOf(*h)) + "/limits");
  std::string line, nofile;
  while (std::getline(limits, line)) {
    if (line.rfind("Max open files", 0) == 0) nofile = line;
  }
  INFO(nofile);
  std::istringstream fields(nofile.substr(std::string("Max open files").size()));
  std::string soft;
  fields >> soft;
  CHECK(soft == "777");
  REQUIRE(f.StopSync(*h, 5s).ok());
}

TEST_CASE("a ready pidfd is not an exit while the kernel reports none", "[driver]") {
  DriverFixture f;
  auto h = f.StartSync(f.Spec("web-1"));
  REQUIRE(h.ok());
  REQUIRE(f.WaitHealthy(*h));

  // Our child: waitid(WNOHANG) says "still running" (si_pid == 0).
  f.driver->PidfdReadyForTest("web-1");
  RunFor(f.io, 200ms);
  CHECK(f.exits.empty());
  CHECK(f.driver->WatchedCountForTest() == 1);
  CHECK(*f.driver->IsRunning(*h));

  // The watch goes on: the real exit is reported, once.
  ::kill(PidOf(*h), SIGKILL);
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 1; }));
  CHECK(f.exits[0].instance == "web-1");
  CHECK(f.exits[0].signal == SIGKILL);

  // Adopted, not our child (waitid: ECHILD): /proc says it runs.
  auto a = f.StartElsewhere(f.Spec("web-2"));
  REQUIRE(a.ok());
  REQUIRE(f.driver->Adopt(*a).ok());
  f.driver->PidfdReadyForTest("web-2");
  RunFor(f.io, 200ms);
  CHECK(f.exits.size() == 1);
  CHECK(f.driver->WatchedCountForTest() == 1);
  ::kill(PidOf(*a), SIGKILL);
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 2; }));
  CHECK(f.exits[1].instance == "web-2");
  CHECK_FALSE(f.exits[1].status_known);
  RunFor(f.io, 100ms);
  CHECK(f.exits.size() == 2);
  CHECK(f.driver->WatchedCountForTest() == 0);
}

TEST_CASE("stopping an adopted instance ends every process of it, also those ignoring SIGTERM",
          "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  REQUIRE(f.driver->isolation() == isolation);
  // The leader exits on SIGTERM; its child ignores SIGTERM. Started by an earlier kilnd.
  auto h = f.StartElsewhere(f.Spec("web-1", {"--child-ignoring-sigterm"}));
  REQUIRE(h.ok());
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").size() == 2; }));
  const std::set<pid_t> before = f.ProcessesOf("web-1");
  if (isolation == Isolation::kCgroup) {
    const auto dir = f.driver->CgroupDirForTest("web-1");
    CHECK(proc::ReadCgroupV2(PidOf(*h)).ok());
    for (pid_t pid : before) {
      CHECK(std::filesystem::path(*proc::ReadCgroupV2(pid)).filename() == "web-1");
    }
    CHECK(std::filesystem::exists(dir));
  }

  REQUIRE(f.driver->Adopt(*h).ok());
  auto stopped = f.StopSync(*h, 300ms);
  REQUIRE(stopped.ok());
  CHECK(f.ProcessesOf("web-1").empty());
  for (pid_t pid : before)
    CHECK_FALSE(proc::IsAlive(pid, proc::ReadStat(pid).ok() ? proc::ReadStat(pid)->start_time : 0));
  CHECK_FALSE(*f.driver->IsRunning(*h));
  CHECK(f.driver->List()->empty());
  CHECK(f.driver->WatchedCountForTest() == 0);
  CHECK(f.exits.empty());
  if (isolation == Isolation::kCgroup)
    CHECK_FALSE(std::filesystem::exists(f.driver->CgroupDirForTest("web-1")));
}

TEST_CASE("the end of an adopted instance's leader takes what it left behind with it", "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  auto h = f.StartElsewhere(f.Spec("web-1", {"--child-ignoring-sigterm"}));
  REQUIRE(h.ok());
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").size() == 2; }));
  REQUIRE(f.driver->Adopt(*h).ok());
  ::kill(PidOf(*h), SIGKILL);  // the leader crashes; its child stays
  REQUIRE(RunUntil(f.io, [&] { return f.exits.size() == 1; }));
  CHECK(f.exits[0].instance == "web-1");
  CHECK(f.ProcessesOf("web-1").empty());  // reported once nothing of it runs
  CHECK(f.driver->WatchedCountForTest() == 0);
  if (isolation == Isolation::kCgroup)
    CHECK_FALSE(std::filesystem::exists(f.driver->CgroupDirForTest("web-1")));
}

TEST_CASE("processes left behind while kilnd was down are found, and killed on adoption",
          "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  auto h = f.StartElsewhere(f.Spec("web-1", {"--child-ignoring-sigterm"}));
  REQUIRE(h.ok());
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").size() == 2; }));
  // kilnd is down; the leader dies, its child stays.
  ::kill(PidOf(*h), SIGKILL);
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").size() == 1; }));

  auto listed = f.driver->List();
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 1);  // the instance, not "nothing running"
  CHECK((*listed)[0].handle.instance == "web-1");
  CHECK((*listed)[0].handle.id == "pid:0:0");  // its leader is gone
  CHECK((*listed)[0].service == "web");
  CHECK(*f.driver->IsRunning(*h));  // something of it must still be stopped

  Status adopted = f.driver->Adopt(*h);
  CHECK(adopted.code() == StatusCode::kNotFound);
  CHECK(adopted.message() == "instance web-1 (pid " + std::to_string(PidOf(*h)) +
                                 ") is gone; killing the 1 processes it left behind");
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").empty(); }));
  REQUIRE(RunUntil(f.io, [&] { return f.driver->WatchedCountForTest() == 0; }));
  CHECK(f.exits.empty());  // not an exit of a watched instance: recovery marks it gone
  CHECK(f.driver->List()->empty());
  if (isolation == Isolation::kCgroup)
    CHECK_FALSE(std::filesystem::exists(f.driver->CgroupDirForTest("web-1")));
}

TEST_CASE("a child in a session of its own is not taken for the instance", "[driver]") {
  auto isolation = GENERATE(Isolation::kCgroup, Isolation::kSession);
  DriverFixture f(isolation);
  INFO("mode " << Name(isolation));
  auto h = f.StartElsewhere(f.Spec("web-1", {"--child-setsid"}));
  REQUIRE(h.ok());
  REQUIRE(RunUntil(f.io, [&] { return f.ProcessesOf("web-1").size() == 2; }));
  std::set<pid_t> procs = f.ProcessesOf("web-1");
  procs.erase(PidOf(*h));
  const pid_t child = *procs.begin();
  REQUIRE(proc::ReadStat(child)->session == child);  // a session leader too
  const uint64_t child_start = proc::ReadStat(child)->start_time;

  auto listed = f.driver->List();
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].handle.id == h->id);  // the leader's pid and start time
  CHECK((*listed)[0].handle.port == h->port);
  CHECK((*listed)[0].revision == 1);
  REQUIRE(f.driver->Adopt((*listed)[0].handle).ok());

  auto stopped = f.StopSync(*h, 5s);
  REQUIRE(stopped.ok());
  CHECK(f.ProcessesOf("web-1").empty());  // the leader and the child
  CHECK_FALSE(proc::IsAlive(child, child_start));
  CHECK(f.driver->List()->empty());
}

TEST_CASE("the cgroup v2 mount is found in mountinfo", "[driver]") {
  const std::string hybrid =
      "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
      "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
      "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
  auto m = cgroup::FindV2Mount(hybrid);
  REQUIRE(m.ok());
  CHECK(m->mount_point == "/sys/fs/cgroup/unified");
  CHECK(m->root == "/");
  auto pure = cgroup::FindV2Mount(
      "25 30 0:23 /kubepods/pod1 /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n");
  REQUIRE(pure.ok());
  CHECK(pure->mount_point == "/sys/fs/cgroup");
  CHECK(pure->root == "/kubepods/pod1");
  CHECK(cgroup::FindV2Mount("1 0 0:1 / /a\\040b rw - cgroup2 none rw\n")->mount_point == "/a b");
  CHECK(cgroup::FindV2Mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
            .status()
            .code() == StatusCode::kNotFound);
}

}  // namespace
}  // namespace kiln
