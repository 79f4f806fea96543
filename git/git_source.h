#pragma once

// `kilnd --manifests git+URL#BRANCH`: the manifests are what a branch of a git repository
// declares. kilnd fetches the branch (libgit2: file://, https://, ssh://) into a repository it
// owns under the state directory, checks the branch's commit out into that repository's work
// tree, and loads the manifests from there. Fetching and checking out run on the manifest
// loader's thread, never on the reconciler's; a failed fetch keeps the last checkout.

#include <cstdint>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "common/clock.h"
#include "common/status.h"
#include "spec/manifest.h"

namespace kiln::git {

// What --manifests git+URL#BRANCH names.
struct SourceSpec {
  std::string url;              // without "git+": file:///srv/deploy.git, https://..., ssh://...
  std::string branch = "main";  // "#BRANCH"; main when absent
};

// Whether --manifests names a git source ("git+..."), not a directory.
bool IsGitSource(std::string_view manifests);
// INVALID_ARGUMENT (naming what is wrong) for a scheme other than file, http, https or ssh, an
// empty URL, or a branch name git refuses.
StatusOr<SourceSpec> ParseSource(std::string_view manifests);

// What status shows of a git source. `seen` and `deployed` have no dirty flag.
struct SourceStatus {
  std::string url;
  std::string branch;
  std::optional<SourceCommit> seen;      // the branch's commit at the last fetch that worked
  std::optional<SourceCommit> deployed;  // the last commit whose manifests all loaded
  std::string manifest_error;            // the seen commit's first manifest error, or ""
  std::string fetch_error;               // the last fetch's (or checkout's) error, or ""
  int64_t last_fetch_ms = 0;
  int64_t last_success_ms = 0;
  int64_t fetches_done = 0;  // fetches whose load was applied since kilnd started
  int64_t poll_interval_ms = 0;
};

// "1a2b3c4d5e6f \"subject\"": how logs and errors name a commit.
std::string CommitLabel(const SourceCommit& c);

class Source {
 public:
  // `dir`: this source's own directory under the state directory (STATE/git/<key>); its work
  // tree is dir/work. `clock` stamps fetch times.
  Source(SourceSpec spec, const std::filesystem::path& dir, Duration poll, const Clock& clock);

  // STATE/git/<key> for `spec`: one directory per URL and branch, so another --manifests never
  // reuses a checkout of something else.
  static std::filesystem::path DirFor(const std::filesystem::path& state, const SourceSpec& spec);

  // The loader's thread only. Fetches the branch and checks its commit out into work_dir()
  // (only when it moved or the work tree was changed). Returns the commit checked out: the last
  // one when the fetch fails (the error is in Status() and logged), nullopt when there has never
  // been a checkout.
  std::optional<SourceCommit> Update();
  // The loader's thread only, after loading what Update checked out: the manifest errors of that
  // commit ("" when it loaded). A commit that loaded becomes the deployed one.
  void RecordLoad(const std::optional<SourceCommit>& commit, const std::string& first_error);
  // The event thread, once that load has been applied: the fetch counts as done.
  void RecordApplied();

  // Any thread. A fetch is wanted (kilnctl sync, POST /api/v1/sync); returns its number, done
  // once Status().fetches_done reaches it.
  int64_t RequestFetch();
  SourceStatus Status() const;

  const std::filesystem::path& work_dir() const { return work_; }
  const SourceSpec& spec() const { return spec_; }

 private:
  StatusOr<SourceCommit> FetchAndCheckOut();

  const SourceSpec spec_;
  const std::filesystem::path work_;
  const Clock& clock_;
  std::optional<SourceCommit> checked_out_;  // the loader's thread only

  mutable std::mutex mu_;  // guards everything below
  SourceStatus status_;
  int64_t requested_ = 0;       // the last fetch number handed out
  std::deque<int64_t> loaded_;  // the request number each load covered, until applied
  int64_t taken_ = 0;           // the request number the current fetch covers
};

}  // namespace kiln::git
