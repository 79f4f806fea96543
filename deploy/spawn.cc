#include "deploy/spawn.h"

#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "deploy/proc.h"

namespace kiln {
namespace {

// Missing, not executable or not a program: the same command fails the same way every time, so
// the error is INVALID_ARGUMENT (Driver::Start: retrying cannot help).
Status ExecError(int err, const std::string& what) {
  Status s = ErrnoError(err, what);
  const bool permanent = err == ENOENT || err == EACCES || err == ENOEXEC || err == ENOTDIR ||
                         err == ELOOP || err == ENAMETOOLONG;
  return permanent ? InvalidArgumentError(s.message()) : s;
}

// Opens with O_CLOEXEC at a descriptor above 2, so that placing it on 0, 1 or 2 in the child
// never overwrites another one of the three.
UniqueFd OpenAbove2(const char* path, int flags, mode_t mode = 0) {
  UniqueFd fd(::open(path, flags | O_CLOEXEC, mode));
  if (fd && fd.get() <= 2) fd = UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3));
  return fd;
}

// What the child reports through the status pipe when it cannot exec.
struct ChildFailure {
  int step;  // kStep*
  int err;
};
constexpr int kStepSetsid = 1;
constexpr int kStepStdio = 2;
constexpr int kStepExec = 3;

// Everything the child needs, prepared before the clone: after it the child may only make
// async-signal-safe calls (kilnd has threads; their locks are copied held).
struct ChildPlan {
  const char* path;
  char* const* argv;
  char* const* envp;
  int stdin_fd;
  int log_fd;
  int status_fd;
  int max_fd;     // for kernels before close_range (5.9)
  rlimit nofile;  // rlim_cur 0: leave it as it is
};

[[noreturn]] void ChildFail(const ChildPlan& plan, int step) {
  ChildFailure f{step, errno};
  ssize_t ignored = ::write(plan.status_fd, &f, sizeof f);
  (void)ignored;
  ::_exit(127);
}

// In the child of clone3. Signals are blocked (the parent blocked them around the clone) and the
// handlers are default (CLONE_CLEAR_SIGHAND); ignored signals stay ignored until reset here.
[[noreturn]] void ChildExec(const ChildPlan& plan) {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);  // EINVAL: reserved
  }
  if (::setsid() < 0) ChildFail(plan, kStepSetsid);
  if (::dup2(plan.stdin_fd, 0) < 0 || ::dup2(plan.log_fd, 1) < 0 || ::dup2(plan.log_fd, 2) < 0) {
    ChildFail(plan, kStepStdio);
  }
  // Nothing else of kilnd's goes along. The status pipe is close-on-exec: it stays until exec
  // so that a failed exec can still be reported.
  const unsigned status = static_cast<unsigned>(plan.status_fd);
  if ((status > 3 && ::close_range(3, status - 1, 0) != 0) ||
      ::close_range(status + 1, ~0U, 0) != 0) {
    for (int fd = 3; fd < plan.max_fd; ++fd) {
      if (fd != plan.status_fd) ::close(fd);
    }
  }
  if (plan.nofile.rlim_cur > 0) ::setrlimit(RLIMIT_NOFILE, &plan.nofile);  // best effort
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::execve(plan.path, plan.argv, plan.envp);
  ChildFail(plan, kStepExec);
}

struct CStrings {
  explicit CStrings(const std::vector<std::string>& v) : strings(v) {
    for (auto& s : strings) ptrs.push_back(s.data());
    ptrs.push_back(nullptr);
  }
  std::vector<std::string> strings;
  std::vector<char*> ptrs;
};

StatusOr<Spawned> SpawnIntoCgroup(const SpawnRequest& r, const CStrings& argv,
                                  const CStrings& env) {
  UniqueFd null_fd = OpenAbove2("/dev/null", O_RDONLY);
  if (!null_fd) return ErrnoError(errno, "cannot open /dev/null");
  UniqueFd log_fd = OpenAbove2(r.log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (!log_fd) return ErrnoError(errno, "cannot open log " + r.log.string());
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return ErrnoError(errno, "cannot make a pipe");
  UniqueFd status_read(pipe_fds[0]);
  UniqueFd status_write(pipe_fds[1]);
  if (status_write.get() <= 2) {
    status_write = UniqueFd(::fcntl(status_write.get(), F_DUPFD_CLOEXEC, 3));
    if (!status_write) return ErrnoError(errno, "cannot make a pipe");
  }
  rlimit nofile{};
  ::getrlimit(RLIMIT_NOFILE, &nofile);
  const int max_fd = nofile.rlim_cur == RLIM_INFINITY || nofile.rlim_cur > (1 << 20)
                         ? (1 << 20)
                         : static_cast<int>(nofile.rlim_cur);
  rlimit child_nofile = nofile;
  child_nofile.rlim_cur = r.nofile_soft > 0 && r.nofile_soft < nofile.rlim_cur ? r.nofile_soft : 0;
  const ChildPlan plan{r.path.c_str(), argv.ptrs.data(),   env.ptrs.data(), null_fd.get(),
                       log_fd.get(),   status_write.get(), max_fd,          child_nofile};

  int pidfd = -1;
  clone_args args{};
  args.flags = CLONE_PIDFD | CLONE_INTO_CGROUP | CLONE_CLEAR_SIGHAND;
  args.pidfd = reinterpret_cast<uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  args.cgroup = static_cast<uint64_t>(r.cgroup_fd);
  // No signal handler of kilnd's may run in the child between the clone and the reset.
  sigset_t all, old;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old);
  long pid = ::syscall(SYS_clone3, &args, sizeof args);
  if (pid == 0) ChildExec(plan);
  const int clone_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (pid < 0) {
    if (clone_errno == ENOSYS || clone_errno == EPERM) {
      return Status(StatusCode::kUnimplemented,
                    std::string("clone3 into a cgroup is refused: ") + std::strerror(clone_errno));
    }
    return ErrnoError(clone_errno, "cannot start a process in its cgroup");
  }
  Spawned out;
  out.pid = static_cast<pid_t>(pid);
  out.pidfd = UniqueFd(pidfd);
  status_write.reset();
  ChildFailure failure{};
  ssize_t n;
  do {
    n = ::read(status_read.get(), &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  if (n == 0) return out;  // exec'd: the pipe closed on exec
  // It could not exec; it has exited (or is about to) with 127.
  siginfo_t si{};
  ::waitid(P_PID, static_cast<id_t>(out.pid), &si, WEXITED);
  if (n != static_cast<ssize_t>(sizeof failure)) return InternalError("the new process failed");
  switch (failure.step) {
    case kStepSetsid:
      return ErrnoError(failure.err, "cannot start a new session");
    case kStepStdio:
      return ErrnoError(failure.err, "cannot set up stdin/stdout/stderr");
    default:
      return ExecError(failure.err, "cannot execute " + r.path);
  }
}

StatusOr<Spawned> SpawnPlain(const SpawnRequest& r, const CStrings& argv, const CStrings& env) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, r.log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  // Nothing else of kilnd's goes along (glibc 2.34; close_range in the child).
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // A new session: the instance is its own process group, apart from kilnd's terminal and
  // signals. The default signal mask and dispositions, whatever kilnd uses.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, r.path.c_str(), &actions, &attr, argv.ptrs.data(), env.ptrs.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return ExecError(rc, "cannot execute " + r.path);
  Spawned out;
  out.pid = pid;
  if (r.nofile_soft > 0) {
    // posix_spawn cannot set a limit in the child: set it from outside at once (it may already
    // have exec'd; only a program that reads its limit in its first instructions sees kilnd's).
    rlimit nofile{};
    if (::prlimit(pid, RLIMIT_NOFILE, nullptr, &nofile) == 0 && r.nofile_soft < nofile.rlim_cur) {
      nofile.rlim_cur = r.nofile_soft;
      ::prlimit(pid, RLIMIT_NOFILE, &nofile, nullptr);
    }
  }
  // Our unreaped child: its pid cannot be reused before we wait for it.
  out.pidfd = UniqueFd(proc::PidfdOpen(pid));
  if (!out.pidfd) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return ErrnoError(err, "cannot watch the new process");
  }
  return out;
}

}  // namespace

StatusOr<Spawned> SpawnProcess(const SpawnRequest& r) {
  CStrings argv(r.argv);
  CStrings env(r.env);
  if (r.cgroup_fd >= 0) return SpawnIntoCgroup(r, argv, env);
  return SpawnPlain(r, argv, env);
}

StatusOr<std::string> FindExecutable(const std::string& name, const std::string& search_path) {
  if (name.find('/') != std::string::npos) return name;
  if (name.empty()) return InvalidArgumentError("cannot execute an empty command");
  int last_err = ENOENT;
  size_t start = 0;
  for (;;) {
    size_t colon = search_path.find(':', start);
    std::string dir = search_path.substr(start, colon == std::string::npos ? colon : colon - start);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
      last_err = EACCES;
    }
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  return ExecError(last_err, "cannot execute " + name);
}

}  // namespace kiln
