#pragma once

// RAII for libgit2's handles and its errors as Status values. Everything in git/ uses libgit2
// through this header; nothing outside git/ includes <git2.h>.

#include <git2.h>

#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "spec/manifest.h"

namespace kiln::git {

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const { Free(p); }
};
template <typename T, void (*Free)(T*)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

using Repository = Handle<git_repository, git_repository_free>;
using Commit = Handle<git_commit, git_commit_free>;
using Tree = Handle<git_tree, git_tree_free>;
using TreeEntry = Handle<git_tree_entry, git_tree_entry_free>;
using RevWalk = Handle<git_revwalk, git_revwalk_free>;
using Remote = Handle<git_remote, git_remote_free>;
using Reference = Handle<git_reference, git_reference_free>;
using Object = Handle<git_object, git_object_free>;

// libgit2 is initialised once per process (git_libgit2_init counts; it is never shut down, as
// threads of kilnd may use it until exit).
void EnsureInitialised();

// `what` failed with libgit2's `code`: its last error message, "what: message". NOT_FOUND for
// GIT_ENOTFOUND, UNAVAILABLE for anything else (the repository, the network, the disk).
Status Error(std::string_view what, int code);

// The hex form of an object id.
std::string Hex(const git_oid& id);

// A commit as revisions record it: id, author "Name <email>", time, subject.
SourceCommit Describe(git_commit* c);

}  // namespace kiln::git
