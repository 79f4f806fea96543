#pragma once

// cgroup v2, as far as the process driver needs it: one cgroup per instance, so that "every
// process of the instance" is something the kernel keeps track of (forks, setsid and reparenting
// included) and can kill at once.

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kiln::cgroup {

// The mount point of the cgroup v2 hierarchy and the path inside the hierarchy that the mount
// shows at that point ("/" unless only a subtree is mounted, as in some containers).
struct V2Mount {
  std::filesystem::path mount_point;
  std::string root;
};

// Finds the cgroup2 mount in the text of /proc/self/mountinfo (pure, for tests). NOT_FOUND when
// there is none: a cgroup v1-only host. "/sys/fs/cgroup" on a pure v2 host, e.g.
// "/sys/fs/cgroup/unified" on a hybrid one.
StatusOr<V2Mount> FindV2Mount(std::string_view mountinfo);

// The directory of this process's own v2 cgroup (from /proc/self/mountinfo and /proc/self/cgroup).
StatusOr<std::filesystem::path> OwnCgroupDir();

// The processes in the cgroup (cgroup.procs; exited ones are not listed). Empty when the cgroup
// is gone.
std::vector<pid_t> Procs(const std::filesystem::path& dir);

// Kills every process in the cgroup with SIGKILL, including any it forks meanwhile
// (cgroup.kill, Linux 5.14); before 5.14, SIGKILL to each process listed.
Status KillAll(const std::filesystem::path& dir);

// Removes an empty cgroup. OK when it is already gone.
Status Remove(const std::filesystem::path& dir);

}  // namespace kiln::cgroup
