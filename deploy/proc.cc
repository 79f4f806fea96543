#include "deploy/proc.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "common/unique_fd.h"

namespace kiln::proc {

std::optional<std::string> ReadSmallFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return std::nullopt;
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return std::nullopt;
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

StatusOr<Stat> ReadStat(pid_t pid) {
  std::optional<std::string> text = ReadSmallFile("/proc/" + std::to_string(pid) + "/stat");
  if (!text) return NotFoundError("no process " + std::to_string(pid));
  // "pid (comm) state ppid pgrp session ..." where comm may hold spaces and ')'.
  size_t close = text->rfind(')');
  if (close == std::string::npos || close + 2 >= text->size()) {
    return InternalError("cannot parse /proc/" + std::to_string(pid) + "/stat");
  }
  std::vector<std::string_view> fields;  // fields[0] is field 3 (state)
  std::string_view rest(*text);
  rest.remove_prefix(close + 2);
  while (!rest.empty()) {
    size_t sp = rest.find(' ');
    fields.push_back(rest.substr(0, sp));
    if (sp == std::string_view::npos) break;
    rest.remove_prefix(sp + 1);
  }
  if (fields.size() < 20)
    return InternalError("cannot parse /proc/" + std::to_string(pid) + "/stat");
  Stat s;
  s.state = fields[0].empty() ? '?' : fields[0][0];
  s.ppid = static_cast<pid_t>(std::strtol(std::string(fields[1]).c_str(), nullptr, 10));
  s.pgrp = static_cast<pid_t>(std::strtol(std::string(fields[2]).c_str(), nullptr, 10));
  s.session = static_cast<pid_t>(std::strtol(std::string(fields[3]).c_str(), nullptr, 10));
  s.start_time = std::strtoull(std::string(fields[19]).c_str(), nullptr, 10);  // field 22
  return s;
}

std::map<std::string, std::string> ReadEnviron(pid_t pid) {
  std::map<std::string, std::string> env;
  std::optional<std::string> text = ReadSmallFile("/proc/" + std::to_string(pid) + "/environ");
  if (!text) return env;
  size_t start = 0;
  while (start < text->size()) {
    size_t end = text->find('\0', start);
    if (end == std::string::npos) end = text->size();
    std::string_view kv(text->data() + start, end - start);
    size_t eq = kv.find('=');
    if (eq != std::string_view::npos) env.emplace(kv.substr(0, eq), kv.substr(eq + 1));
    start = end + 1;
  }
  return env;
}

std::vector<pid_t> ListPids() {
  std::vector<pid_t> pids;
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr) return pids;
  while (dirent* e = ::readdir(dir)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (end != e->d_name && *end == '\0' && pid > 0) pids.push_back(static_cast<pid_t>(pid));
  }
  ::closedir(dir);
  return pids;
}

StatusOr<std::string> ReadCgroupV2(pid_t pid) {
  std::optional<std::string> text = ReadSmallFile("/proc/" + std::to_string(pid) + "/cgroup");
  if (!text) return NotFoundError("no process " + std::to_string(pid));
  // One line per hierarchy, "ID:CONTROLLERS:PATH"; the v2 one is "0::PATH".
  size_t start = 0;
  while (start < text->size()) {
    size_t end = text->find('\n', start);
    if (end == std::string::npos) end = text->size();
    std::string_view line(text->data() + start, end - start);
    if (line.substr(0, 3) == "0::") return std::string(line.substr(3));
    start = end + 1;
  }
  return NotFoundError("process " + std::to_string(pid) + " is in no cgroup v2");
}

bool IsAlive(pid_t pid, uint64_t start_time) {
  StatusOr<Stat> st = ReadStat(pid);
  return st.ok() && st->start_time == start_time && st->state != 'Z';
}

int PidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

}  // namespace kiln::proc
