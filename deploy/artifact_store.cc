#include "deploy/artifact_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "common/regular_file.h"
#include "common/sha256.h"
#include "common/unique_fd.h"

namespace kiln {
namespace fs = std::filesystem;

namespace {

// `what` says which artifact is copied where, for the error.
Status WriteAll(const ArtifactStore::WriteFn& write, int fd, const char* p, size_t n,
                const std::string& what) {
  while (n > 0) {
    ssize_t w = write ? write(fd, p, n) : ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, what);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status FsyncDir(const fs::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd || ::fsync(fd.get()) != 0) return ErrnoError(errno, "fsync " + dir.string());
  return Status::Ok();
}

}  // namespace

StatusOr<ArtifactStore> ArtifactStore::Open(const fs::path& root, uint64_t max_bytes) {
  std::error_code ec;
  fs::create_directories(root / "sha256", ec);
  if (!ec) fs::create_directories(root / "tmp", ec);
  if (ec) return ErrnoError(ec.value(), "create artifact store " + root.string());
  return ArtifactStore(root, max_bytes);
}

fs::path ArtifactStore::PathFor(const std::string& sha256) const {
  return root_ / "sha256" / sha256;
}

bool ArtifactStore::Has(const std::string& sha256) const {
  std::error_code ec;
  return fs::is_regular_file(PathFor(sha256), ec);
}

StatusOr<std::string> ArtifactStore::Put(const fs::path& source, const std::string& pin) {
  // Content addressing: bytes with this digest are already here (verified when they were put).
  if (!pin.empty() && Has(pin)) return pin;
  const std::string what = "cannot read artifact " + source.string();
  ASSIGN_OR_RETURN(RegularFile in, OpenRegularFile(source, max_bytes_, what));

  // A unique temporary in the store's own file system, so the final rename is atomic.
  static std::atomic<uint64_t> counter{0};
  fs::path tmp =
      root_ / "tmp" / (std::to_string(::getpid()) + "." + std::to_string(counter++) + ".partial");
  UniqueFd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!out) return ErrnoError(errno, "create " + tmp.string());
  auto discard = [&](Status s) {
    ::unlink(tmp.c_str());
    return s;
  };

  Sha256Hasher hasher;
  const std::string write_what =
      "cannot store artifact " + source.string() + ": write " + tmp.string();
  Status copied = ReadChunks(in, max_bytes_, what, [&](const char* data, size_t size) {
    hasher.Update(data, size);
    return WriteAll(write_, out.get(), data, size, write_what);
  });
  if (!copied.ok()) return discard(copied);
  std::string hex = hasher.HexDigest();

  if (!pin.empty() && pin != hex) {
    return discard(FailedPreconditionError("artifact " + source.string() + " has sha256 " + hex +
                                           ", expected " + pin));
  }
  if (::fchmod(out.get(), 0555) != 0) return discard(ErrnoError(errno, "chmod " + tmp.string()));
  if (::fsync(out.get()) != 0) return discard(ErrnoError(errno, "fsync " + tmp.string()));
  out.reset();
  // Same digest = same bytes: replacing an existing file by rename is harmless, and atomic.
  fs::path final_path = PathFor(hex);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    return discard(ErrnoError(errno, "rename into " + final_path.string()));
  }
  RETURN_IF_ERROR(FsyncDir(final_path.parent_path()));
  return hex;
}

Status ArtifactStore::Verify(const std::string& sha256) const {
  fs::path p = PathFor(sha256);
  std::error_code ec;
  if (!fs::exists(p, ec)) return NotFoundError("artifact " + p.string() + " is missing");
  ASSIGN_OR_RETURN(std::string actual, Sha256File(p, max_bytes_));
  if (actual != sha256) {
    return DataLossError("artifact " + p.string() + " no longer matches its digest: it hashes to " +
                         actual);
  }
  return Status::Ok();
}

StatusOr<int> ArtifactStore::Collect(const std::set<std::string>& keep) {
  int removed = 0;
  std::error_code ec;
  for (fs::directory_iterator it(root_ / "sha256", ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (keep.count(name)) continue;
    if (::unlink(it->path().c_str()) != 0)
      return ErrnoError(errno, "remove " + it->path().string());
    ++removed;
  }
  if (ec) return ErrnoError(ec.value(), "list " + (root_ / "sha256").string());
  return removed;
}

}  // namespace kiln
