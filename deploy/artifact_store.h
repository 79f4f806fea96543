#pragma once

// The content-addressed artifact store (DESIGN.md "Artifacts"): STATE/artifacts/sha256/<hex>,
// read-only files that instances always run from, so a revision runs the same bits forever.

#include <sys/types.h>

#include <filesystem>
#include <functional>
#include <set>
#include <string>

#include "common/limits.h"
#include "common/status.h"

namespace kiln {

class ArtifactStore {
 public:
  // `root` is STATE/artifacts; created when missing. Artifacts larger than `max_bytes` are
  // refused (docs/manifests.md "Limits").
  static StatusOr<ArtifactStore> Open(const std::filesystem::path& root,
                                      uint64_t max_bytes = kMaxArtifactBytes);

  // Copies `source` into the store, hashing while copying, and returns its digest. With `pin`,
  // a different digest is refused (naming both digests and the path) and nothing is stored.
  // A crash never leaves a partial file under a digest (write to a temporary, fsync, rename), and
  // concurrent puts of the same content are safe. With a pin that is already stored, nothing is
  // read or copied. Only a regular file of at most max_bytes is read: a FIFO, a device or a
  // file that grows past the limit while it is copied is refused, and nothing is stored.
  StatusOr<std::string> Put(const std::filesystem::path& source, const std::string& pin = "");

  // Where the artifact with this digest is (whether or not it exists).
  std::filesystem::path PathFor(const std::string& sha256) const;
  bool Has(const std::string& sha256) const;

  // Re-hashes the stored file: DATA_LOSS when its bytes no longer match its digest (tampering,
  // disk corruption), NOT_FOUND when it is missing. Something other than a regular file of at
  // most max_bytes in its place is refused unread (FAILED_PRECONDITION).
  Status Verify(const std::string& sha256) const;

  // Removes every stored artifact whose digest is not in `keep`; returns how many.
  StatusOr<int> Collect(const std::set<std::string>& keep);

  const std::filesystem::path& root() const { return root_; }

  // How Put writes the bytes it copies, with write(2)'s contract (a short count, or -1 and
  // errno). Tests inject a full disk partway through a put; empty = ::write.
  using WriteFn = std::function<ssize_t(int fd, const void* data, size_t size)>;
  void SetWriterForTest(WriteFn write) { write_ = std::move(write); }

 private:
  ArtifactStore(std::filesystem::path root, uint64_t max_bytes)
      : root_(std::move(root)), max_bytes_(max_bytes) {}
  std::filesystem::path root_;
  uint64_t max_bytes_;
  WriteFn write_;
};

}  // namespace kiln
