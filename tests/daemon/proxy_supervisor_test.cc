// kilnd's supervisor of its data plane, with real processes: started in a session of its own with
// nothing of ours, recorded in a pidfile, adopted by the next supervisor, restarted with back-off,
// stopped when no longer wanted.

#include "daemon/proxy_supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <set>
#include <sstream>
#include <thread>

#include "common/logging.h"
#include "common/unique_fd.h"
#include "deploy/proc.h"
#include "tests/deploy/deploy_test_util.h"
#include "tests/integration/process.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// A state dir, an io_context to run supervisors on, and the clean-up of every process the test
// made: whatever the supervisors recorded and whatever the test saw.
struct Fixture {
  TempDir tmp;
  boost::asio::io_context io;
  std::set<pid_t> seen;

  ~Fixture() {
    if (auto text = proc::ReadSmallFile(Pidfile())) seen.insert(std::atoi(text->c_str()));
    for (pid_t pid : seen) {
      if (pid <= 1 || pid == ::getpid()) continue;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);  // ECHILD at once when it is not ours
    }
  }

  fs::path StateDir() const { return tmp / "proxy"; }
  fs::path Pidfile() const { return StateDir() / "pid"; }
  fs::path Log() const { return StateDir() / "output.log"; }

  ProxySupervisor::Options Opts(const std::string& binary, std::vector<std::string> args) const {
    ProxySupervisor::Options o;
    o.binary = binary;
    o.args = std::move(args);
    o.state_dir = StateDir();
    o.stop_grace = 2s;
    o.backoff_initial = 100ms;
    o.backoff_max = 400ms;
    o.name = "test-proxy";
    return o;
  }

  // Runs the io_context until `done`; remembers every pid a supervisor reports.
  bool Until(const ProxySupervisor& sup, const std::function<bool(const SupervisorStatus&)>& done,
             std::chrono::milliseconds timeout = 10s) {
    return RunUntil(
        io,
        [&] {
          SupervisorStatus s = sup.Status();
          if (s.pid > 0) seen.insert(s.pid);
          return done(s);
        },
        timeout);
  }
  void RunFor(std::chrono::milliseconds d) {
    RunUntil(
        io, [] { return false; }, d);
  }
};

bool Running(const SupervisorStatus& s) { return s.running; }

// What kilnd logs (to stderr) while it lives goes to a file.
class StderrCapture {
 public:
  explicit StderrCapture(fs::path file)
      : file_(std::move(file)), saved_(::fcntl(2, F_DUPFD_CLOEXEC, 3)) {
    UniqueFd fd(::open(file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    REQUIRE(fd);
    REQUIRE(::dup2(fd.get(), 2) == 2);
  }
  ~StderrCapture() { ::dup2(saved_.get(), 2); }
  std::string Text() const { return ReadFile(file_); }

 private:
  fs::path file_;
  UniqueFd saved_;
};

std::string PidfileFor(pid_t pid) {
  StatusOr<proc::Stat> st = proc::ReadStat(pid);
  REQUIRE(st.ok());
  return std::to_string(pid) + " " + std::to_string(st->start_time) + "\n";
}

bool Alive(pid_t pid) {
  StatusOr<proc::Stat> st = proc::ReadStat(pid);
  return st.ok() && st->state != 'Z';
}

std::set<std::string> OpenFds(pid_t pid) {
  std::set<std::string> fds;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd")) {
    fds.insert(e.path().filename().string());
  }
  return fds;
}

size_t Count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

TEST_CASE("proxy supervisor: starts the program in its own session with only 0-2 and its log",
          "[proxy_supervisor]") {
  Fixture f;
  // Left without close-on-exec on purpose: the program must not get it.
  UniqueFd leak(::open("/dev/null", O_RDONLY));
  REQUIRE(leak);

  ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
  sup.SetWanted(true);
  REQUIRE(f.Until(sup, Running));
  const SupervisorStatus s = sup.Status();
  CHECK(s.wanted);
  CHECK_FALSE(s.adopted);
  CHECK(s.restarts == 0);
  CHECK(s.error.empty());
  const int64_t now_ms = ToUnixMillis(std::chrono::system_clock::now());
  CHECK(s.started_unix_ms > now_ms - 10'000);
  CHECK(s.started_unix_ms <= now_ms);

  CHECK(ReadFile(f.Pidfile()) == PidfileFor(s.pid));
  CHECK(::getsid(s.pid) == s.pid);
  CHECK(::getsid(s.pid) != ::getsid(0));
  CHECK(OpenFds(s.pid) == std::set<std::string>{"0", "1", "2"});
  const std::string fd_dir = "/proc/" + std::to_string(s.pid) + "/fd/";
  CHECK(fs::read_symlink(fd_dir + "0") == "/dev/null");
  CHECK(fs::read_symlink(fd_dir + "1") == fs::canonical(f.Log()));
  CHECK(fs::read_symlink(fd_dir + "2") == fs::canonical(f.Log()));
}

TEST_CASE("proxy supervisor: the program inherits no descriptor (kiln-testsvc --check-fds)",
          "[proxy_supervisor]") {
  Fixture f;
  UniqueFd leak(::open("/dev/null", O_RDONLY));
  REQUIRE(leak);
  ProxySupervisor sup(f.io, f.Opts(TestServicePath(), {"--check-fds"}));
  sup.SetWanted(true);
  // It exits at once; its exit code says whether it found a descriptor beyond 0-2.
  REQUIRE(f.Until(sup, [](const SupervisorStatus& s) { return !s.last_exit.empty(); }));
  CHECK(sup.Status().last_exit == "exited with code 0");
  CHECK(ReadFile(f.Log()).find("inherited fd") == std::string::npos);
}

TEST_CASE("proxy supervisor: the process outlives the supervisor and the next one adopts it",
          "[proxy_supervisor]") {
  Fixture f;
  const int port = PortWindow() + 7;
  const auto opts = f.Opts(TestServicePath(), {"--port", std::to_string(port)});
  const std::string listening = "listening on 127.0.0.1:" + std::to_string(port);
  pid_t pid = 0;
  {
    ProxySupervisor first(f.io, opts);
    first.SetWanted(true);
    REQUIRE(f.Until(first, Running));
    pid = first.Status().pid;
    REQUIRE(RunUntil(f.io, [&] { return ReadFile(f.Log()).find(listening) != std::string::npos; }));
  }
  // kilnd is gone: the data plane is not.
  f.RunFor(300ms);
  CHECK(Alive(pid));
  CHECK(ReadFile(f.Pidfile()) == PidfileFor(pid));

  ProxySupervisor second(f.io, opts);
  second.SetWanted(true);
  REQUIRE(f.Until(second, Running));
  SupervisorStatus s = second.Status();
  CHECK(s.pid == pid);
  CHECK(s.adopted);
  CHECK_FALSE(s.binary_replaced);
  CHECK(s.restarts == 0);
  CHECK(s.started_unix_ms > 0);
  f.RunFor(300ms);
  // No second process: it would have written a second line (or failed to bind the port).
  CHECK(Count(ReadFile(f.Log()), "listening on") == 1);
  CHECK(second.Status().pid == pid);

  SECTION("kill -9: restarted with a new pid after the back-off") {
    const auto killed_at = std::chrono::steady_clock::now();
    REQUIRE(::kill(pid, SIGKILL) == 0);
    REQUIRE(
        f.Until(second, [&](const SupervisorStatus& st) { return st.running && st.pid != pid; }));
    CHECK(std::chrono::steady_clock::now() - killed_at >= 100ms);
    s = second.Status();
    CHECK(s.restarts == 1);
    // Adopted, but still a child of this test process: the exit status is known.
    CHECK(s.last_exit == "killed by SIGKILL");
    CHECK_FALSE(s.adopted);
    CHECK(ReadFile(f.Pidfile()) == PidfileFor(s.pid));
    REQUIRE(RunUntil(f.io, [&] { return Count(ReadFile(f.Log()), listening) == 2; }));
  }
}

TEST_CASE("proxy supervisor: a process whose binary an upgrade replaced is still adopted",
          "[proxy_supervisor]") {
  Fixture f;
  const fs::path binary = f.tmp / "bin" / "proxy";
  fs::create_directories(binary.parent_path());
  fs::copy_file("/bin/sleep", binary);
  pid_t pid = 0;
  {
    ProxySupervisor first(f.io, f.Opts(binary.string(), {"1000"}));
    first.SetWanted(true);
    REQUIRE(f.Until(first, Running));
    pid = first.Status().pid;
  }
  // The upgrade, as a package manager makes it: the new file renamed over the old one.
  fs::copy_file("/bin/sleep", binary.string() + ".new");
  fs::rename(binary.string() + ".new", binary);
  REQUIRE(fs::read_symlink("/proc/" + std::to_string(pid) + "/exe").string() ==
          fs::weakly_canonical(binary).string() + " (deleted)");

  ProxySupervisor second(f.io, f.Opts(binary.string(), {"1000"}));
  second.SetWanted(true);
  REQUIRE(f.Until(second, Running));
  const SupervisorStatus s = second.Status();
  CHECK(s.pid == pid);
  CHECK(s.adopted);
  CHECK(s.binary_replaced);
}

// Starts `/bin/sleep 1000` from a shell that exits, so that it is nobody's child here (like a
// proxy adopted from an earlier kilnd); `env` goes before the command. Returns its pid.
pid_t StartOrphanSleep(Fixture& f, const std::string& env = "") {
  RunResult r =
      Run({"/bin/sh", "-c", env + " /bin/sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"});
  REQUIRE(r.exit_code == 0);
  const pid_t pid = std::atoi(r.out.c_str());
  REQUIRE(pid > 0);
  f.seen.insert(pid);
  // The shell's child may not have exec'd sleep yet.
  const fs::path sleep = fs::canonical("/bin/sleep");
  REQUIRE(RunUntil(f.io, [&] {
    std::error_code ec;
    return fs::read_symlink("/proc/" + std::to_string(pid) + "/exe", ec) == sleep;
  }));
  return pid;
}

TEST_CASE("proxy supervisor: an adopted process that is not its child ends as gone",
          "[proxy_supervisor]") {
  Fixture f;
  const pid_t orphan = StartOrphanSleep(f);
  WriteFile(f.Pidfile(), PidfileFor(orphan));

  ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
  sup.SetWanted(true);
  REQUIRE(f.Until(sup, Running));
  CHECK(sup.Status().pid == orphan);
  CHECK(sup.Status().adopted);

  REQUIRE(::kill(orphan, SIGKILL) == 0);
  REQUIRE(f.Until(sup, [&](const SupervisorStatus& s) { return s.running && s.pid != orphan; }));
  CHECK(sup.Status().last_exit == "gone (status unknown: not started by this kilnd)");
  CHECK(sup.Status().restarts == 1);
}

TEST_CASE("proxy supervisor: a process the pidfile does not name is found by its mark",
          "[proxy_supervisor]") {
  Fixture f;
  SECTION("the pidfile was lost") {
    pid_t pid = 0;
    {
      ProxySupervisor first(f.io, f.Opts("/bin/sleep", {"1000"}));
      first.SetWanted(true);
      REQUIRE(f.Until(first, Running));
      pid = first.Status().pid;
    }
    REQUIRE(fs::remove(f.Pidfile()));
    ProxySupervisor second(f.io, f.Opts("/bin/sleep", {"1000"}));
    second.SetWanted(true);
    REQUIRE(f.Until(second, Running));
    CHECK(second.Status().pid == pid);
    CHECK(second.Status().adopted);
    CHECK(ReadFile(f.Pidfile()) == PidfileFor(pid));  // recorded again
  }
  SECTION("two carry the mark: the older is adopted, the other stopped") {
    const std::string mark = "KILN_SUPERVISOR_STATE=" + fs::weakly_canonical(f.StateDir()).string();
    const pid_t older = StartOrphanSleep(f, mark);
    std::this_thread::sleep_for(20ms);  // start times are in clock ticks (10 ms)
    const pid_t younger = StartOrphanSleep(f, mark);
    ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
    sup.SetWanted(true);
    REQUIRE(f.Until(sup, Running));
    CHECK(sup.Status().pid == older);
    REQUIRE(RunUntil(f.io, [&] { return !Alive(younger); }));
    CHECK(Alive(older));
  }
  SECTION("another state dir's mark is not this one's") {
    const pid_t other = StartOrphanSleep(f, "KILN_SUPERVISOR_STATE=" + (f.tmp / "other").string());
    ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
    sup.SetWanted(true);
    REQUIRE(f.Until(sup, Running));
    CHECK(sup.Status().pid != other);
    CHECK_FALSE(sup.Status().adopted);
    CHECK(Alive(other));
  }
}

TEST_CASE("proxy supervisor: a pidfile naming another process is not adopted",
          "[proxy_supervisor]") {
  Fixture f;
  StatusOr<proc::Stat> self = proc::ReadStat(::getpid());
  REQUIRE(self.ok());
  SECTION("a live pid with another start time (the pid was reused)") {
    WriteFile(f.Pidfile(),
              std::to_string(::getpid()) + " " + std::to_string(self->start_time + 1) + "\n");
  }
  SECTION("the same process, but it runs another program") {
    WriteFile(f.Pidfile(), PidfileFor(::getpid()));
  }
  SECTION("garbage") { WriteFile(f.Pidfile(), "not a pid\n"); }

  ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
  sup.SetWanted(true);
  REQUIRE(f.Until(sup, Running));
  const SupervisorStatus s = sup.Status();
  CHECK(s.pid != ::getpid());
  CHECK_FALSE(s.adopted);
  CHECK(ReadFile(f.Pidfile()) == PidfileFor(s.pid));
  StatusOr<proc::Stat> child = proc::ReadStat(s.pid);
  REQUIRE(child.ok());
  CHECK(child->ppid == ::getpid());  // a new one, ours
}

TEST_CASE("proxy supervisor: not wanted stops the process and removes the pidfile",
          "[proxy_supervisor]") {
  Fixture f;
  SECTION("SIGTERM") {
    ProxySupervisor sup(f.io, f.Opts("/bin/sleep", {"1000"}));
    sup.SetWanted(true);
    REQUIRE(f.Until(sup, Running));
    const pid_t pid = sup.Status().pid;
    sup.SetWanted(false);
    REQUIRE(f.Until(sup, [](const SupervisorStatus& s) { return !s.running; }));
    CHECK(sup.Status().last_exit == "killed by SIGTERM");
    CHECK(sup.Status().restarts == 0);
    CHECK_FALSE(proc::ReadStat(pid).ok());  // ended and reaped
    CHECK_FALSE(fs::exists(f.Pidfile()));
    f.RunFor(300ms);  // and not restarted
    CHECK_FALSE(sup.Status().running);

    sup.SetWanted(true);  // wanted again: a new one
    REQUIRE(f.Until(sup, Running));
    CHECK(sup.Status().pid != pid);
    CHECK(fs::exists(f.Pidfile()));
  }
  SECTION("SIGKILL after the grace period when SIGTERM is ignored") {
    auto opts =
        f.Opts(TestServicePath(), {"--port", std::to_string(PortWindow() + 8), "--ignore-sigterm"});
    opts.stop_grace = 300ms;
    ProxySupervisor sup(f.io, opts);
    sup.SetWanted(true);
    REQUIRE(f.Until(sup, Running));
    REQUIRE(
        RunUntil(f.io, [&] { return ReadFile(f.Log()).find("listening") != std::string::npos; }));
    const auto stop_at = std::chrono::steady_clock::now();
    sup.SetWanted(false);
    REQUIRE(f.Until(sup, [](const SupervisorStatus& s) { return !s.running; }));
    CHECK(std::chrono::steady_clock::now() - stop_at >= 300ms);
    CHECK(sup.Status().last_exit == "killed by SIGKILL");
    CHECK_FALSE(fs::exists(f.Pidfile()));
  }
  SECTION("wanted again while it stops: a new one once the old one has ended") {
    auto opts =
        f.Opts(TestServicePath(), {"--port", std::to_string(PortWindow() + 9), "--ignore-sigterm"});
    opts.stop_grace = 300ms;
    ProxySupervisor sup(f.io, opts);
    sup.SetWanted(true);
    REQUIRE(f.Until(sup, Running));
    const pid_t pid = sup.Status().pid;
    REQUIRE(
        RunUntil(f.io, [&] { return ReadFile(f.Log()).find("listening") != std::string::npos; }));
    sup.SetWanted(false);
    sup.SetWanted(true);
    CHECK(sup.Status().pid == pid);  // never two at once: the new one waits for the old one's end
    REQUIRE(f.Until(sup, [&](const SupervisorStatus& s) { return s.running && s.pid != pid; }));
    CHECK_FALSE(Alive(pid));
    CHECK(sup.Status().last_exit == "killed by SIGKILL");
    CHECK(sup.Status().restarts == 0);  // a stop and a start, not a crash
    CHECK(ReadFile(f.Pidfile()) == PidfileFor(sup.Status().pid));
  }
  SECTION("not wanted while it waits to restart: it is not restarted") {
    ProxySupervisor sup(f.io, f.Opts((f.tmp / "missing").string(), {}));
    sup.SetWanted(true);
    REQUIRE(sup.Status().restart_delay_ms == 100);
    sup.SetWanted(false);
    CHECK(sup.Status().restart_delay_ms == 0);
    CHECK(sup.Status().error.empty());
    f.RunFor(500ms);
    CHECK(sup.Status().restarts == 0);
    CHECK_FALSE(sup.Status().running);
  }
  SECTION("one left running by an earlier supervisor") {
    pid_t pid = 0;
    {
      ProxySupervisor first(f.io, f.Opts("/bin/sleep", {"1000"}));
      first.SetWanted(true);
      REQUIRE(f.Until(first, Running));
      pid = first.Status().pid;
    }
    ProxySupervisor second(f.io, f.Opts("/bin/sleep", {"1000"}));
    second.SetWanted(false);
    REQUIRE(f.Until(second, [](const SupervisorStatus& s) { return !s.running; }));
    CHECK(second.Status().last_exit == "killed by SIGTERM");
    CHECK_FALSE(Alive(pid));
    CHECK_FALSE(fs::exists(f.Pidfile()));
  }
}

TEST_CASE("proxy supervisor: a program that exits at once is restarted with growing delays",
          "[proxy_supervisor]") {
  Fixture f;
  auto opts = f.Opts("/bin/sh", {"-c", "date +%s%N; exit 3"});
  opts.backoff_initial = 50ms;
  opts.backoff_max = 400ms;
  ProxySupervisor sup(f.io, opts);
  sup.SetWanted(true);
  std::set<int64_t> delays;
  RunUntil(
      f.io,
      [&] {
        delays.insert(sup.Status().restart_delay_ms);
        return false;
      },
      2500ms);
  const SupervisorStatus s = sup.Status();
  CHECK(s.last_exit == "exited with code 3");
  CHECK(s.error.empty());
  // 50 + 100 + 200 + 400 + 400 ... ms: a handful in 2.5 s, never a spin.
  CHECK(s.restarts >= 3);
  CHECK(s.restarts <= 10);
  CHECK(*delays.rbegin() == 400);  // capped

  // Each start wrote its time: the gaps between starts grow with the back-off.
  std::vector<int64_t> starts;
  std::istringstream lines(ReadFile(f.Log()));
  for (std::string line; std::getline(lines, line);) starts.push_back(std::stoll(line));
  REQUIRE(starts.size() >= 5);
  // Every start but the last has written its line (the last may not have run yet).
  CHECK(static_cast<int64_t>(starts.size()) >= s.restarts);
  CHECK(static_cast<int64_t>(starts.size()) <= s.restarts + 1);
  const int64_t kMs = 1'000'000;
  CHECK(starts[1] - starts[0] >= 50 * kMs);
  CHECK(starts[2] - starts[1] >= 100 * kMs);
  CHECK(starts[3] - starts[2] >= 200 * kMs);
  CHECK(starts[4] - starts[3] >= 400 * kMs);
}

TEST_CASE("proxy supervisor: the back-off starts over once a process ran long enough",
          "[proxy_supervisor]") {
  Fixture f;
  auto opts = f.Opts("/bin/sh", {"-c", "sleep 0.4; exit 1"});
  opts.backoff_initial = 100ms;
  opts.backoff_max = 1600ms;
  opts.backoff_reset_after = 300ms;
  ProxySupervisor sup(f.io, opts);
  sup.SetWanted(true);
  std::set<int64_t> delays;
  REQUIRE(f.Until(
      sup,
      [&](const SupervisorStatus& s) {
        delays.insert(s.restart_delay_ms);
        return s.restarts >= 3;
      },
      15s));
  // Without the reset: 100, 200, 400 ms.
  CHECK(delays == std::set<int64_t>{0, 100});
}

TEST_CASE("proxy supervisor: a missing or non-executable binary is an error, retried",
          "[proxy_supervisor]") {
  Fixture f;
  SetupLogging(LogFormat::kText, LogLevel::kInfo);
  StderrCapture log(f.tmp / "kilnd.log");
  const fs::path binary = f.tmp / "bin" / "proxy";
  ProxySupervisor sup(f.io, f.Opts(binary.string(), {"1000"}));
  sup.SetWanted(true);
  SupervisorStatus s = sup.Status();
  CHECK_FALSE(s.running);
  CHECK(s.error == "cannot execute " + binary.string() + ": No such file or directory");
  CHECK(s.restart_delay_ms == 100);
  f.RunFor(1000ms);
  s = sup.Status();
  CHECK_FALSE(s.running);
  // 100 + 200 + 400 + 400 ms at most: a few attempts, not thousands.
  CHECK(s.restarts >= 2);
  CHECK(s.restarts <= 5);
  CHECK_FALSE(fs::exists(f.Pidfile()));

  WriteFile(binary, "#!/bin/sh\nexec /bin/sleep \"$@\"\n");
  REQUIRE(f.Until(sup, [](const SupervisorStatus& st) {
    return st.error.find("Permission") != std::string::npos;
  }));
  CHECK(sup.Status().error == "cannot execute " + binary.string() + ": Permission denied");
  CHECK_FALSE(sup.Status().running);

  fs::permissions(binary, fs::perms::owner_exec, fs::perm_options::add);
  REQUIRE(f.Until(sup, Running));
  CHECK(sup.Status().error.empty());
  CHECK(ReadFile(f.Pidfile()) == PidfileFor(sup.Status().pid));
  // Logged once per distinct error, not once per attempt.
  const std::string logged = log.Text();
  CHECK(Count(logged, "cannot start a supervised process") == 2);
  CHECK(Count(logged, "No such file or directory") == 1);
  CHECK(Count(logged, "Permission denied") == 1);
}

}  // namespace
}  // namespace kiln::testing
