#include "deploy/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <optional>

#include "common/unique_fd.h"
#include "deploy/proc.h"

namespace kiln::cgroup {
namespace fs = std::filesystem;

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      std::string_view oct = s.substr(i + 1, 3);
      if (oct.find_first_not_of("01234567") == std::string_view::npos) {
        out.push_back(static_cast<char>((oct[0] - '0') * 64 + (oct[1] - '0') * 8 + (oct[2] - '0')));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

std::vector<std::string_view> SplitSpaces(std::string_view line) {
  std::vector<std::string_view> out;
  while (!line.empty()) {
    size_t sp = line.find(' ');
    if (sp != 0) out.push_back(line.substr(0, sp));
    if (sp == std::string_view::npos) break;
    line.remove_prefix(sp + 1);
  }
  return out;
}

}  // namespace

StatusOr<V2Mount> FindV2Mount(std::string_view mountinfo) {
  // "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS"
  while (!mountinfo.empty()) {
    size_t nl = mountinfo.find('\n');
    std::string_view line = mountinfo.substr(0, nl);
    mountinfo.remove_prefix(nl == std::string_view::npos ? mountinfo.size() : nl + 1);
    std::vector<std::string_view> f = SplitSpaces(line);
    size_t dash = 0;
    for (size_t i = 6; i < f.size(); ++i) {
      if (f[i] == "-") {
        dash = i;
        break;
      }
    }
    if (dash == 0 || dash + 1 >= f.size() || f[dash + 1] != "cgroup2") continue;
    return V2Mount{Unescape(f[4]), Unescape(f[3])};
  }
  return NotFoundError("no cgroup2 file system is mounted");
}

StatusOr<fs::path> OwnCgroupDir() {
  std::optional<std::string> mountinfo = proc::ReadSmallFile("/proc/self/mountinfo");
  if (!mountinfo) return ErrnoError(errno, "read /proc/self/mountinfo");
  ASSIGN_OR_RETURN(V2Mount mount, FindV2Mount(*mountinfo));
  ASSIGN_OR_RETURN(std::string own, proc::ReadCgroupV2(::getpid()));
  // The mount shows the hierarchy from mount.root down; our cgroup must lie below it.
  std::string_view rel(own);
  if (mount.root != "/") {
    if (rel.substr(0, mount.root.size()) != mount.root ||
        (rel.size() > mount.root.size() && rel[mount.root.size()] != '/')) {
      return NotFoundError("this process's cgroup " + own + " is outside the cgroup2 mount at " +
                           mount.mount_point.string());
    }
    rel.remove_prefix(mount.root.size());
  }
  while (!rel.empty() && rel.front() == '/') rel.remove_prefix(1);
  // A cgroup namespace shows "/.." paths for cgroups outside it.
  if (rel.find("..") != std::string_view::npos) {
    return NotFoundError("this process's cgroup " + own + " is outside its cgroup namespace");
  }
  return rel.empty() ? mount.mount_point : mount.mount_point / std::string(rel);
}

std::vector<pid_t> Procs(const fs::path& dir) {
  std::vector<pid_t> out;
  std::optional<std::string> text = proc::ReadSmallFile((dir / "cgroup.procs").string());
  if (!text) return out;
  size_t start = 0;
  while (start < text->size()) {
    size_t end = text->find('\n', start);
    if (end == std::string::npos) end = text->size();
    long pid = std::strtol(text->c_str() + start, nullptr, 10);
    if (pid > 0) out.push_back(static_cast<pid_t>(pid));
    start = end + 1;
  }
  return out;
}

Status KillAll(const fs::path& dir) {
  UniqueFd fd(::open((dir / "cgroup.kill").c_str(), O_WRONLY | O_CLOEXEC));
  if (fd) {
    if (::write(fd.get(), "1", 1) == 1) return Status::Ok();
    return ErrnoError(errno, "write " + (dir / "cgroup.kill").string());
  }
  if (errno != ENOENT) return ErrnoError(errno, "open " + (dir / "cgroup.kill").string());
  // No cgroup.kill (Linux < 5.14): whatever forks meanwhile is caught by the caller's next pass.
  for (pid_t pid : Procs(dir)) ::kill(pid, SIGKILL);
  return Status::Ok();
}

Status Remove(const fs::path& dir) {
  if (::rmdir(dir.c_str()) == 0 || errno == ENOENT) return Status::Ok();
  return ErrnoError(errno, "remove cgroup " + dir.string());
}

}  // namespace kiln::cgroup
