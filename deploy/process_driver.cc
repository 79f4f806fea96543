#include "deploy/process_driver.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "common/cancel_quietly.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "common/unique_fd.h"
#include "deploy/artifact_store.h"
#include "deploy/cgroup.h"
#include "deploy/instance_logs.h"
#include "deploy/port_allocator.h"
#include "deploy/proc.h"
#include "deploy/spawn.h"

namespace kiln {
namespace asio = boost::asio;
namespace fs = std::filesystem;

namespace {

// waitid's idtype for a pidfd (Linux 5.4); glibc 2.36 does not name it.
constexpr idtype_t kIdTypePidfd = static_cast<idtype_t>(3);
constexpr const char* kDefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct ProcessId {
  pid_t pid = 0;
  uint64_t start_time = 0;
};

std::string EncodeId(ProcessId p) {
  return "pid:" + std::to_string(p.pid) + ":" + std::to_string(p.start_time);
}

StatusOr<ProcessId> DecodeId(const InstanceHandle& h) {
  std::string_view s = h.id;
  auto bad = [&] {
    return InvalidArgumentError("instance " + h.instance + ": not a process handle: \"" + h.id +
                                "\"");
  };
  if (s.substr(0, 4) != "pid:") return bad();
  s.remove_prefix(4);
  size_t colon = s.find(':');
  if (colon == std::string_view::npos) return bad();
  ProcessId p;
  auto r1 = std::from_chars(s.data(), s.data() + colon, p.pid);
  auto r2 = std::from_chars(s.data() + colon + 1, s.data() + s.size(), p.start_time);
  // pid 0 (with start time 0): an instance whose leader is gone, as List() reports it.
  if (r1.ec != std::errc() || r2.ec != std::errc() || p.pid < 0 ||
      (p.pid == 0 && p.start_time != 0)) {
    return bad();
  }
  return p;
}

void ReplaceAll(std::string& s, std::string_view from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
}

// An instance name is also the name of its cgroup and log file.
bool ValidCgroupName(const std::string& name) {
  return !name.empty() && name.size() < 200 && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

// Which of an instance's processes is its leader (the one the driver started). It started a
// session when it was spawned, so it leads one; it is the root of the instance's process tree
// while it runs (its parent is not of the instance); and it is the oldest such root (processes it
// left behind and that were reparented started after it). nullopt when no process qualifies:
// the leader is gone.
std::optional<pid_t> PickLeader(const std::map<pid_t, proc::Stat>& members) {
  std::optional<pid_t> best;
  auto followers = [&](pid_t leader) {
    return std::count_if(members.begin(), members.end(),
                         [&](const auto& m) { return m.second.session == leader; });
  };
  for (const auto& [pid, st] : members) {
    if (st.session != pid || members.count(st.ppid)) continue;
    if (!best) {
      best = pid;
      continue;
    }
    const proc::Stat& b = members.at(*best);
    if (st.start_time < b.start_time ||
        (st.start_time == b.start_time && followers(pid) > followers(*best))) {
      best = pid;
    }
  }
  return best;
}

}  // namespace

std::string ExitInfo::Describe() const {
  if (lost) return "lost: " + detail;
  std::string how;
  if (exit_code) {
    how = "exited with code " + std::to_string(*exit_code);
  } else if (signal) {
    const char* abbrev = sigabbrev_np(*signal);
    how =
        "killed by " + (abbrev ? "SIG" + std::string(abbrev) : "signal " + std::to_string(*signal));
  } else {
    how = status_known ? "exited" : "exited (status unknown: not started by this kilnd)";
  }
  if (!detail.empty()) how += " (" + detail + ")";
  return how;
}

std::string ControllerIdForStateDir(const fs::path& state_dir) {
  std::error_code ec;
  fs::path abs = fs::weakly_canonical(fs::absolute(state_dir, ec), ec);
  return Sha256Hex(abs.string()).substr(0, 16);
}

struct ProcessDriver::Impl : std::enable_shared_from_this<Impl> {
  // One instance: its leader while it runs, then whatever it left behind until that is gone too.
  struct Watch {
    InstanceHandle handle;
    std::string service;  // for log lines; empty when unknown
    int64_t revision = 0;
    ProcessId leader;                      // pid 0: unknown (gone before this driver saw it)
    std::optional<fs::path> cgroup;        // the instance's own cgroup, when it has one
    asio::posix::stream_descriptor pidfd;  // the leader's, open until its exit is recorded
    asio::steady_timer kill_timer;         // a stop's grace period
    asio::steady_timer retry_timer;        // another look at a group that could not be watched
    std::vector<std::shared_ptr<asio::posix::stream_descriptor>> member_fds;
    uint64_t drain_pass = 0;
    bool leader_done = false;  // the leader's exit is recorded in `exit`
    ExitInfo exit;
    bool stopping = false;
    bool killing = false;  // SIGKILL sent; whatever is found later gets it too
    bool silent = false;   // removing the leftovers of an instance that ended earlier: no report
    bool owns_port = false;
    StopFn stop_done;  // set while a Stop is in progress

    Watch(asio::io_context& io, int fd) : pidfd(io), kill_timer(io), retry_timer(io) {
      if (fd >= 0) pidfd.assign(fd);
    }
  };

  Impl(asio::io_context& io_in, Options o)
      : io(io_in), options(std::move(o)), ports(options.port_first, options.port_last) {
    if (options.isolation == Isolation::kSession) {
      LogInfo("process driver: instances are kept together by session and environment",
              {{"mode", "session"}, {"why", "cgroups turned off"}});
      return;
    }
    StatusOr<fs::path> base = PrepareCgroupBase();
    if (base.ok()) {
      cgroup_base = *base;
      LogInfo("process driver: each instance runs in a cgroup of its own",
              {{"mode", "cgroup"}, {"cgroup", base->string()}});
    } else {
      Log(options.isolation == Isolation::kCgroup ? LogLevel::kError : LogLevel::kInfo,
          "process driver: instances are kept together by session and environment",
          {{"mode", "session"}, {"why", base.status().message()}});
    }
  }

  ~Impl() {
    // Instances keep running; only our watching ends.
    for (auto& [name, w] : watches) {
      boost::system::error_code ignored;
      w->pidfd.close(ignored);
      for (auto& m : w->member_fds) m->close(ignored);
      CancelQuietly(w->kill_timer, "kill timer");
      CancelQuietly(w->retry_timer, "retry timer");
    }
    if (cgroup_base) (void)cgroup::Remove(*cgroup_base);  // only succeeds when it is empty
  }

  StatusOr<fs::path> PrepareCgroupBase() {
    fs::path parent = options.cgroup_parent;
    if (parent.empty()) {
      ASSIGN_OR_RETURN(parent, cgroup::OwnCgroupDir());
    }
    // Moving a process between cgroups (CLONE_INTO_CGROUP included) needs write access to the
    // common ancestor's cgroup.procs: here, kilnd's own cgroup.
    if (::access((parent / "cgroup.procs").c_str(), W_OK) != 0) {
      return ErrnoError(errno, "cannot move processes out of " + parent.string());
    }
    fs::path base = parent / ("kiln-" + options.controller_id);
    if (::mkdir(base.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoError(errno, "cannot make cgroup " + base.string());
    }
    if (::access((base / "cgroup.procs").c_str(), W_OK) != 0) {
      return ErrnoError(errno, "cannot use cgroup " + base.string());
    }
    return base;
  }

  std::optional<fs::path> CgroupDirOf(const std::string& instance) const {
    if (!cgroup_base || !ValidCgroupName(instance)) return std::nullopt;
    fs::path dir = *cgroup_base / instance;
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return std::nullopt;
    return dir;
  }

  // The processes of an instance, its leader included while it runs: its cgroup's, or else every
  // process with this controller's KILN_CONTROLLER and the instance's KILN_INSTANCE (exited ones
  // excluded).
  std::vector<pid_t> Members(const std::string& instance,
                             const std::optional<fs::path>& cgroup_dir) const {
    if (cgroup_dir) return cgroup::Procs(*cgroup_dir);
    std::vector<pid_t> out;
    for (pid_t pid : proc::ListPids()) {
      std::map<std::string, std::string> env = proc::ReadEnviron(pid);
      auto ctl = env.find("KILN_CONTROLLER");
      auto inst = env.find("KILN_INSTANCE");
      if (ctl == env.end() || ctl->second != options.controller_id || inst == env.end() ||
          inst->second != instance) {
        continue;
      }
      StatusOr<proc::Stat> st = proc::ReadStat(pid);
      if (st.ok() && st->state != 'Z') out.push_back(pid);
    }
    return out;
  }

  // Sends `sig` to every process of the instance.
  void Signal(const std::shared_ptr<Watch>& w, int sig) {
    if (w->cgroup) {
      if (sig == SIGKILL) {
        Status s = cgroup::KillAll(*w->cgroup);
        if (s.ok()) return;
        LogWarn("cannot kill an instance's cgroup at once; killing its processes one by one",
                {{"instance", w->handle.instance}, {"error", s.message()}});
      }
      for (pid_t pid : cgroup::Procs(*w->cgroup)) ::kill(pid, sig);
      return;
    }
    // The leader's process group first (safe: the leader has not been waited for, so its pid
    // and group id are not reused; a session leader never leaves its group), then whatever
    // carries the instance's identity elsewhere (setsid, setpgid), each process once.
    const bool group_signalled = !w->leader_done && w->pidfd.is_open();
    if (group_signalled) ::kill(-w->leader.pid, sig);
    for (pid_t pid : Members(w->handle.instance, std::nullopt)) {
      StatusOr<proc::Stat> st = proc::ReadStat(pid);
      if (group_signalled && st.ok() && st->pgrp == w->leader.pid) continue;
      ::kill(pid, sig);
    }
  }

  std::shared_ptr<Watch> NewWatch(const InstanceHandle& handle, ProcessId leader, UniqueFd pidfd,
                                  std::optional<fs::path> cgroup_dir) {
    auto w = std::make_shared<Watch>(io, pidfd.release());
    w->handle = handle;
    w->leader = leader;
    w->cgroup = std::move(cgroup_dir);
    w->exit.instance = handle.instance;
    watches[handle.instance] = w;
    return w;
  }

  void Track(const InstanceHandle& handle, ProcessId id, UniqueFd pidfd,
             std::optional<fs::path> cgroup_dir, std::string service, int64_t revision) {
    auto w = NewWatch(handle, id, std::move(pidfd), std::move(cgroup_dir));
    w->service = std::move(service);
    w->revision = revision;
    if (handle.port > 0) {
      ports.Reserve(handle.port);
      w->owns_port = true;
    }
    ArmLeader(w);
  }

  bool Current(const std::shared_ptr<Watch>& w) const {
    auto it = watches.find(w->handle.instance);
    return it != watches.end() && it->second == w;
  }

  void ArmLeader(const std::shared_ptr<Watch>& w) {
    std::weak_ptr<Impl> weak = weak_from_this();
    w->pidfd.async_wait(asio::posix::stream_descriptor::wait_read,
                        [weak, w](const boost::system::error_code& ec) {
                          auto self = weak.lock();
                          if (!self || ec) return;  // driver gone or watch cancelled
                          self->OnLeaderReady(w);
                        });
  }

  // How the leader ended, or nullopt while it still runs. Readiness of the pidfd is only a hint:
  // an exit is what the kernel reports as one.
  std::optional<ExitInfo> LeaderExit(const std::shared_ptr<Watch>& w) {
    ExitInfo info;
    info.instance = w->handle.instance;
    siginfo_t si{};
    int rc;
    do {
      // Reaps it when it is our child.
      rc = ::waitid(kIdTypePidfd, static_cast<id_t>(w->pidfd.native_handle()), &si,
                    WEXITED | WNOHANG);
    } while (rc != 0 && errno == EINTR);
    if (rc == 0) {
      if (si.si_pid == 0) return std::nullopt;  // our child, still running
      if (si.si_code == CLD_EXITED) {
        info.exit_code = si.si_status;
      } else {
        info.signal = si.si_status;
      }
      return info;
    }
    // Not our child (started by an earlier kilnd; ECHILD): only /proc can say it has exited.
    if (proc::IsAlive(w->leader.pid, w->leader.start_time)) return std::nullopt;
    info.status_known = false;
    return info;
  }

  void OnLeaderReady(const std::shared_ptr<Watch>& w) {
    if (!Current(w) || w->leader_done) return;
    std::optional<ExitInfo> exit = LeaderExit(w);
    if (!exit) {
      LogDebug("instance pidfd ready but its process runs; still watching",
               {{"instance", w->handle.instance}, {"pid", static_cast<int64_t>(w->leader.pid)}});
      ArmLeader(w);
      return;
    }
    w->leader_done = true;
    w->exit = *exit;
    boost::system::error_code ignored;
    w->pidfd.close(ignored);
    LogInfo("instance leader ended", {{"service", w->service},
                                      {"revision", w->revision},
                                      {"instance", w->handle.instance},
                                      {"pid", static_cast<int64_t>(w->leader.pid)},
                                      {"how", exit->Describe()}});
    // Whatever the instance left behind goes with it; a stop gives it its grace period first.
    if (!w->stopping) w->killing = true;
    Drain(w);
  }

  // REQUIRES: the leader's end is recorded (or it is unknown). Finishes once no process of the
  // instance remains, looking again each time all the ones it knew have exited.
  void Drain(const std::shared_ptr<Watch>& w) {
    if (!Current(w)) return;
    if (w->killing) Signal(w, SIGKILL);
    std::vector<pid_t> members = Members(w->handle.instance, w->cgroup);
    boost::system::error_code ignored;
    for (auto& m : w->member_fds) m->close(ignored);
    w->member_fds.clear();
    if (members.empty()) return Finish(w);
    const uint64_t pass = ++w->drain_pass;
    auto pending = std::make_shared<size_t>(0);
    std::weak_ptr<Impl> weak = weak_from_this();
    for (pid_t pid : members) {
      int fd = proc::PidfdOpen(pid);
      if (fd < 0) continue;  // gone already
      auto sd = std::make_shared<asio::posix::stream_descriptor>(io, fd);
      w->member_fds.push_back(sd);
      ++*pending;
      sd->async_wait(asio::posix::stream_descriptor::wait_read,
                     [weak, w, pass, pending](const boost::system::error_code& ec) {
                       auto self = weak.lock();
                       if (!self || ec) return;
                       if (--*pending == 0 && w->drain_pass == pass) self->Drain(w);
                     });
    }
    if (*pending == 0) {
      // Every one of them exited between the listing and the pidfd_open: look again soon.
      w->retry_timer.expires_after(std::chrono::milliseconds(5));
      w->retry_timer.async_wait([weak, w](const boost::system::error_code& ec) {
        auto self = weak.lock();
        if (self && !ec) self->Drain(w);
      });
    }
  }

  void Finish(const std::shared_ptr<Watch>& w) {
    w->kill_timer.cancel();
    w->retry_timer.cancel();
    boost::system::error_code ignored;
    w->pidfd.close(ignored);
    if (w->cgroup) {
      Status removed = cgroup::Remove(*w->cgroup);
      if (!removed.ok()) {
        LogWarn("cannot remove an instance's cgroup",
                {{"instance", w->handle.instance}, {"error", removed.message()}});
      }
    }
    if (w->owns_port) ports.Release(w->handle.port);
    watches.erase(w->handle.instance);
    LogInfo("instance process ended", {{"service", w->service},
                                       {"revision", w->revision},
                                       {"instance", w->handle.instance},
                                       {"pid", static_cast<int64_t>(w->leader.pid)},
                                       {"how", w->exit.Describe()}});
    if (w->stop_done) {
      auto done = std::move(w->stop_done);
      done(w->exit);
    } else if (!w->silent && exit_fn) {
      exit_fn(w->exit);
    }
  }

  StatusOr<InstanceHandle> DoStart(const InstanceSpec& spec) {
    auto fail = [&](const Status& s) { return s.WithContext("start " + spec.instance); };
    if (watches.count(spec.instance)) {
      return fail(AlreadyExistsError("instance is already running"));
    }
    if (!ValidCgroupName(spec.instance)) {
      return fail(InvalidArgumentError("not a usable instance name"));
    }
    if (options.artifacts == nullptr || spec.artifact_sha256.empty()) {
      return fail(InvalidArgumentError("the process driver needs an artifact"));
    }
    const fs::path artifact = options.artifacts->PathFor(spec.artifact_sha256);
    if (::access(artifact.c_str(), X_OK) != 0) {
      return fail(ErrnoError(errno, "artifact sha256:" + spec.artifact_sha256.substr(0, 12) +
                                        " at " + artifact.string()));
    }
    ASSIGN_OR_RETURN(int port, ports.Allocate());
    auto release_port = [&](const Status& s) {
      ports.Release(port);
      return fail(s);
    };

    std::vector<std::string> argv =
        spec.command.empty() ? std::vector<std::string>{"{artifact}"} : spec.command;
    for (std::string& a : argv) {
      ReplaceAll(a, "{artifact}", artifact.string());
      ReplaceAll(a, "{port}", std::to_string(port));
      ReplaceAll(a, "{instance}", spec.instance);
      ReplaceAll(a, "{service}", spec.service);
      ReplaceAll(a, "{revision}", std::to_string(spec.revision));
    }
    std::map<std::string, std::string> env = spec.env;
    env.emplace("PATH", kDefaultPath);  // the manifest may set its own
    env["KILN_CONTROLLER"] = options.controller_id;
    env["KILN_SERVICE"] = spec.service;
    env["KILN_REVISION"] = std::to_string(spec.revision);
    env["KILN_INSTANCE"] = spec.instance;
    env["PORT"] = std::to_string(port);

    SpawnRequest req;
    StatusOr<std::string> path = FindExecutable(argv[0], env["PATH"]);
    if (!path.ok()) return release_port(path.status());
    req.path = *path;
    req.argv = argv;
    req.env.reserve(env.size());
    for (const auto& [k, v] : env) {
      std::string& entry = req.env.emplace_back(k);
      entry += '=';
      entry += v;
    }
    req.log = options.log_dir / (spec.instance + ".log");
    req.nofile_soft = options.instance_nofile_soft;

    std::optional<fs::path> cgroup_dir;
    UniqueFd cgroup_fd;
    if (cgroup_base) {
      fs::path dir = *cgroup_base / spec.instance;
      if (::mkdir(dir.c_str(), 0755) != 0) {
        if (errno != EEXIST)
          return release_port(ErrnoError(errno, "cannot make cgroup " + dir.string()));
        if (!cgroup::Procs(dir).empty()) {
          return release_port(
              AlreadyExistsError("processes of the instance run in " + dir.string()));
        }
      }
      cgroup_fd = UniqueFd(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
      if (!cgroup_fd) {
        Status s = ErrnoError(errno, "cannot open cgroup " + dir.string());
        (void)cgroup::Remove(dir);
        return release_port(s);
      }
      cgroup_dir = dir;
      req.cgroup_fd = cgroup_fd.get();
    }
    StatusOr<Spawned> spawned = SpawnProcess(req);
    if (!spawned.ok() && spawned.status().code() == StatusCode::kUnimplemented && cgroup_dir) {
      LogError("process driver: instances are kept together by session and environment from now on",
               {{"mode", "session"}, {"why", spawned.status().message()}});
      (void)cgroup::Remove(*cgroup_dir);
      cgroup_base.reset();
      cgroup_dir.reset();
      req.cgroup_fd = -1;
      spawned = SpawnProcess(req);
    }
    cgroup_fd.reset();
    if (!spawned.ok()) {
      if (cgroup_dir) (void)cgroup::Remove(*cgroup_dir);
      return release_port(spawned.status());
    }
    const pid_t pid = spawned->pid;
    // Our unreaped child: its /proc entry stays, as a zombie at worst, until we wait for it.
    StatusOr<proc::Stat> st = proc::ReadStat(pid);
    if (!st.ok()) {
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      if (cgroup_dir) {
        (void)cgroup::KillAll(*cgroup_dir);
        (void)cgroup::Remove(*cgroup_dir);
      }
      return release_port(st.status());
    }
    InstanceHandle handle;
    handle.instance = spec.instance;
    handle.id = EncodeId({pid, st->start_time});
    handle.pid = pid;
    handle.host = "127.0.0.1";
    handle.port = port;
    Track(handle, {pid, st->start_time}, std::move(spawned->pidfd), cgroup_dir, spec.service,
          spec.revision);
    LogInfo("instance process started", {{"service", spec.service},
                                         {"revision", spec.revision},
                                         {"instance", spec.instance},
                                         {"pid", static_cast<int64_t>(pid)},
                                         {"port", port},
                                         {"cgroup", cgroup_dir ? cgroup_dir->string() : ""}});
    return handle;
  }

  Status DoAdopt(const InstanceHandle& handle) {
    if (auto it = watches.find(handle.instance); it != watches.end()) {
      if (!it->second->silent) return Status::Ok();
      return NotFoundError("instance " + handle.instance + " is gone");
    }
    ASSIGN_OR_RETURN(ProcessId id, DecodeId(handle));
    std::optional<fs::path> cgroup_dir = CgroupDirOf(handle.instance);
    std::string gone;
    if (id.pid <= 0) {
      gone = "instance " + handle.instance + " is gone: its leader process exited";
    } else {
      UniqueFd pidfd(proc::PidfdOpen(id.pid));
      StatusOr<proc::Stat> st =
          pidfd ? proc::ReadStat(id.pid) : StatusOr<proc::Stat>(NotFoundError(""));
      if (!st.ok() || st->state == 'Z') {
        gone = "instance " + handle.instance + " (pid " + std::to_string(id.pid) + ") is gone";
      } else if (st->start_time != id.start_time) {
        gone = "instance " + handle.instance + " is gone: pid " + std::to_string(id.pid) +
               " now belongs to another process";
      } else {
        std::map<std::string, std::string> env = proc::ReadEnviron(id.pid);
        Track(handle, id, std::move(pidfd), cgroup_dir, env["KILN_SERVICE"],
              std::atoll(env["KILN_REVISION"].c_str()));
        return Status::Ok();
      }
    }
    // The instance ended with its leader. What it left behind is no instance: it goes too.
    std::vector<pid_t> leftovers = Members(handle.instance, cgroup_dir);
    if (leftovers.empty()) {
      if (cgroup_dir) (void)cgroup::Remove(*cgroup_dir);
      return NotFoundError(gone);
    }
    LogWarn("killing the processes an instance left behind when its leader ended",
            {{"instance", handle.instance}, {"processes", static_cast<int64_t>(leftovers.size())}});
    auto w = NewWatch(handle, {0, 0}, UniqueFd(), cgroup_dir);
    w->leader_done = true;
    w->exit.status_known = false;
    w->silent = true;
    w->killing = true;
    Drain(w);
    return NotFoundError(gone + "; killing the " + std::to_string(leftovers.size()) +
                         " processes it left behind");
  }

  void DoStop(const InstanceHandle& handle, Duration grace, StopFn done) {
    auto it = watches.find(handle.instance);
    if (it == watches.end()) {
      (void)DoAdopt(handle);  // also takes on the leftovers of one whose leader is gone
      it = watches.find(handle.instance);
      if (it == watches.end()) {
        // Already gone: the stop is done.
        ExitInfo info;
        info.instance = handle.instance;
        info.status_known = false;
        asio::post(io, [done = std::move(done), info] { done(info); });
        return;
      }
    }
    std::shared_ptr<Watch> w = it->second;
    if (w->stop_done) {
      // A second Stop while one is in progress: both callers hear the one ending.
      auto first = std::move(w->stop_done);
      w->stop_done = [first = std::move(first),
                      done = std::move(done)](const StatusOr<ExitInfo>& r) {
        first(r);
        done(r);
      };
      return;
    }
    w->stop_done = std::move(done);
    if (w->stopping || w->killing) return;  // already on its way out
    w->stopping = true;
    Signal(w, SIGTERM);
    w->kill_timer.expires_after(grace);
    std::weak_ptr<Impl> weak = weak_from_this();
    w->kill_timer.async_wait([weak, w](const boost::system::error_code& ec) {
      auto self = weak.lock();
      if (!self || ec || !self->Current(w)) return;  // it ended in time
      LogWarn("instance still runs after SIGTERM and the grace period; killing every process of it",
              {{"service", w->service},
               {"revision", w->revision},
               {"instance", w->handle.instance},
               {"pid", static_cast<int64_t>(w->leader.pid)}});
      w->killing = true;
      self->Signal(w, SIGKILL);
      // The leader may be long gone; the rest is drained. Otherwise its exit drains.
      if (w->leader_done) self->Drain(w);
    });
    // A leader that already ended (drain in progress or not started): its leftovers got the
    // SIGTERM; the drain in progress notices their exits.
    if (w->leader_done && w->member_fds.empty()) Drain(w);
  }

  StatusOr<std::vector<RunningInstance>> DoList() {
    // Instance name -> its processes.
    std::map<std::string, std::set<pid_t>> groups;
    if (cgroup_base) {
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(*cgroup_base, ec)) {
        if (!entry.is_directory(ec)) continue;
        const std::string name = entry.path().filename().string();
        std::vector<pid_t> procs = cgroup::Procs(entry.path());
        if (procs.empty()) {
          // An instance that ended while no kilnd watched it: nothing is left to stop.
          if (!watches.count(name)) (void)cgroup::Remove(entry.path());
          continue;
        }
        groups[name].insert(procs.begin(), procs.end());
      }
    }
    for (pid_t pid : proc::ListPids()) {
      std::map<std::string, std::string> env = proc::ReadEnviron(pid);
      auto ctl = env.find("KILN_CONTROLLER");
      if (ctl == env.end() || ctl->second != options.controller_id) continue;
      auto inst = env.find("KILN_INSTANCE");
      if (inst == env.end() || inst->second.empty()) continue;
      groups[inst->second].insert(pid);
    }
    std::vector<RunningInstance> out;
    for (const auto& [name, pids] : groups) {
      std::map<pid_t, proc::Stat> members;
      for (pid_t pid : pids) {
        StatusOr<proc::Stat> st = proc::ReadStat(pid);
        if (st.ok() && st->state != 'Z') members[pid] = *st;
      }
      if (members.empty()) continue;
      std::optional<pid_t> leader = PickLeader(members);
      RunningInstance r;
      r.handle.instance = name;
      r.handle.id = leader ? EncodeId({*leader, members[*leader].start_time}) : EncodeId({0, 0});
      r.handle.pid = leader ? *leader : 0;
      r.handle.host = "127.0.0.1";
      // Identity from the leader's environment, else from any process of it that has one.
      std::map<std::string, std::string> env;
      if (leader) env = proc::ReadEnviron(*leader);
      for (auto it = members.begin(); env.count("KILN_SERVICE") == 0 && it != members.end(); ++it) {
        env = proc::ReadEnviron(it->first);
      }
      r.handle.port = std::atoi(env["PORT"].c_str());
      r.service = env["KILN_SERVICE"];
      r.revision = std::atoll(env["KILN_REVISION"].c_str());
      out.push_back(std::move(r));
    }
    return out;
  }

  asio::io_context& io;
  Options options;
  PortAllocator ports;
  std::optional<fs::path> cgroup_base;  // kiln-<controller id>, in cgroup mode
  std::map<std::string, std::shared_ptr<Watch>> watches;
  ExitFn exit_fn;
};

ProcessDriver::ProcessDriver(asio::io_context& io, Options options)
    : impl_(std::make_shared<Impl>(io, std::move(options))) {
  std::error_code ec;
  fs::create_directories(impl_->options.log_dir, ec);
}

ProcessDriver::~ProcessDriver() = default;

void ProcessDriver::SetExitCallback(ExitFn fn) { impl_->exit_fn = std::move(fn); }

void ProcessDriver::Start(const InstanceSpec& spec, StartFn done) {
  StatusOr<InstanceHandle> result = impl_->DoStart(spec);
  asio::post(impl_->io, [done = std::move(done), result = std::move(result)]() mutable {
    done(std::move(result));
  });
}

void ProcessDriver::Stop(const InstanceHandle& handle, Duration grace, StopFn done) {
  impl_->DoStop(handle, grace, std::move(done));
}

StatusOr<bool> ProcessDriver::IsRunning(const InstanceHandle& handle) {
  ASSIGN_OR_RETURN(ProcessId id, DecodeId(handle));
  if (id.pid > 0 && proc::IsAlive(id.pid, id.start_time)) return true;
  // The leader is gone; what it left behind still has to be stopped.
  return !impl_->Members(handle.instance, impl_->CgroupDirOf(handle.instance)).empty();
}

Status ProcessDriver::Adopt(const InstanceHandle& handle) { return impl_->DoAdopt(handle); }

StatusOr<std::vector<RunningInstance>> ProcessDriver::List() { return impl_->DoList(); }

ProcessDriver::Isolation ProcessDriver::isolation() const {
  return impl_->cgroup_base ? Isolation::kCgroup : Isolation::kSession;
}

fs::path ProcessDriver::CgroupDirForTest(const std::string& instance) const {
  return impl_->cgroup_base ? *impl_->cgroup_base / instance : fs::path();
}

void ProcessDriver::PidfdReadyForTest(const std::string& instance) {
  auto it = impl_->watches.find(instance);
  if (it == impl_->watches.end() || it->second->leader_done) return;
  boost::system::error_code ignored;
  it->second->pidfd.cancel(ignored);  // the wait in progress ends without effect
  impl_->OnLeaderReady(it->second);
}

size_t ProcessDriver::WatchedCountForTest() const { return impl_->watches.size(); }

void ProcessDriver::Discard(const std::string& instance) {
  if (Status s = RemoveInstanceLogs(impl_->options.log_dir, instance); !s.ok()) {
    LogWarn("cannot remove an instance's logs", {{"instance", instance}, {"error", s.message()}});
  }
}

}  // namespace kiln
