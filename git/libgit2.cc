#include "git/libgit2.h"

#include <mutex>

namespace kiln::git {

void EnsureInitialised() {
  static std::once_flag once;
  std::call_once(once, [] { git_libgit2_init(); });
}

Status Error(std::string_view what, int code) {
  const git_error* e = git_error_last();
  std::string message =
      std::string(what) + ": " +
      (e != nullptr && e->message != nullptr ? e->message
                                             : "libgit2 error " + std::to_string(code));
  if (code == GIT_ENOTFOUND) return NotFoundError(std::move(message));
  return UnavailableError(std::move(message));
}

std::string Hex(const git_oid& id) {
  char buf[GIT_OID_HEXSZ + 1];
  git_oid_tostr(buf, sizeof buf, &id);
  return buf;
}

SourceCommit Describe(git_commit* c) {
  SourceCommit out;
  out.id = Hex(*git_commit_id(c));
  const git_signature* a = git_commit_author(c);
  out.author = std::string(a->name) + " <" + a->email + ">";
  out.time_ms = static_cast<int64_t>(a->when.time) * 1000;
  const char* summary = git_commit_summary(c);
  out.subject = summary != nullptr ? summary : "";
  return out;
}

}  // namespace kiln::git
