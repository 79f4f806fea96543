#include "common/regular_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace kiln {
namespace {

std::string_view KindOf(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a file";
}

Status CheckStat(const struct stat& st, uint64_t max_bytes, std::string_view what) {
  if (S_ISDIR(st.st_mode)) return ErrnoError(EISDIR, std::string(what));
  if (!S_ISREG(st.st_mode)) {
    return FailedPreconditionError(std::string(what) + ": not a regular file (" +
                                   std::string(KindOf(st.st_mode)) + ")");
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) return TooLarge(max_bytes, what);
  return Status::Ok();
}

}  // namespace

Status TooLarge(uint64_t max_bytes, std::string_view what) {
  return FailedPreconditionError(std::string(what) + ": larger than the limit of " +
                                 std::to_string(max_bytes) + " bytes");
}

StatusOr<RegularFile> OpenRegularFile(const std::filesystem::path& path, uint64_t max_bytes,
                                      std::string_view what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ErrnoError(errno, std::string(what));
  RETURN_IF_ERROR(CheckStat(st, max_bytes, what));
  RegularFile f;
  f.fd.reset(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
  if (!f.fd) return ErrnoError(errno, std::string(what));
  if (::fstat(f.fd.get(), &st) != 0) return ErrnoError(errno, std::string(what));
  RETURN_IF_ERROR(CheckStat(st, max_bytes, what));
  f.size = static_cast<uint64_t>(st.st_size);
  return f;
}

Status ReadChunks(RegularFile& file, uint64_t max_bytes, std::string_view what,
                  const std::function<Status(const char* data, size_t size)>& chunk) {
  char buf[1 << 16];
  uint64_t total = 0;
  for (;;) {
    ssize_t n = ::read(file.fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, std::string(what));
    }
    if (n == 0) return Status::Ok();
    total += static_cast<uint64_t>(n);
    if (total > max_bytes) return TooLarge(max_bytes, what);  // it grew while being read
    RETURN_IF_ERROR(chunk(buf, static_cast<size_t>(n)));
  }
}

StatusOr<std::string> ReadRegularFile(const std::filesystem::path& path, size_t max_bytes,
                                      std::string_view what) {
  ASSIGN_OR_RETURN(RegularFile f, OpenRegularFile(path, max_bytes, what));
  std::string out;
  out.reserve(static_cast<size_t>(f.size));
  RETURN_IF_ERROR(ReadChunks(f, max_bytes, what, [&](const char* data, size_t size) {
    out.append(data, size);
    return Status::Ok();
  }));
  return out;
}

}  // namespace kiln
