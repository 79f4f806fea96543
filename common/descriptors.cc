#include "common/descriptors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "common/unique_fd.h"

namespace kiln {

Status SetCloseOnExec(int fd) {
  int flags = ::fcntl(fd, F_GETFD);
  if (flags < 0) return ErrnoError(errno, "fcntl(F_GETFD) on descriptor " + std::to_string(fd));
  if (flags & FD_CLOEXEC) return Status::Ok();
  if (::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0) {
    return ErrnoError(errno, "fcntl(F_SETFD, FD_CLOEXEC) on descriptor " + std::to_string(fd));
  }
  return Status::Ok();
}

Status MarkInheritedCloseOnExec() {
#ifdef CLOSE_RANGE_CLOEXEC
  if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) == 0) return Status::Ok();
  if (errno != ENOSYS && errno != EINVAL)
    return ErrnoError(errno, "close_range(3, ~0, CLOSE_RANGE_CLOEXEC)");
#endif
  // Kernels before 5.11: one by one. Collected first, so the directory's own descriptor (which
  // is close-on-exec) is not touched while the listing runs.
  std::vector<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return ErrnoError(errno, "opendir /proc/self/fd");
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    int fd = std::atoi(e->d_name);
    if (fd > 2 && fd != ::dirfd(dir)) fds.push_back(fd);
  }
  ::closedir(dir);
  for (int fd : fds) {
    Status s = SetCloseOnExec(fd);
    if (!s.ok() && ::fcntl(fd, F_GETFD) >= 0) return s;  // one that closed meanwhile is fine
  }
  return Status::Ok();
}

bool IsCloseOnExec(int fd) {
  int flags = ::fcntl(fd, F_GETFD);
  return flags >= 0 && (flags & FD_CLOEXEC) != 0;
}

StatusOr<NofileLimit> RaiseNofileLimit() {
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return ErrnoError(errno, "getrlimit(RLIMIT_NOFILE)");
  NofileLimit out;
  out.soft_before = rl.rlim_cur;
  out.hard = rl.rlim_max;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) return ErrnoError(errno, "setrlimit(RLIMIT_NOFILE)");
  }
  out.soft = rl.rlim_cur;
  return out;
}

}  // namespace kiln
