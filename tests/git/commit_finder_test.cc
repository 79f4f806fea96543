#include "git/commit_finder.h"

#include <catch2/catch.hpp>

#include "tests/git_util.h"
#include "tests/test_util.h"

namespace kiln::git {
namespace {

using ::kiln::testing::Git;
using ::kiln::testing::GitRevParse;
using ::kiln::testing::TempDir;
using ::kiln::testing::WriteFile;

TEST_CASE("a directory outside any git work tree has no commits", "[git]") {
  TempDir tmp;
  WriteFile(tmp / "web.yaml", "name: web\n");
  CommitFinder finder;
  auto found = finder.Find(tmp.path(), {(tmp / "web.yaml").string()});
  REQUIRE(found.ok());
  CHECK(found->empty());
}

TEST_CASE("each file maps to the commit that last changed it and its dirty flag", "[git]") {
  TempDir tmp;
  const auto repo = tmp / "repo";
  const auto dir = repo / "manifests";
  std::filesystem::create_directories(dir);
  REQUIRE(Git(repo, "init -q") == 0);
  WriteFile(dir / "web.yaml", "name: web\nversion: \"1\"\n");
  WriteFile(dir / "api.yaml", "name: api\n");
  REQUIRE(Git(repo, "add -A") == 0);
  REQUIRE(Git(repo, "commit -q -m 'first: web and api'") == 0);
  const std::string first = GitRevParse(repo, "HEAD");
  WriteFile(dir / "web.yaml", "name: web\nversion: \"2\"\n");
  REQUIRE(Git(repo, "commit -q -am 'web 2' -m 'body text'", "Bob Builder <bob@example.com>") == 0);
  const std::string second = GitRevParse(repo, "HEAD");
  WriteFile(repo / "README", "unrelated\n");
  REQUIRE(Git(repo, "add README") == 0);
  REQUIRE(Git(repo, "commit -q -m 'readme'") == 0);
  REQUIRE(!first.empty());
  REQUIRE(first != second);

  CommitFinder finder;
  const std::string web = (dir / "web.yaml").string();
  const std::string api = (dir / "api.yaml").string();
  auto found = finder.Find(dir, {web, api});
  REQUIRE(found.ok());
  CHECK((*found)[web].id == second);
  CHECK((*found)[web].subject == "web 2");
  CHECK((*found)[web].author == "Bob Builder <bob@example.com>");
  CHECK((*found)[web].time_ms > 0);
  CHECK_FALSE((*found)[web].dirty);
  CHECK((*found)[api].id == first);
  CHECK((*found)[api].subject == "first: web and api");
  CHECK((*found)[api].author == "Alice Example <alice@example.com>");

  SECTION("an edit not committed keeps the commit and is dirty") {
    WriteFile(dir / "web.yaml", "name: web\nversion: \"3\"\n");
    auto again = finder.Find(dir, {web});
    REQUIRE(again.ok());
    CHECK((*again)[web].id == second);
    CHECK((*again)[web].dirty);
  }
  SECTION("a new file no commit has is dirty with no commit") {
    WriteFile(dir / "db.yaml", "name: db\n");
    const std::string db = (dir / "db.yaml").string();
    auto again = finder.Find(dir, {db});
    REQUIRE(again.ok());
    CHECK((*again)[db].id.empty());
    CHECK((*again)[db].dirty);
  }
  SECTION("a new commit is seen by the next load") {
    WriteFile(dir / "api.yaml", "name: api\nreplicas: 2\n");
    REQUIRE(Git(repo, "commit -q -am 'api 2'") == 0);
    auto again = finder.Find(dir, {api});
    REQUIRE(again.ok());
    CHECK((*again)[api].id == GitRevParse(repo, "HEAD"));
    CHECK((*again)[api].subject == "api 2");
  }
}

TEST_CASE("a set loaded from a git work tree carries each file's commit", "[git]") {
  TempDir tmp;
  REQUIRE(Git(tmp.path(), "init -q") == 0);
  WriteFile(tmp / "web.yaml", "x\n");
  REQUIRE(Git(tmp.path(), "add -A") == 0);
  REQUIRE(Git(tmp.path(), "commit -q -m one") == 0);
  ManifestSet set;
  set.dir = tmp.path().string();
  set.files.push_back(ManifestFile{.path = (tmp / "web.yaml").string()});
  CommitFinder finder;
  finder.Annotate(set);
  REQUIRE(set.files[0].commit.has_value());
  CHECK(set.files[0].commit->subject == "one");
}

TEST_CASE("a repository with its objects gone leaves the files without commits", "[git]") {
  TempDir tmp;
  REQUIRE(Git(tmp.path(), "init -q") == 0);
  WriteFile(tmp / "web.yaml", "x\n");
  REQUIRE(Git(tmp.path(), "add -A") == 0);
  REQUIRE(Git(tmp.path(), "commit -q -m one") == 0);
  std::filesystem::remove_all(tmp / ".git" / "objects");
  std::filesystem::create_directories(tmp / ".git" / "objects");
  ManifestSet set;
  set.dir = tmp.path().string();
  set.files.push_back(ManifestFile{.path = (tmp / "web.yaml").string()});
  CommitFinder finder;
  CHECK_FALSE(finder.Find(tmp.path(), {set.files[0].path}).ok());
  finder.Annotate(set);  // logged, not thrown, and the load goes on
  CHECK_FALSE(set.files[0].commit.has_value());
}

}  // namespace
}  // namespace kiln::git
