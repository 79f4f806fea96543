#pragma once

// The content-addressed artifact store (DESIGN.md "Artifacts"): STATE/artifacts/sha256/<hex>,
// read-only files that instances always run from, so a revision runs the same bits forever.

#include <filesystem>
#include <set>
#include <string>

#include "common/status.h"

namespace kiln {

class ArtifactStore {
 public:
  // `root` is STATE/artifacts; created when missing.
  static StatusOr<ArtifactStore> Open(const std::filesystem::path& root);

  // Copies `source` into the store, hashing while copying, and returns its digest. With `pin`,
  // a different digest is refused (naming both digests and the path) and nothing is stored.
  // A crash never leaves a partial file under a digest (write to a temporary, fsync, rename), and
  // concurrent puts of the same content are safe. With a pin that is already stored, nothing is
  // read or copied.
  StatusOr<std::string> Put(const std::filesystem::path& source, const std::string& pin = "");

  // Where the artifact with this digest is (whether or not it exists).
  std::filesystem::path PathFor(const std::string& sha256) const;
  bool Has(const std::string& sha256) const;

  // Re-hashes the stored file: DATA_LOSS when its bytes no longer match its digest (tampering,
  // disk corruption), NOT_FOUND when it is missing.
  Status Verify(const std::string& sha256) const;

  // Removes every stored artifact whose digest is not in `keep`; returns how many.
  StatusOr<int> Collect(const std::set<std::string>& keep);

  const std::filesystem::path& root() const { return root_; }

 private:
  explicit ArtifactStore(std::filesystem::path root) : root_(std::move(root)) {}
  std::filesystem::path root_;
};

}  // namespace kiln
