#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "common/unique_fd.h"

namespace kiln {

namespace fs = std::filesystem;

Status WriteFileAtomically(const fs::path& path, std::string_view text, Durability durability,
                           mode_t mode) {
  const fs::path tmp = path.string() + ".tmp";
  auto fail = [&tmp](int err, const std::string& what) {
    ::unlink(tmp.c_str());
    return ErrnoError(err, what);
  };
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
    if (!fd) return ErrnoError(errno, "cannot write " + tmp.string());
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return fail(n < 0 ? errno : EIO, "cannot write " + tmp.string());
      done += static_cast<size_t>(n);
    }
    if (durability == Durability::kSynced && ::fsync(fd.get()) != 0) {
      return fail(errno, "cannot sync " + tmp.string());
    }
    if (::close(fd.release()) != 0) return fail(errno, "cannot write " + tmp.string());
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(errno, "cannot rename " + tmp.string() + " to " + path.string());
  }
  if (durability == Durability::kVisible) return Status::Ok();
  // The rename itself survives a crash only once the directory is synced.
  fs::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd || ::fsync(dir_fd.get()) != 0) {
    return ErrnoError(errno, "cannot sync directory " + dir.string());
  }
  return Status::Ok();
}

}  // namespace kiln
