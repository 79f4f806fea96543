// Manifests in git: revisions record the commit that last changed their manifest file, and
// `--manifests git+URL#BRANCH` deploys what is pushed to a branch.

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/git_util.h"
#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/integration/process.h"

namespace kiln::testing {
namespace {

constexpr const char* kUpdate = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

RunResult Kilnctl(KilndHarness& h, std::vector<std::string> args) {
  std::vector<std::string> argv = {BinPath("kilnctl"), "--addr", h.UnixAddr()};
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv);
}

StatusOr<RevisionRecord> Revision(KilndHarness& h, const std::string& service, int64_t number) {
  auto store = h.Store();
  if (!store) return UnavailableError("no store yet");
  return store->GetRevision(service, number);
}

TEST_CASE("revisions of a directory in a git work tree record the commit and dirty files",
          "[git][integration]") {
  KilndHarness h;
  REQUIRE(Git(h.manifests(), "init -q") == 0);
  h.Declare("web", "1.0", 1, kUpdate);
  REQUIRE(Git(h.manifests(), "add -A") == 0);
  REQUIRE(Git(h.manifests(), "commit -q -m 'web 1.0 for the launch'") == 0);
  const std::string first = GitRevParse(h.manifests(), "HEAD");
  REQUIRE(first.size() == 40);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 1; }));

  auto r1 = Revision(h, "web", 1);
  REQUIRE(r1.ok());
  CHECK(r1->commit.id == first);
  CHECK(r1->commit.subject == "web 1.0 for the launch");
  CHECK(r1->commit.author == "Alice Example <alice@example.com>");
  CHECK(r1->commit.time_ms > 0);
  CHECK_FALSE(r1->commit.dirty);

  // An edit not committed yet: a new revision, recorded as dirty on top of the same commit.
  h.Declare("web", "2.0", 1, kUpdate);
  REQUIRE(WaitFor([&] { return Revision(h, "web", 2).ok(); }));
  auto r2 = Revision(h, "web", 2);
  CHECK(r2->commit.id == first);
  CHECK(r2->commit.dirty);

  // Committed before the file changes: the next revision names the new commit, clean.
  REQUIRE(CommitFile(h.manifests(), "web.yaml", h.Manifest("web", "3.0", 1, kUpdate), "web 3.0",
                     "Bob Builder <bob@example.com>") == 0);
  const std::string third = GitRevParse(h.manifests(), "HEAD");
  REQUIRE(WaitFor([&] {
    auto r = Revision(h, "web", 3);
    return r.ok() && r->commit.id == third;
  }));
  auto r3 = Revision(h, "web", 3);
  CHECK(r3->commit.author == "Bob Builder <bob@example.com>");
  CHECK_FALSE(r3->commit.dirty);

  RunResult history = Kilnctl(h, {"history", "web"});
  INFO(history.out << history.err);
  REQUIRE(history.exit_code == 0);
  CHECK(history.out.find("COMMIT") != std::string::npos);
  CHECK(history.out.find(third.substr(0, 12) + " ") != std::string::npos);
  CHECK(history.out.find(first.substr(0, 12) + "+dirty") != std::string::npos);
  CHECK(history.out.find("\"web 1.0 for the launch\" (Alice Example <alice@example.com>") !=
        std::string::npos);

  RunResult json = Kilnctl(h, {"-o", "json", "history", "web"});
  REQUIRE(json.exit_code == 0);
  auto doc = nlohmann::json::parse(json.out);
  CHECK(doc["revisions"][0]["commit"]["id"] == third);
  CHECK(doc["revisions"][0]["commit"]["subject"] == "web 3.0");
  CHECK(doc["revisions"][1]["manifest_dirty"] == true);

  // The JSON API the dashboard reads.
  HttpReply reply = HttpRequest(h.HttpPort(), "/api/v1/services/web/history");
  REQUIRE(reply.status == 200);
  auto api = nlohmann::json::parse(reply.body);
  REQUIRE(api["revisions"].size() == 3);
  CHECK(api["revisions"][2]["commit"]["id"] == first);
  CHECK(api["revisions"][1]["manifest_dirty"] == true);
  CHECK(api["revisions"][0]["commit"]["author"] == "Bob Builder <bob@example.com>");
}

TEST_CASE("a directory outside git records revisions without a commit", "[git][integration]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kUpdate);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return Revision(h, "web", 1).ok(); }));
  auto r = Revision(h, "web", 1);
  CHECK(r->commit.id.empty());
  CHECK_FALSE(r->commit.dirty);
  RunResult history = Kilnctl(h, {"history", "web"});
  CHECK(history.exit_code == 0);
  CHECK(history.out.find("dirty") == std::string::npos);
}

// A deploy repository as teams keep one: a bare repository (what kilnd fetches) and a clone
// where changes are committed and pushed to its main branch.
class DeployRepo {
 public:
  explicit DeployRepo(const std::filesystem::path& dir)
      : bare_(dir / "deploy.git"), clone_(dir / "clone") {
    std::filesystem::create_directories(bare_);
    std::filesystem::create_directories(clone_);
    ok_ = Git(bare_, "init -q --bare") == 0 && Git(clone_, "init -q") == 0 &&
          Git(clone_, "remote add origin '" + bare_.string() + "'") == 0;
  }
  bool ok() const { return ok_; }
  // Commits `content` as `file` and pushes it to main; returns the commit's id ("" on failure).
  std::string Push(const std::string& file, const std::string& content, const std::string& message,
                   const std::string& author = "Alice Example <alice@example.com>") {
    WriteFile(clone_ / file, content);
    if (Git(clone_, "add -A") != 0 || Git(clone_, "commit -q -m '" + message + "'", author) != 0 ||
        Git(clone_, "push -q origin HEAD:main") != 0) {
      return "";
    }
    return GitRevParse(clone_, "HEAD");
  }
  std::string Url() const { return "git+file://" + bare_.string() + "#main"; }
  const std::filesystem::path& bare() const { return bare_; }

 private:
  std::filesystem::path bare_, clone_;
  bool ok_ = false;
};

nlohmann::json ServiceJson(KilndHarness& h, const std::string& name) {
  HttpReply r = HttpRequest(h.HttpPort(), "/api/v1/services/" + name);
  if (r.status != 200) return {};
  return nlohmann::json::parse(r.body, nullptr, false);
}

TEST_CASE("pushes to the branch roll out and a broken push changes nothing and a rollback pins",
          "[git][integration]") {
  KilndHarness h;
  DeployRepo repo(h.tmp().path());
  REQUIRE(repo.ok());
  const std::string c1 = repo.Push("web.yaml", h.Manifest("web", "1.0", 2, kUpdate), "web 1.0");
  REQUIRE(!c1.empty());
  h.SetManifestsArg(repo.Url());
  h.Start({"--git-poll", "300ms"});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 2; }));
  CHECK(Revision(h, "web", 1)->commit.id == c1);
  CHECK_FALSE(Revision(h, "web", 1)->commit.dirty);
  // kilnd's own work tree under the state directory holds the commit.
  CHECK(std::filesystem::exists(h.state() / "git"));

  SECTION("a push of a new version rolls out; a broken push is reported with the commit") {
    const std::string c2 = repo.Push("web.yaml", h.Manifest("web", "2.0", 2, kUpdate), "web 2.0",
                                     "Bob Builder <bob@example.com>");
    REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }));
    auto r2 = Revision(h, "web", 2);
    CHECK(r2->commit.id == c2);
    CHECK(r2->commit.subject == "web 2.0");
    CHECK(r2->commit.author == "Bob Builder <bob@example.com>");
    REQUIRE(WaitFor([&] {
      auto j = ServiceJson(h, "web");
      return j.contains("git") && j["git"].contains("deployed") && j["git"]["deployed"]["id"] == c2;
    }));

    RunResult status = Kilnctl(h, {"status"});
    INFO(status.out << status.err);
    CHECK(status.out.find("Git:        file://" + repo.bare().string() + "#main") !=
          std::string::npos);
    CHECK(status.out.find("Deployed:   " + c2.substr(0, 12) + " \"web 2.0\"") != std::string::npos);
    CHECK(status.out.find("Seen:       " + c2.substr(0, 12)) != std::string::npos);

    // Broken: replicas is not a number. Reported with file:line:col and the commit; nothing moves.
    std::string broken = h.Manifest("web", "9.9", 2, kUpdate);
    broken.replace(broken.find("replicas: 2"), 11, "replicas: lots");
    const std::string c3 = repo.Push("web.yaml", broken, "oops");
    REQUIRE(!c3.empty());
    // Seen at once; the service's error once the pass that follows the load has recorded it.
    REQUIRE(WaitFor([&] {
      auto j = ServiceJson(h, "web");
      return j.contains("git") && j["git"].contains("seen") && j["git"]["seen"]["id"] == c3 &&
             j["service"]["summary"]["manifest_error"].get<std::string>().find(c3.substr(0, 12)) !=
                 std::string::npos;
    }));
    auto j = ServiceJson(h, "web");
    const std::string error = j["git"]["manifest_error"];
    CHECK(error.find("web.yaml:3:11: replicas: expected an integer") != std::string::npos);
    CHECK(error.find("at commit " + c3.substr(0, 12) + " \"oops\"") != std::string::npos);
    CHECK(j["git"]["deployed"]["id"] == c2);
    const std::string service_error = j["service"]["summary"]["manifest_error"];
    CHECK(service_error.find("web.yaml:3:11") != std::string::npos);
    CHECK(service_error.find("at commit " + c3.substr(0, 12)) != std::string::npos);
    CHECK_FALSE(Revision(h, "web", 3).ok());
    CHECK(h.Healthy("web", 2) == 2);
    RunResult sync = Kilnctl(h, {"sync"});
    CHECK(sync.exit_code == 1);
    CHECK(sync.err.find("manifest errors") != std::string::npos);
    CHECK(sync.err.find("at commit " + c3.substr(0, 12)) != std::string::npos);
    CHECK(sync.out.find("Seen:       " + c3.substr(0, 12)) != std::string::npos);
    CHECK(sync.out.find("Deployed:   " + c2.substr(0, 12)) != std::string::npos);
    CHECK(h.Live("web").size() == 2);
  }

  SECTION("a rollback pins until a push changes the template") {
    const std::string c2 = repo.Push("web.yaml", h.Manifest("web", "2.0", 2, kUpdate), "web 2.0");
    REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }));
    RunResult rb = Kilnctl(h, {"rollback", "web", "--reason", "bad deploy"});
    INFO(rb.out << rb.err);
    REQUIRE(rb.exit_code == 0);
    REQUIRE(WaitFor([&] { return h.Healthy("web", 3) == 2 && h.Live("web").size() == 2; }));
    const std::string pin =
        "pinned to revision 3 (revision 1's template) by local: bad deploy; "
        "the branch still declares revision 2's template (commit " +
        c2.substr(0, 12) + ")";
    RunResult status = Kilnctl(h, {"status", "web"});
    INFO(status.out);
    CHECK(status.out.find("Pinned:     " + pin) != std::string::npos);
    CHECK(ServiceJson(h, "web")["service"]["pin_status"] == pin);

    // A push that leaves the template as it is (replicas only) keeps the pin.
    repo.Push("web.yaml", h.Manifest("web", "2.0", 3, kUpdate), "web: 3 replicas");
    REQUIRE(WaitFor([&] { return h.Healthy("web", 3) == 3; }));
    CHECK(h.Service("web")->pinned_revision == 3);

    // The fix: a new template lifts the pin and rolls out.
    const std::string fix =
        repo.Push("web.yaml", h.Manifest("web", "2.1", 3, kUpdate), "web 2.1: the fix");
    REQUIRE(WaitFor([&] { return h.Healthy("web", 4) == 3 && h.Live("web").size() == 3; }));
    CHECK(h.Service("web")->pinned_revision == 0);
    CHECK(Revision(h, "web", 4)->commit.id == fix);
    CHECK(h.HasEvent("web", EventKind::kPinLifted));
    CHECK(ServiceJson(h, "web")["service"]["pin_status"] == "");
  }
}

TEST_CASE(
    "kilnctl sync and POST /api/v1/sync fetch at once and a failed fetch keeps the last good state",
    "[git][integration]") {
  KilndHarness h;
  DeployRepo repo(h.tmp().path());
  REQUIRE(repo.ok());
  const std::string c1 = repo.Push("web.yaml", h.Manifest("web", "1.0", 1, kUpdate), "web 1.0");
  h.SetManifestsArg(repo.Url());
  h.Start({"--git-poll", "1h"});  // only the first fetch, and syncs
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 1; }));

  const std::string c2 = repo.Push("web.yaml", h.Manifest("web", "2.0", 1, kUpdate), "web 2.0");
  RunResult sync = Kilnctl(h, {"sync"});
  INFO(sync.out << sync.err);
  CHECK(sync.exit_code == 0);
  CHECK(sync.out.find("Deployed:   " + c2.substr(0, 12)) != std::string::npos);
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 1 && h.Live("web").size() == 1; }));

  // Over HTTP: 202 with the fetch's number, GET is refused.
  const std::string c3 = repo.Push("web.yaml", h.Manifest("web", "3.0", 1, kUpdate), "web 3.0");
  HttpReply get = HttpRequest(h.HttpPort(), "/api/v1/sync");
  CHECK(get.status == 405);
  HttpReply post = HttpRequest(h.HttpPort(), "/api/v1/sync", boost::beast::http::verb::post);
  REQUIRE(post.status == 202);
  CHECK(nlohmann::json::parse(post.body)["fetch"].get<int64_t>() >= 2);
  REQUIRE(WaitFor([&] { return Revision(h, "web", 3).ok(); }, std::chrono::seconds(20)));
  CHECK(Revision(h, "web", 3)->commit.id == c3);
  REQUIRE(WaitFor([&] { return h.Healthy("web", 3) == 1 && h.Live("web").size() == 1; }));

  // The repository goes away: reported (sync, status, metric), and web keeps running.
  std::filesystem::rename(repo.bare(), h.tmp() / "moved.git");
  RunResult failed = Kilnctl(h, {"sync"});
  CHECK(failed.exit_code == 1);
  CHECK(failed.err.find("cannot fetch main from file://" + repo.bare().string()) !=
        std::string::npos);
  RunResult status = Kilnctl(h, {"status"});
  CHECK(status.out.find("Fetch error: cannot fetch main") != std::string::npos);
  CHECK(status.out.find("Deployed:   " + c3.substr(0, 12)) != std::string::npos);
  HttpReply metrics = HttpRequest(h.HttpPort(), "/metrics");
  CHECK(metrics.body.find("kiln_git_fetch_failing 1") != std::string::npos);
  CHECK(metrics.body.find("kiln_git_fetches_total{result=\"error\"}") != std::string::npos);
  CHECK(h.Healthy("web", 3) == 1);
  CHECK(status.exit_code == 0);  // kilnd runs on and answers

  // Back: the next sync works again.
  std::filesystem::rename(h.tmp() / "moved.git", repo.bare());
  RunResult again = Kilnctl(h, {"sync"});
  CHECK(again.exit_code == 0);
  CHECK(HttpRequest(h.HttpPort(), "/metrics").body.find("kiln_git_fetch_failing 0") !=
        std::string::npos);
  (void)c1;
}

TEST_CASE("kilnd refuses a git source it cannot use and kilnctl sync on a directory",
          "[git][integration]") {
  TempDir tmp;
  RunResult bad = Run({BinPath("kilnd"), "--manifests", "git+ftp://example.com/x.git", "--state",
                       (tmp / "s").string()});
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("git+ takes a file://, https://, http:// or ssh:// URL") != std::string::npos);
  RunResult branch = Run({BinPath("kilnd"), "--manifests", "git+file:///srv/x.git#bad..name",
                          "--state", (tmp / "s").string()});
  CHECK(branch.exit_code == 2);
  CHECK(branch.err.find("not a valid branch name") != std::string::npos);

  KilndHarness h;
  h.Declare("web", "1.0", 1, kUpdate);
  h.Start();
  REQUIRE(h.WaitReady());
  RunResult sync = Kilnctl(h, {"sync"});
  CHECK(sync.exit_code == 1);
  CHECK(sync.err.find("not a git source") != std::string::npos);
}

}  // namespace
}  // namespace kiln::testing
