#pragma once

// Git repositories made by tests with the `git` program (kilnd itself uses libgit2 only):
// a work tree to commit in, and a bare repository to push to, as a deploy repository is.

#include <cstdlib>
#include <filesystem>
#include <string>

#include "tests/test_util.h"

namespace kiln::testing {

// Runs `git ARGS` in `dir` with a fixed identity; the output is dropped. Returns the exit code.
inline int Git(const std::filesystem::path& dir, const std::string& args,
               const std::string& author = "Alice Example <alice@example.com>") {
  const std::string name = author.substr(0, author.find(" <"));
  const std::string email =
      author.substr(author.find('<') + 1, author.find('>') - author.find('<') - 1);
  const std::string cmd =
      "cd '" + dir.string() + "' && GIT_AUTHOR_NAME='" + name + "' GIT_AUTHOR_EMAIL='" + email +
      "' GIT_COMMITTER_NAME='" + name + "' GIT_COMMITTER_EMAIL='" + email +
      "' GIT_CONFIG_NOSYSTEM=1 HOME=/nonexistent git -c init.defaultBranch=main "
      "-c commit.gpgsign=false " +
      args + " >/dev/null 2>/dev/null";
  return std::system(cmd.c_str());
}

// The full id of `rev` in the repository at `dir` ("" when git fails).
inline std::string GitRevParse(const std::filesystem::path& dir, const std::string& rev) {
  const std::filesystem::path out = dir.parent_path() / (".rev-" + dir.filename().string());
  const std::string cmd = "cd '" + dir.string() + "' && git rev-parse '" + rev + "' > '" +
                          out.string() + "' 2>/dev/null";
  if (std::system(cmd.c_str()) != 0) return "";
  std::string id = ReadFile(out);
  std::filesystem::remove(out);
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  return id;
}

// Commits `content` as `file` (relative to the work tree `repo`) and only then writes it to the
// work tree, so that whoever watches the directory never sees it uncommitted.
inline int CommitFile(const std::filesystem::path& repo, const std::string& file,
                      const std::string& content, const std::string& message,
                      const std::string& author = "Alice Example <alice@example.com>") {
  const std::filesystem::path staged = repo.parent_path() / (".staged-" + repo.filename().string());
  WriteFile(staged, content);
  int rc = Git(repo,
               "update-index --add --cacheinfo 100644,$(git hash-object -w '" + staged.string() +
                   "')," + file,
               author);
  if (rc == 0) rc = Git(repo, "commit -q -m '" + message + "'", author);
  if (rc == 0) rc = Git(repo, "checkout -- " + file, author);
  std::filesystem::remove(staged);
  return rc;
}

}  // namespace kiln::testing
