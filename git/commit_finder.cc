#include "git/commit_finder.h"

#include <set>

#include "common/logging.h"
#include "git/libgit2.h"

namespace kiln::git {
namespace fs = std::filesystem;

namespace {

// The blob of `path` in `tree`; false when the tree has no such file.
bool BlobAt(git_tree* tree, const std::string& path, git_oid* out) {
  git_tree_entry* raw = nullptr;
  if (git_tree_entry_bypath(&raw, tree, path.c_str()) != 0) return false;
  TreeEntry entry(raw);
  if (git_tree_entry_type(raw) != GIT_OBJECT_BLOB) return false;
  git_oid_cpy(out, git_tree_entry_id(raw));
  return true;
}

// Walks history from `head` (newest first) until each of `paths` has the commit that changed it
// last: one whose blob for the path differs from every parent's (a merge that took one side's
// file unchanged is not it). At most kMaxCommitsWalked commits.
StatusOr<std::map<std::string, SourceCommit>> WalkFor(git_repository* repo, const git_oid& head,
                                                      std::set<std::string> paths) {
  std::map<std::string, SourceCommit> found;
  git_revwalk* raw_walk = nullptr;
  if (int rc = git_revwalk_new(&raw_walk, repo); rc != 0) return Error("git revwalk", rc);
  RevWalk walk(raw_walk);
  git_revwalk_sorting(raw_walk, GIT_SORT_TOPOLOGICAL | GIT_SORT_TIME);
  if (int rc = git_revwalk_push(raw_walk, &head); rc != 0) return Error("git revwalk", rc);
  git_oid id;
  for (int walked = 0; !paths.empty() && walked < kMaxCommitsWalked; ++walked) {
    int rc = git_revwalk_next(&id, raw_walk);
    if (rc == GIT_ITEROVER) break;
    if (rc != 0) return Error("git revwalk", rc);
    git_commit* raw_commit = nullptr;
    if (rc = git_commit_lookup(&raw_commit, repo, &id); rc != 0) return Error("git commit", rc);
    Commit commit(raw_commit);
    git_tree* raw_tree = nullptr;
    if (rc = git_commit_tree(&raw_tree, raw_commit); rc != 0) return Error("git tree", rc);
    Tree tree(raw_tree);
    std::vector<Tree> parents;
    for (unsigned i = 0; i < git_commit_parentcount(raw_commit); ++i) {
      git_commit* raw_parent = nullptr;
      if (rc = git_commit_parent(&raw_parent, raw_commit, i); rc != 0)
        return Error("git parent", rc);
      Commit parent(raw_parent);
      git_tree* raw_parent_tree = nullptr;
      if (rc = git_commit_tree(&raw_parent_tree, raw_parent); rc != 0) return Error("git tree", rc);
      parents.emplace_back(raw_parent_tree);
    }
    for (auto it = paths.begin(); it != paths.end();) {
      git_oid blob;
      bool changed = BlobAt(raw_tree, *it, &blob);
      for (const Tree& p : parents) {
        git_oid before;
        if (changed && BlobAt(p.get(), *it, &before) && git_oid_equal(&before, &blob) != 0)
          changed = false;
      }
      if (changed) {
        found[*it] = Describe(raw_commit);
        it = paths.erase(it);
      } else {
        ++it;
      }
    }
  }
  return found;
}

}  // namespace

CommitFinder::CommitFinder() { EnsureInitialised(); }

StatusOr<std::map<std::string, SourceCommit>> CommitFinder::Find(
    const fs::path& dir, const std::vector<std::string>& files) {
  std::map<std::string, SourceCommit> out;
  git_repository* raw_repo = nullptr;
  int rc = git_repository_open_ext(&raw_repo, dir.c_str(), 0, nullptr);
  if (rc == GIT_ENOTFOUND) return out;  // not in a work tree: nothing to record
  if (rc != 0) return Error("git repository for " + dir.string(), rc);
  Repository repo(raw_repo);
  const char* workdir = git_repository_workdir(raw_repo);
  if (workdir == nullptr) return out;  // a bare repository has no files to load
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(workdir, ec);
  if (ec) return UnavailableError(std::string(workdir) + ": " + ec.message());

  git_oid head{};
  rc = git_reference_name_to_id(&head, raw_repo, "HEAD");
  const bool born = rc == 0;
  if (!born && rc != GIT_ENOTFOUND && rc != GIT_EUNBORNBRANCH) return Error("git HEAD", rc);
  const std::string head_hex = born ? Hex(head) : "";
  if (head_hex != head_) {
    cache_.clear();
    head_ = head_hex;
  }

  std::map<std::string, std::string> relative;  // file -> path in the work tree
  std::set<std::string> to_walk;
  for (const std::string& f : files) {
    const fs::path rel = fs::weakly_canonical(f, ec).lexically_relative(root);
    if (ec || rel.empty() || *rel.begin() == "..") continue;  // outside the work tree
    relative[f] = rel.generic_string();
    if (born && !cache_.count(rel.generic_string())) to_walk.insert(rel.generic_string());
  }
  if (!to_walk.empty()) {
    ASSIGN_OR_RETURN(auto walked, WalkFor(raw_repo, head, to_walk));
    // Not found within the walk: remembered as no commit, so it is not walked again for this
    // HEAD.
    for (const std::string& p : to_walk) cache_[p] = walked.count(p) ? walked[p] : SourceCommit{};
  }
  for (const auto& [file, rel] : relative) {
    SourceCommit c = born ? cache_[rel] : SourceCommit{};
    unsigned flags = 0;
    rc = git_status_file(&flags, raw_repo, rel.c_str());
    if (rc != 0) return Error("git status of " + rel, rc);
    c.dirty = flags != GIT_STATUS_CURRENT;  // modified, staged, untracked or ignored
    out[file] = std::move(c);
  }
  return out;
}

void CommitFinder::Annotate(ManifestSet& set) {
  std::vector<std::string> paths;
  for (const ManifestFile& f : set.files) paths.push_back(f.path);
  if (paths.empty()) return;
  auto found = Find(set.dir, paths);
  if (!found.ok()) {
    if (found.status().message() != last_error_) {
      LogWarn("cannot find the git commits of the manifests; revisions are recorded without them",
              {{"dir", set.dir}, {"error", found.status().message()}});
    }
    last_error_ = found.status().message();
    return;
  }
  last_error_.clear();
  for (ManifestFile& f : set.files) {
    auto it = found->find(f.path);
    if (it != found->end()) f.commit = it->second;
  }
}

}  // namespace kiln::git
