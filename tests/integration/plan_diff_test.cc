// `kilnctl diff` and `kilnctl plan -f` against a real kilnd, through the kilnctl binary: the
// field-level diff of two revisions, what a manifest change would do with its exit code (0 no
// change, 1 error, 2 changes), and that a plan changes nothing: not the store, not the manifest
// directory, not the artifact store, not what runs.

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/sha256.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

// A kiln-testsvc service as a manifest, with `env` (YAML flow map) and an artifact path.
std::string Manifest(const std::string& name, const std::string& version, int replicas,
                     const std::string& env,
                     const std::string& artifact = BinPath("kiln-testsvc")) {
  return "name: " + name + "\nversion: \"" + version + "\"\nreplicas: " + std::to_string(replicas) +
         "\nartifact: {path: " + artifact + "}\ncommand: [\"{artifact}\"]\nenv: " + env +
         "\nhealth: {http: {path: /healthz}, interval: 100ms, timeout: 500ms}\nupdate: " + kPolicy +
         "\n";
}

RunResult Kilnctl(const KilndHarness& h, std::vector<std::string> args) {
  args.insert(args.begin(), {BinPath("kilnctl"), "--addr", h.UnixAddr()});
  return Run(args, 60s);
}

// Whether `line` is one of the lines of `text`.
bool HasLine(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

TEST_CASE("kilnctl diff shows the fields two revisions differ in", "[plan_diff]") {
  KilndHarness h;
  WriteFile(h.manifests() / "web.yaml", Manifest("web", "1.0", 1, "{LOG_LEVEL: info, REGION: eu}"));
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 1; }));

  // One revision only: nothing to compare with, said plainly.
  RunResult first = Kilnctl(h, {"diff", "web"});
  CHECK(first.exit_code == 1);
  CHECK(first.err ==
        "kilnctl: FAILED_PRECONDITION: revision 1 is the oldest of \"web\" kept; name two "
        "revisions to compare\n");

  WriteFile(h.manifests() / "web.yaml",
            Manifest("web", "1.1", 1, "{LOG_LEVEL: debug, REGION: eu, TRACE: \"on\"}"));
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 1; }, 60s));

  RunResult d = Kilnctl(h, {"diff", "web"});
  INFO(d.out << d.err);
  CHECK(d.exit_code == 0);
  CHECK(d.out ==
        "web: revision 1 (1.0) \u2192 revision 2 (1.1)\n"
        "FIELD          REVISION 1  REVISION 2\n"
        "version        1.0         1.1\n"
        "env.LOG_LEVEL  info        debug\n"
        "env.TRACE      (unset)     on\n");

  // The other way round, by number.
  RunResult back = Kilnctl(h, {"diff", "web", "2", "1"});
  CHECK(back.exit_code == 0);
  CHECK(HasLine(back.out, "env.LOG_LEVEL  debug       info"));
  CHECK(HasLine(back.out, "env.TRACE      on          (unset)"));

  RunResult same = Kilnctl(h, {"diff", "web", "2", "2"});
  CHECK(same.exit_code == 0);
  CHECK(same.out.find("the templates are equal") != std::string::npos);

  RunResult js = Kilnctl(h, {"-o", "json", "diff", "web", "1"});
  REQUIRE(js.exit_code == 0);
  auto j = nlohmann::json::parse(js.out);
  CHECK(j["from"]["number"] == "1");
  CHECK(j["to"]["number"] == "2");
  REQUIRE(j["changes"].size() == 3);
  CHECK(j["changes"][2] ==
        nlohmann::json{{"path", "env.TRACE"}, {"new_value", "on"}, {"added", true}});

  RunResult yaml = Kilnctl(h, {"-o", "yaml", "diff", "web"});
  CHECK(yaml.exit_code == 0);
  CHECK(yaml.out.find("path: env.LOG_LEVEL") != std::string::npos);

  RunResult unknown = Kilnctl(h, {"diff", "nope"});
  CHECK(unknown.exit_code == 1);
  CHECK(unknown.err == "kilnctl: NOT_FOUND: service \"nope\" is not known\n");
  RunResult no_rev = Kilnctl(h, {"diff", "web", "9"});
  CHECK(no_rev.exit_code == 1);
  CHECK(no_rev.err ==
        "kilnctl: NOT_FOUND: service \"web\" has no revision 9 (revisions kept: 2, 1)\n");
}

// What the store and the disk hold that a plan must not change.
struct Snapshot {
  std::vector<std::string> revisions;
  std::vector<std::string> services;
  std::vector<std::string> instances;
  int64_t last_event = 0;
  std::vector<std::string> artifacts;
  std::vector<std::string> manifests;
};

Snapshot Take(KilndHarness& h) {
  Snapshot s;
  auto store = h.Store();
  REQUIRE(store);
  for (const ServiceRecord& svc : store->ListServices().value()) {
    s.services.push_back(svc.name + " desired=" + std::to_string(svc.desired_revision) +
                         " retire_at=" + std::to_string(svc.retire_at_ms) + " spec=" + svc.spec);
    for (const RevisionRecord& r : store->ListRevisions(svc.name).value()) {
      s.revisions.push_back(svc.name + "/" + std::to_string(r.number));
    }
    for (const InstanceRecord& i : store->ListInstances(svc.name, true).value()) {
      s.instances.push_back(i.name + "@" + std::to_string(i.revision));
    }
  }
  s.last_event = store->LatestEventSeq().value();
  for (const auto& e : std::filesystem::recursive_directory_iterator(h.state() / "artifacts")) {
    s.artifacts.push_back(e.path().string());
  }
  for (const auto& e : std::filesystem::directory_iterator(h.manifests())) {
    s.manifests.push_back(e.path().string() + "=" + ReadFile(e.path()));
  }
  std::sort(s.artifacts.begin(), s.artifacts.end());
  std::sort(s.manifests.begin(), s.manifests.end());
  return s;
}

TEST_CASE("kilnctl plan -f previews manifest changes and applies nothing", "[plan_diff]") {
  KilndHarness h;
  const std::string web = Manifest("web", "1.0", 2, "{LOG_LEVEL: info}");
  const std::string api = Manifest("api", "3.1", 1, "{}");
  WriteFile(h.manifests() / "web.yaml", web);
  WriteFile(h.manifests() / "api.yaml", api);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor(
      [&] {
        return h.Healthy("web", 1) == 2 && h.Healthy("api", 1) == 1 &&
               h.HasEvent("web", EventKind::kRolloutCompleted) &&
               h.HasEvent("api", EventKind::kRolloutCompleted);
      },
      60s));
  const Snapshot before = Take(h);

  SECTION("the manifests kilnd runs: no change, exit 0") {
    RunResult r = Kilnctl(h, {"plan", "-f", h.manifests().string()});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
    CHECK(HasLine(
        r.out, "api: no change, revision 1 (3.1) [" + (h.manifests() / "api.yaml").string() + "]"));
    CHECK(HasLine(r.out,
                  "Plan: 0 to create, 0 to update, 0 to reconfigure, 0 to retire, 2 unchanged."));
    CHECK(r.err.empty());
  }

  SECTION("a new version, a scale change, a new service and a retirement: exit 2") {
    TempDir p;
    // A new artifact too (other bytes, same program): a plan must not copy it into the store.
    const std::string artifact = (p / "testsvc-2").string();
    WriteFile(artifact, ReadFile(BinPath("kiln-testsvc")) + "plan");
    std::filesystem::permissions(artifact, std::filesystem::perms::owner_all);
    WriteFile(p / "web.yaml", Manifest("web", "1.1", 3, "{LOG_LEVEL: debug, TRACE: \"on\"}"));
    WriteFile(p / "batch.yaml", Manifest("batch", "0.1", 1, "{}", artifact));
    WriteFile(p / "notes.txt", "not a manifest");
    RunResult r = Kilnctl(h, {"plan", "-f", p.path().string()});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 2);
    CHECK(HasLine(r.out,
                  "web: new template: revision 1 (1.0) \u2192 revision 2 (1.1); scale 2 "
                  "\u2192 3 [" +
                      (p / "web.yaml").string() + "]"));
    CHECK(HasLine(r.out, "  version: 1.0 \u2192 1.1"));
    CHECK(HasLine(r.out, "  env.LOG_LEVEL: info \u2192 debug"));
    CHECK(HasLine(r.out, "  env.TRACE: (unset) \u2192 on"));
    CHECK(HasLine(r.out, "  replicas: 2 \u2192 3"));
    CHECK(HasLine(r.out, "  next step: write revision 2 (the manifest declares a new template)"));
    CHECK(r.out.find("  next step: create ") != std::string::npos);
    CHECK(r.out.find(" of revision 2 (rolling") != std::string::npos);
    CHECK(HasLine(r.out, "batch: new service, revision 1 (0.1), 1 replicas [" +
                             (p / "batch.yaml").string() + "]"));
    CHECK(r.out.find("api: retire, revision 1 (3.1), 1 replicas\n  note: no file declares it") !=
          std::string::npos);
    CHECK(HasLine(r.out,
                  "Plan: 1 to create, 1 to update, 0 to reconfigure, 1 to retire, 0 unchanged."));

    RunResult js = Kilnctl(h, {"-o", "json", "plan", "-f", p.path().string()});
    CHECK(js.exit_code == 2);
    auto j = nlohmann::json::parse(js.out);
    CHECK(j["changes"] == true);
    REQUIRE(j["services"].size() == 3);
    CHECK(j["services"][0]["service"] == "api");
    CHECK(j["services"][0]["change"] == "PLAN_CHANGE_RETIRE");
    CHECK(j["services"][2]["change"] == "PLAN_CHANGE_UPDATE");
    CHECK(j["services"][2]["new_revision"] == "2");

    // One file: only its services are compared; api is not retired.
    RunResult one = Kilnctl(h, {"plan", "-f", (p / "web.yaml").string()});
    CHECK(one.exit_code == 2);
    CHECK(one.out.find("api:") == std::string::npos);
    CHECK(HasLine(one.out,
                  "Plan: 0 to create, 1 to update, 0 to reconfigure, 0 to retire, 0 unchanged."));

    // A settings change only: no new revision.
    WriteFile(p / "api.yaml", Manifest("api", "3.1", 4, "{}"));
    RunResult scale = Kilnctl(h, {"plan", "-f", (p / "api.yaml").string()});
    CHECK(scale.exit_code == 2);
    CHECK(HasLine(scale.out, "api: settings change, revision 1 (3.1) stays; scale 1 \u2192 4 [" +
                                 (p / "api.yaml").string() + "]"));
    CHECK(scale.out.find("  next step: create ") != std::string::npos);
    CHECK(scale.out.find(" of revision 1 (") != std::string::npos);
    CHECK(!std::filesystem::exists(h.state() / "artifacts" / "sha256" /
                                   Sha256Hex(ReadFile(artifact))));
  }

  SECTION("a broken manifest: exit 1 with file:line:col") {
    TempDir p;
    std::string broken = Manifest("web", "2", 1, "{}");
    broken.replace(broken.find("replicas: 1"), 11, "replicas: lots");
    WriteFile(p / "web.yaml", broken);
    RunResult r = Kilnctl(h, {"plan", "-f", (p / "web.yaml").string()});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find((p / "web.yaml").string() +
                     ":3:11: replicas: expected an integer, got \"lots\"\n") != std::string::npos);
    CHECK(r.err.find("kilnctl: 1 error;") != std::string::npos);
    // A broken file's services are not taken for retired.
    RunResult dir = Kilnctl(h, {"plan", "-f", p.path().string()});
    CHECK(dir.exit_code == 1);
    CHECK(dir.out.find("web: retire") == std::string::npos);
    CHECK(dir.out.find("api: retire") != std::string::npos);

    RunResult missing = Kilnctl(h, {"plan", "-f", (p / "nope.yaml").string()});
    CHECK(missing.exit_code == 1);
    CHECK(missing.err.find("nope.yaml") != std::string::npos);
  }

  // Whatever was planned, nothing changed: the same revisions, services, instances and events,
  // no artifact copied, the manifests as they were, and the same instances still running.
  const Snapshot after = Take(h);
  CHECK(after.revisions == before.revisions);
  CHECK(after.services == before.services);
  CHECK(after.instances == before.instances);
  CHECK(after.last_event == before.last_event);
  CHECK(after.artifacts == before.artifacts);
  CHECK(after.manifests == before.manifests);
  CHECK(h.Healthy("web", 1) == 2);
  CHECK(h.Healthy("api", 1) == 1);
}

}  // namespace
}  // namespace kiln::testing
