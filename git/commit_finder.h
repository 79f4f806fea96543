#pragma once

// Which git commit last changed each manifest file, when the manifest directory is inside a git
// work tree: what `git log -1 -- FILE` answers, found with libgit2 (no `git` program needed), and
// whether the file has uncommitted changes.

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "spec/manifest.h"

namespace kiln::git {

// Finding a file's last commit walks history from HEAD; it stops after this many commits (a file
// last changed further back is reported without a commit), so that a load over a long history
// takes bounded time.
inline constexpr int kMaxCommitsWalked = 2000;

// Used by one thread at a time (the manifest loader's). Remembers what it found for the current
// HEAD, so a reload walks history again only after a new commit.
class CommitFinder {
 public:
  CommitFinder();

  // The commit of each of `files` (absolute paths in `dir`), by path. Empty, and OK, when `dir`
  // is not inside a git work tree. A file no commit has (new, untracked) maps to a SourceCommit
  // with no id, dirty. A file last changed beyond kMaxCommitsWalked maps to its dirty flag only.
  StatusOr<std::map<std::string, SourceCommit>> Find(const std::filesystem::path& dir,
                                                     const std::vector<std::string>& files);

  // Fills ManifestFile::commit for the files of `set`. Never fails a load: a git error is logged
  // (with the directory) and the files keep no commit.
  void Annotate(ManifestSet& set);

 private:
  std::string head_;                           // the HEAD commit the cache is about
  std::map<std::string, SourceCommit> cache_;  // by path relative to the work tree, dirty unset
  std::string last_error_;                     // logged once until it changes
};

}  // namespace kiln::git
