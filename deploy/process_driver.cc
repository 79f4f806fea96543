#include "deploy/process_driver.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <map>

#include "common/logging.h"
#include "common/sha256.h"
#include "common/unique_fd.h"
#include "deploy/artifact_store.h"
#include "deploy/port_allocator.h"
#include "deploy/proc.h"

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
    return InvalidArgumentError("instance " + h.instance + ": not a process handle: \"" + h.id + "\"");
  };
  if (s.substr(0, 4) != "pid:") return bad();
  s.remove_prefix(4);
  size_t colon = s.find(':');
  if (colon == std::string_view::npos) return bad();
  ProcessId p;
  auto r1 = std::from_chars(s.data(), s.data() + colon, p.pid);
  auto r2 = std::from_chars(s.data() + colon + 1, s.data() + s.size(), p.start_time);
  if (r1.ec != std::errc() || r2.ec != std::errc() || p.pid <= 0) return bad();
  return p;
}

void ReplaceAll(std::string& s, std::string_view from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
}

// Whether `id` still names a live process (not a zombie, same start time).
bool Alive(ProcessId id) {
  StatusOr<proc::Stat> st = proc::ReadStat(id.pid);
  return st.ok() && st->start_time == id.start_time && st->state != 'Z';
}

}  // namespace

std::string ExitInfo::Describe() const {
  if (exit_code) return "exited with code " + std::to_string(*exit_code);
  if (signal) {
    const char* abbrev = sigabbrev_np(*signal);
    return "killed by " + (abbrev ? "SIG" + std::string(abbrev) : "signal " + std::to_string(*signal));
  }
  return status_known ? "exited" : "exited (status unknown: not started by this kilnd)";
}

std::string ControllerIdForStateDir(const fs::path& state_dir) {
  std::error_code ec;
  fs::path abs = fs::weakly_canonical(fs::absolute(state_dir, ec), ec);
  return Sha256Hex(abs.string()).substr(0, 16);
}

struct ProcessDriver::Impl : std::enable_shared_from_this<Impl> {
  // One watched process.
  struct Watch {
    InstanceHandle handle;
    ProcessId id;
    asio::posix::stream_descriptor pidfd;
    asio::steady_timer kill_timer;
    StopFn stop_done;  // set while a Stop is in progress

    Watch(asio::io_context& io, int fd) : pidfd(io, fd), kill_timer(io) {}
  };

  Impl(asio::io_context& io_in, Options o)
      : io(io_in), options(std::move(o)), ports(options.port_first, options.port_last) {}

  ~Impl() {
    // Instances keep running; only our watching ends.
    for (auto& [name, w] : watches) {
      boost::system::error_code ignored;
      w->pidfd.close(ignored);
      w->kill_timer.cancel();
    }
  }

  Status Track(const InstanceHandle& handle, ProcessId id, UniqueFd pidfd) {
    auto w = std::make_shared<Watch>(io, pidfd.release());
    w->handle = handle;
    w->id = id;
    if (handle.port > 0) ports.Reserve(handle.port);
    watches[handle.instance] = w;
    std::weak_ptr<Impl> weak = weak_from_this();
    w->pidfd.async_wait(asio::posix::stream_descriptor::wait_read,
                        [weak, w](const boost::system::error_code& ec) {
                          auto self = weak.lock();
                          if (!self || ec) return;  // driver gone or watch cancelled
                          self->OnExited(w);
                        });
    return Status::Ok();
  }

  void OnExited(const std::shared_ptr<Watch>& w) {
    ExitInfo info;
    info.instance = w->handle.instance;
    siginfo_t si{};
    // Reaps it when it is our child; a process started by an earlier kilnd is not (ECHILD).
    if (::waitid(kIdTypePidfd, static_cast<id_t>(w->pidfd.native_handle()), &si, WEXITED | WNOHANG) ==
            0 &&
        si.si_pid != 0) {
      if (si.si_code == CLD_EXITED) {
        info.exit_code = si.si_status;
      } else {
        info.signal = si.si_status;
      }
    } else {
      info.status_known = false;
    }
    // Whatever the instance left behind in its process group goes with it. Only safe while the
    // group's pid cannot have been reused: the leader is ours and was reaped just now.
    if (info.status_known) ::kill(-w->id.pid, SIGKILL);
    w->kill_timer.cancel();
    boost::system::error_code ignored;
    w->pidfd.close(ignored);
    ports.Release(w->handle.port);
    watches.erase(w->handle.instance);
    LogInfo("instance process ended", {{"instance", info.instance},
                                       {"pid", static_cast<int64_t>(w->id.pid)},
                                       {"how", info.Describe()}});
    if (w->stop_done) {
      auto done = std::move(w->stop_done);
      done(info);
    } else if (exit_fn) {
      exit_fn(info);
    }
  }

  StatusOr<InstanceHandle> DoStart(const InstanceSpec& spec) {
    auto fail = [&](const Status& s) { return s.WithContext("start " + spec.instance); };
    if (watches.count(spec.instance)) {
      return fail(AlreadyExistsError("instance is already running"));
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
    auto release_port = [&](Status s) {
      ports.Release(port);
      return fail(s);
    };

    std::vector<std::string> argv = spec.command.empty() ? std::vector<std::string>{"{artifact}"}
                                                         : spec.command;
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
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);

    std::vector<char*> cargv, cenv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    for (auto& e : env_strings) cenv.push_back(e.data());
    cenv.push_back(nullptr);

    const fs::path log = options.log_dir / (spec.instance + ".log");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    // A new session: the instance is its own process group, apart from kilnd's terminal and
    // signals. The default signal mask and dispositions, whatever kilnd uses.
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid = -1;
    const bool search_path = argv[0].find('/') == std::string::npos;
    int rc = search_path ? posix_spawnp(&pid, cargv[0], &actions, &attr, cargv.data(), cenv.data())
                         : posix_spawn(&pid, cargv[0], &actions, &attr, cargv.data(), cenv.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
      // Missing, not executable or not a program: the same spec fails the same way every time.
      const bool permanent = rc == ENOENT || rc == EACCES || rc == ENOEXEC || rc == ENOTDIR ||
                             rc == ELOOP || rc == ENAMETOOLONG;
      Status error = ErrnoError(rc, "cannot execute " + argv[0]);
      return release_port(permanent ? InvalidArgumentError(error.message()) : error);
    }

    // The pidfd first, then the start time: the pidfd pins the process we read about.
    UniqueFd pidfd(proc::PidfdOpen(pid));
    StatusOr<proc::Stat> st = proc::ReadStat(pid);
    if (!pidfd || !st.ok()) {
      // It exited at once (or cannot be watched): report it as a failed start, leave nothing.
      ::kill(-pid, SIGKILL);
      int status = 0;
      ::waitpid(pid, &status, 0);
      std::string how = WIFEXITED(status) ? "exited with code " + std::to_string(WEXITSTATUS(status))
                                          : "died at once";
      return release_port(FailedPreconditionError(argv[0] + " " + how + " before it could be watched"));
    }
    InstanceHandle handle;
    handle.instance = spec.instance;
    handle.id = EncodeId({pid, st->start_time});
    handle.host = "127.0.0.1";
    handle.port = port;
    RETURN_IF_ERROR(Track(handle, {pid, st->start_time}, std::move(pidfd)));
    LogInfo("instance process started", {{"service", spec.service},
                                         {"revision", spec.revision},
                                         {"instance", spec.instance},
                                         {"pid", static_cast<int64_t>(pid)},
                                         {"port", port}});
    return handle;
  }

  Status DoAdopt(const InstanceHandle& handle) {
    if (watches.count(handle.instance)) return Status::Ok();
    ASSIGN_OR_RETURN(ProcessId id, DecodeId(handle));
    UniqueFd pidfd(proc::PidfdOpen(id.pid));
    if (!pidfd) {
      return NotFoundError("instance " + handle.instance + " (pid " + std::to_string(id.pid) +
                           ") is gone");
    }
    StatusOr<proc::Stat> st = proc::ReadStat(id.pid);
    if (!st.ok() || st->state == 'Z') {
      return NotFoundError("instance " + handle.instance + " (pid " + std::to_string(id.pid) +
                           ") is gone");
    }
    if (st->start_time != id.start_time) {
      return NotFoundError("instance " + handle.instance + " is gone: pid " +
                           std::to_string(id.pid) + " now belongs to another process");
    }
    return Track(handle, id, std::move(pidfd));
  }

  void DoStop(const InstanceHandle& handle, Duration grace, StopFn done) {
    auto it = watches.find(handle.instance);
    if (it == watches.end()) {
      Status adopted = DoAdopt(handle);
      if (!adopted.ok()) {
        // Already gone: the stop is done.
        ExitInfo info;
        info.instance = handle.instance;
        info.status_known = false;
        asio::post(io, [done = std::move(done), info] { done(info); });
        return;
      }
      it = watches.find(handle.instance);
    }
    std::shared_ptr<Watch> w = it->second;
    if (w->stop_done) {
      // A second Stop while one is in progress: both callers hear the one ending.
      auto first = std::move(w->stop_done);
      w->stop_done = [first = std::move(first), done = std::move(done)](StatusOr<ExitInfo> r) {
        first(r);
        done(r);
      };
      return;
    }
    w->stop_done = std::move(done);
    ::kill(-w->id.pid, SIGTERM);
    w->kill_timer.expires_after(grace);
    w->kill_timer.async_wait([w](const boost::system::error_code& ec) {
      if (ec) return;  // it ended in time
      LogWarn("instance ignored SIGTERM; killing it",
              {{"instance", w->handle.instance}, {"pid", static_cast<int64_t>(w->id.pid)}});
      ::kill(-w->id.pid, SIGKILL);
    });
  }

  asio::io_context& io;
  Options options;
  PortAllocator ports;
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
  return Alive(id);
}

Status ProcessDriver::Adopt(const InstanceHandle& handle) { return impl_->DoAdopt(handle); }

StatusOr<std::vector<RunningInstance>> ProcessDriver::List() {
  std::vector<RunningInstance> out;
  for (pid_t pid : proc::ListPids()) {
    StatusOr<proc::Stat> st = proc::ReadStat(pid);
    // Instances are session leaders; their own children inherit the environment but are not.
    if (!st.ok() || st->session != pid || st->state == 'Z') continue;
    std::map<std::string, std::string> env = proc::ReadEnviron(pid);
    auto ctl = env.find("KILN_CONTROLLER");
    if (ctl == env.end() || ctl->second != impl_->options.controller_id) continue;
    RunningInstance r;
    r.handle.instance = env["KILN_INSTANCE"];
    r.handle.id = EncodeId({pid, st->start_time});
    r.handle.host = "127.0.0.1";
    r.handle.port = std::atoi(env["PORT"].c_str());
    r.service = env["KILN_SERVICE"];
    r.revision = std::atoll(env["KILN_REVISION"].c_str());
    out.push_back(std::move(r));
  }
  return out;
}

size_t ProcessDriver::WatchedCountForTest() const { return impl_->watches.size(); }

}  // namespace kiln
