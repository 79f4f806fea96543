#include "daemon/proxy_supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <map>
#include <string_view>

#include "common/atomic_file.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/time_source.h"
#include "common/unique_fd.h"
#include "deploy/proc.h"
#include "deploy/spawn.h"

extern char** environ;

namespace kiln {
namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace {

// waitid's idtype for a pidfd (Linux 5.4); glibc 2.36 does not name it.
constexpr idtype_t kIdTypePidfd = static_cast<idtype_t>(3);
// The end of a process that is not our child (started by an earlier kilnd): only /proc saw it.
constexpr const char* kGone = "gone (status unknown: not started by this kilnd)";
// In the environment of every process a supervisor starts: the state dir it belongs to, so that
// one the pidfile does not name can still be recognised (see AdoptUnrecorded).
// How /proc/PID/exe shows a binary that was removed or replaced since the process started.
constexpr std::string_view kDeleted = " (deleted)";
constexpr const char* kMarkKey = "KILN_SUPERVISOR_STATE";

// Signals the very process the pidfd refers to, never one that reused its pid.
int PidfdSendSignal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

std::string DescribeExit(const siginfo_t& si) {
  if (si.si_code == CLD_EXITED) return "exited with code " + std::to_string(si.si_status);
  const char* abbrev = sigabbrev_np(si.si_status);
  return "killed by " +
         (abbrev ? "SIG" + std::string(abbrev) : "signal " + std::to_string(si.si_status));
}

int64_t Millis(Duration d) { return d.count(); }

// When a process started, in Unix milliseconds, from its start time in clock ticks after boot.
// 0 when /proc/stat cannot say when the machine booted.
int64_t StartTimeUnixMs(uint64_t start_ticks) {
  std::optional<std::string> stat = proc::ReadSmallFile("/proc/stat");
  if (!stat) return 0;
  const size_t at = stat->find("\nbtime ");
  if (at == std::string::npos) return 0;
  int64_t boot_s = 0;
  const char* begin = stat->data() + at + 7;
  if (std::from_chars(begin, stat->data() + stat->size(), boot_s).ec != std::errc()) return 0;
  const long ticks_per_s = ::sysconf(_SC_CLK_TCK);
  if (ticks_per_s <= 0) return 0;
  return boot_s * 1000 + static_cast<int64_t>(start_ticks * 1000 / ticks_per_s);
}

// "PID STARTTIME\n".
struct PidfileEntry {
  pid_t pid = 0;
  uint64_t start_ticks = 0;
};

bool ParsePidfile(const std::string& text, PidfileEntry* out) {
  PidfileEntry e;
  const char* p = text.data();
  const char* end = text.data() + text.size();
  auto r = std::from_chars(p, end, e.pid);
  if (r.ec != std::errc() || e.pid <= 0 || r.ptr == end || *r.ptr != ' ') return false;
  r = std::from_chars(r.ptr + 1, end, e.start_ticks);
  if (r.ec != std::errc() || (r.ptr != end && *r.ptr != '\n')) return false;
  *out = e;
  return true;
}

std::string PidfileText(pid_t pid, uint64_t start_ticks) {
  return std::to_string(pid) + " " + std::to_string(start_ticks) + "\n";
}

}  // namespace

struct ProxySupervisor::Impl : std::enable_shared_from_this<Impl> {
  enum class Phase {
    kIdle,      // no process
    kRunning,   // a process runs and is watched
    kStopping,  // SIGTERM sent (SIGKILL after the grace period); waiting for its end
    kWaiting,   // no process; the restart timer runs
  };

  Impl(asio::io_context& io_in, Options o)
      : io(io_in),
        options(std::move(o)),
        owned_time(options.time ? nullptr : std::make_unique<RealTimeSource>()),
        time(options.time ? options.time : owned_time.get()),
        pidfd(io),
        restart_timer(time->MakeTimer(io)),
        kill_timer(time->MakeTimer(io)),
        backoff(options.backoff_initial) {
    if (options.log_path.empty()) options.log_path = options.state_dir / "output.log";
    std::error_code ec;
    mark_value = fs::weakly_canonical(fs::absolute(options.state_dir, ec), ec).string();
  }

  asio::io_context& io;
  Options options;
  std::unique_ptr<RealTimeSource> owned_time;
  TimeSource* time;
  std::string mark_value;  // the state dir, absolute: kMarkKey's value

  bool wanted = false;
  bool leftover_checked = false;  // whether a not-wanted call has looked for an earlier process
  Phase phase = Phase::kIdle;
  // The process, while kRunning or kStopping.
  asio::posix::stream_descriptor pidfd;
  pid_t pid = 0;
  uint64_t start_ticks = 0;
  bool adopted = false;
  bool binary_replaced = false;
  SteadyTime started_steady{};
  int64_t started_unix_ms = 0;

  std::unique_ptr<Timer> restart_timer;
  std::unique_ptr<Timer> kill_timer;
  Duration backoff;  // the delay before the next restart
  Duration restart_delay{0};
  int64_t restarts = 0;
  std::string last_exit;
  std::string error;
  std::string logged_error;  // the last error logged, so that each distinct one is logged once

  fs::path Pidfile() const { return options.state_dir / "pid"; }

  void RemovePidfile() {
    std::error_code ec;
    fs::remove(Pidfile(), ec);
    if (ec) {
      LogWarn("cannot remove a pidfile",
              {{"program", options.name}, {"path", Pidfile().string()}, {"error", ec.message()}});
    }
  }

  void SetWanted(bool w) {
    wanted = w;
    switch (phase) {
      case Phase::kIdle:
        if (wanted) {
          Start();
        } else if (!leftover_checked) {
          // One left running by an earlier kilnd while the manifests wanted it; they no longer
          // do. Looked for once: after that, whatever runs was started by this supervisor.
          leftover_checked = true;
          if (Adopt()) Stop();
        }
        return;
      case Phase::kRunning:
        if (!wanted) Stop();
        return;
      case Phase::kStopping:
        return;  // its end starts a new one if it is wanted again by then
      case Phase::kWaiting:
        if (!wanted) {
          restart_timer->Cancel();
          restart_delay = Duration(0);
          phase = Phase::kIdle;
          backoff = options.backoff_initial;
          error.clear();
          logged_error.clear();
          RemovePidfile();
        }
        return;
    }
  }

  // REQUIRES: phase is kIdle. Adopts what the pidfile names or starts a new process; on failure
  // waits the back-off and tries again.
  void Start() {
    leftover_checked = true;
    if (Adopt()) return;
    kiln::Status started = Spawn();
    if (started.ok()) {
      error.clear();
      logged_error.clear();
      return;
    }
    error = started.message();
    if (error != logged_error) {
      logged_error = error;
      LogError("cannot start a supervised process; retrying with back-off",
               {{"program", options.name},
                {"binary", options.binary.string()},
                {"error", error},
                {"retry_in_ms", Millis(backoff)}});
    }
    ScheduleRestart(Duration(0));
  }

  // Whether a process of this program that a supervisor of this state dir started runs; when
  // one does, watches it.
  bool Adopt() { return AdoptRecorded() || AdoptUnrecorded(); }

  // The process the pidfile names, when it runs and is this program. Removes a pidfile that
  // names anything else.
  bool AdoptRecorded() {
    std::error_code ec;
    if (!fs::exists(Pidfile(), ec)) return false;
    std::optional<std::string> text = proc::ReadSmallFile(Pidfile());
    PidfileEntry entry;
    const bool parsed = text && ParsePidfile(*text, &entry);
    std::string why;
    UniqueFd fd;
    if (!parsed) {
      why = "it cannot be parsed";
    } else {
      // The pidfd first, then the checks: what they find is what the pidfd refers to, even if
      // the process ends and its pid is reused in between.
      fd = UniqueFd(proc::PidfdOpen(entry.pid));
      StatusOr<proc::Stat> st =
          fd ? proc::ReadStat(entry.pid) : StatusOr<proc::Stat>(NotFoundError(""));
      if (!st.ok() || st->state == 'Z' || st->state == 'X') {
        why = "its process is gone";
      } else if (st->start_time != entry.start_ticks) {
        why = "its pid now belongs to another process";
      } else if (!RunsBinary(entry.pid)) {
        why = "its process runs another program";
      }
    }
    if (!why.empty()) {
      LogInfo("pidfile names no supervised process; not adopting it",
              {{"program", options.name},
               {"pidfile", Pidfile().string()},
               {"content", text ? *text : std::string()},
               {"why", why}});
      RemovePidfile();
      return false;
    }
    Take(std::move(fd), entry.pid, entry.start_ticks, "pidfile");
    return true;
  }

  // A process of this program that carries this state dir's mark but that the pidfile does not
  // name: started by a kilnd that crashed before it wrote the pidfile, or the pidfile was
  // removed by hand. Adopting it keeps a second one from starting beside it (and failing to bind
  // its ports); any others found are stopped, so that one runs.
  bool AdoptUnrecorded() {
    struct Found {
      pid_t pid;
      uint64_t start_ticks;
      UniqueFd fd;
    };
    std::vector<Found> found;
    for (pid_t p : proc::ListPids()) {
      if (p == ::getpid()) continue;
      std::map<std::string, std::string> env = proc::ReadEnviron(p);
      auto mark = env.find(kMarkKey);
      if (mark == env.end() || mark->second != mark_value) continue;
      UniqueFd fd(proc::PidfdOpen(p));
      StatusOr<proc::Stat> st = fd ? proc::ReadStat(p) : StatusOr<proc::Stat>(NotFoundError(""));
      if (!st.ok() || st->state == 'Z' || st->state == 'X' || !RunsBinary(p)) continue;
      found.push_back({p, st->start_time, std::move(fd)});
    }
    if (found.empty()) return false;
    std::sort(found.begin(), found.end(),
              [](const Found& a, const Found& b) { return a.start_ticks < b.start_ticks; });
    for (size_t i = 1; i < found.size(); ++i) {
      LogWarn("stopping an unrecorded duplicate of a supervised process",
              {{"program", options.name}, {"pid", static_cast<int64_t>(found[i].pid)}});
      (void)PidfdSendSignal(found[i].fd.get(), SIGTERM);
    }
    kiln::Status recorded = WriteFileAtomically(
        Pidfile(), PidfileText(found[0].pid, found[0].start_ticks), Durability::kSynced);
    if (!recorded.ok()) {
      // It serves; stopping it for want of a pidfile would take the data plane down.
      LogError("cannot record an adopted supervised process",
               {{"program", options.name}, {"error", recorded.message()}});
    }
    Take(std::move(found[0].fd), found[0].pid, found[0].start_ticks, "its environment");
    return true;
  }

  void Take(UniqueFd fd, pid_t p, uint64_t ticks, const char* found_by) {
    Watch(std::move(fd), p, ticks, /*was_adopted=*/true);
    std::error_code ec;
    binary_replaced =
        fs::read_symlink("/proc/" + std::to_string(p) + "/exe", ec).string().ends_with(kDeleted);
    started_unix_ms = StartTimeUnixMs(ticks);
    // How long it has run counts from its start, not from its adoption (for the back-off reset).
    const int64_t age_ms = ToUnixMillis(time->SystemNow()) - started_unix_ms;
    if (started_unix_ms > 0 && age_ms > 0) started_steady -= Duration(age_ms);
    error.clear();
    logged_error.clear();
    LogInfo("adopted a supervised process that outlived the previous kilnd",
            {{"program", options.name},
             {"pid", static_cast<int64_t>(pid)},
             {"found_by", found_by},
             {"started_unix_ms", started_unix_ms}});
  }

  // Whether /proc/PID/exe is the binary, or the binary as it was before an upgrade replaced it.
  bool RunsBinary(pid_t p) const {
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/" + std::to_string(p) + "/exe", ec);
    if (ec) return false;
    const std::string want = fs::weakly_canonical(options.binary, ec).string();
    if (ec) return false;
    return exe.string() == want || exe.string() == want + std::string(kDeleted);
  }

  kiln::Status Spawn() {
    std::error_code ec;
    fs::create_directories(options.state_dir, ec);
    if (ec) return ErrnoError(ec.value(), "cannot make " + options.state_dir.string());
    fs::create_directories(options.log_path.parent_path(), ec);
    if (ec) return ErrnoError(ec.value(), "cannot make " + options.log_path.parent_path().string());
    SpawnRequest req;
    req.path = options.binary.string();
    req.argv.push_back(options.binary.string());
    req.argv.insert(req.argv.end(), options.args.begin(), options.args.end());
    if (options.env) {
      req.env = *options.env;
    } else {
      for (char** e = environ; *e != nullptr; ++e) req.env.emplace_back(*e);
    }
    const std::string mark_prefix = std::string(kMarkKey) + "=";
    std::erase_if(req.env, [&](const std::string& kv) { return kv.starts_with(mark_prefix); });
    req.env.push_back(mark_prefix + mark_value);
    req.log = options.log_path;
    ASSIGN_OR_RETURN(Spawned spawned, SpawnProcess(req));
    // Its run counts from here, not from after the synced pidfile write below, which can take
    // long on a busy disk (the back-off starts over by how long it ran).
    const SteadyTime spawned_at = time->SteadyNow();
    // Our unreaped child: its /proc entry stays, as a zombie at worst, until we wait for it.
    StatusOr<proc::Stat> st = proc::ReadStat(spawned.pid);
    kiln::Status recorded =
        st.ok() ? WriteFileAtomically(Pidfile(), PidfileText(spawned.pid, st->start_time),
                                      Durability::kSynced)
                : st.status();
    if (!recorded.ok()) {
      // Unrecorded, a later kilnd could not find it and would start a second one.
      (void)PidfdSendSignal(spawned.pidfd.get(), SIGKILL);
      siginfo_t si{};
      while (::waitid(kIdTypePidfd, static_cast<id_t>(spawned.pidfd.get()), &si, WEXITED) != 0 &&
             errno == EINTR) {
      }
      return recorded;
    }
    Watch(std::move(spawned.pidfd), spawned.pid, st->start_time, /*was_adopted=*/false);
    started_steady = spawned_at;
    started_unix_ms = ToUnixMillis(time->SystemNow());
    LogInfo("started a supervised process", {{"program", options.name},
                                             {"pid", static_cast<int64_t>(pid)},
                                             {"binary", options.binary.string()},
                                             {"log", options.log_path.string()}});
    return kiln::Status::Ok();
  }

  void Watch(UniqueFd fd, pid_t p, uint64_t ticks, bool was_adopted) {
    pidfd.assign(fd.release());
    pid = p;
    start_ticks = ticks;
    adopted = was_adopted;
    binary_replaced = false;
    started_steady = time->SteadyNow();
    phase = Phase::kRunning;
    restart_delay = Duration(0);
    Arm();
  }

  void Arm() {
    std::weak_ptr<Impl> weak = weak_from_this();
    pidfd.async_wait(asio::posix::stream_descriptor::wait_read,
                     [weak](const boost::system::error_code& ec) {
                       auto self = weak.lock();
                       if (!self || ec) return;  // supervisor gone or the watch closed
                       self->OnPidfdReady();
                     });
  }

  // How the process ended, or nullopt while it still runs: readiness of the pidfd is only a
  // hint, an end is what the kernel reports as one.
  std::optional<std::string> Ended() {
    siginfo_t si{};
    int rc;
    do {
      // Reaps it when it is our child.
      rc = ::waitid(kIdTypePidfd, static_cast<id_t>(pidfd.native_handle()), &si, WEXITED | WNOHANG);
    } while (rc != 0 && errno == EINTR);
    if (rc == 0) {
      if (si.si_pid == 0) return std::nullopt;  // our child, still running
      return DescribeExit(si);
    }
    // Not our child (ECHILD): only /proc can say it has ended (a zombie or a dead task has).
    StatusOr<proc::Stat> st = proc::ReadStat(pid);
    if (st.ok() && st->start_time == start_ticks && st->state != 'Z' && st->state != 'X') {
      return std::nullopt;
    }
    return std::string(kGone);
  }

  void OnPidfdReady() {
    if (phase != Phase::kRunning && phase != Phase::kStopping) return;
    std::optional<std::string> how = Ended();
    if (!how) {
      Arm();
      return;
    }
    boost::system::error_code ignored;
    pidfd.close(ignored);
    kill_timer->Cancel();
    last_exit = *how;
    const Duration ran = std::chrono::duration_cast<Duration>(time->SteadyNow() - started_steady);
    const pid_t ended_pid = pid;
    pid = 0;
    adopted = false;
    binary_replaced = false;
    RemovePidfile();
    if (phase == Phase::kStopping) {
      LogInfo("stopped a supervised process", {{"program", options.name},
                                               {"pid", static_cast<int64_t>(ended_pid)},
                                               {"how", last_exit},
                                               {"ran_ms", Millis(ran)}});
      phase = Phase::kIdle;
      backoff = options.backoff_initial;
      if (wanted) Start();  // wanted again while it was stopping
      return;
    }
    phase = Phase::kIdle;
    if (!wanted) return;  // not reached: not wanted means stopping or idle
    const Duration delay = ran >= options.backoff_reset_after ? options.backoff_initial : backoff;
    LogWarn("supervised process ended; restarting it after the back-off",
            {{"program", options.name},
             {"pid", static_cast<int64_t>(ended_pid)},
             {"how", last_exit},
             {"ran_ms", Millis(ran)},
             {"restart_in_ms", Millis(delay)}});
    ScheduleRestart(ran);
  }

  // Waits the back-off (started over when the last process ran long enough), then starts again.
  void ScheduleRestart(Duration ran) {
    if (ran >= options.backoff_reset_after) backoff = options.backoff_initial;
    restart_delay = backoff;
    backoff = std::min(backoff * 2, options.backoff_max);
    phase = Phase::kWaiting;
    std::weak_ptr<Impl> weak = weak_from_this();
    restart_timer->ExpireAfter(restart_delay, [weak] {
      auto self = weak.lock();
      if (!self || self->phase != Phase::kWaiting || !self->wanted) return;
      self->phase = Phase::kIdle;
      self->restart_delay = Duration(0);
      ++self->restarts;
      self->Start();
    });
  }

  // REQUIRES: phase is kRunning.
  void Stop() {
    phase = Phase::kStopping;
    LogInfo("stopping a supervised process: it is no longer wanted",
            {{"program", options.name},
             {"pid", static_cast<int64_t>(pid)},
             {"grace_ms", Millis(options.stop_grace)}});
    Signal(SIGTERM);
    std::weak_ptr<Impl> weak = weak_from_this();
    kill_timer->ExpireAfter(options.stop_grace, [weak] {
      auto self = weak.lock();
      if (!self || self->phase != Phase::kStopping) return;
      LogWarn("supervised process still runs after SIGTERM and the grace period; killing it",
              {{"program", self->options.name}, {"pid", static_cast<int64_t>(self->pid)}});
      self->Signal(SIGKILL);
    });
  }

  void Signal(int sig) {
    if (PidfdSendSignal(pidfd.native_handle(), sig) != 0 && errno != ESRCH) {
      LogError("cannot signal a supervised process", {{"program", options.name},
                                                      {"pid", static_cast<int64_t>(pid)},
                                                      {"signal", sig},
                                                      {"error", std::strerror(errno)}});
    }
  }

  // The process keeps running and the pidfile stays; only the watch ends.
  void Detach() {
    restart_timer->Cancel();
    kill_timer->Cancel();
    boost::system::error_code ignored;
    pidfd.close(ignored);
  }

  SupervisorStatus Report() const {
    SupervisorStatus s;
    s.wanted = wanted;
    s.running = phase == Phase::kRunning || phase == Phase::kStopping;
    if (s.running) {
      s.pid = pid;
      s.started_unix_ms = started_unix_ms;
      s.adopted = adopted;
      s.binary_replaced = binary_replaced;
    }
    s.restarts = restarts;
    s.last_exit = last_exit;
    s.error = error;
    s.restart_delay_ms = phase == Phase::kWaiting ? Millis(restart_delay) : 0;
    return s;
  }
};

ProxySupervisor::ProxySupervisor(asio::io_context& io, Options options)
    : impl_(std::make_shared<Impl>(io, std::move(options))) {}

ProxySupervisor::~ProxySupervisor() { impl_->Detach(); }

void ProxySupervisor::SetWanted(bool wanted) { impl_->SetWanted(wanted); }

SupervisorStatus ProxySupervisor::Status() const { return impl_->Report(); }

fs::path ProxySupervisor::PidfilePath() const { return impl_->Pidfile(); }

}  // namespace kiln
