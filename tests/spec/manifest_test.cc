#include "spec/manifest.h"

#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/limits.h"
#include "common/sha256.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::TempDir;
using testing::WriteFile;

// A manifest directory with one artifact, "app", beside it in artifacts/.
struct Fixture {
  Fixture() {
    WriteFile(tmp / "artifacts/app", "#!/bin/sh\necho app\n");
    artifact_digest = Sha256Hex("#!/bin/sh\necho app\n");
  }
  std::filesystem::path dir() const { return tmp / "manifests"; }
  void Write(const std::string& name, const std::string& text) const {
    WriteFile(dir() / name, text);
  }
  ManifestSet Load() const { return LoadManifestDir(dir()); }
  // Errors as "file:line:col: key: message" with the directory prefix removed.
  std::vector<std::string> Errors() const {
    std::vector<std::string> out;
    for (const ManifestError& e : Load().AllErrors()) {
      std::string s = e.ToString();
      std::string prefix = dir().string() + "/";
      if (s.rfind(prefix, 0) == 0) s = s.substr(prefix.size());
      out.push_back(s);
    }
    return out;
  }

  TempDir tmp;
  std::string artifact_digest;
};

const char* kMinimal = R"(name: web
version: "1.0"
artifact: {path: ../artifacts/app}
)";

TEST_CASE("a minimal service gets every default", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", kMinimal);
  ManifestSet set = f.Load();
  REQUIRE(set.ok());
  auto services = set.Services();
  REQUIRE(services.size() == 1);
  const ServiceSpec& s = *services[0];
  CHECK(s.name == "web");
  CHECK(s.tmpl.version == "1.0");
  CHECK(s.replicas == 1);
  CHECK(s.history_limit == 10);
  CHECK(s.artifact_path == (f.tmp / "artifacts/app").string());
  CHECK(s.tmpl.artifact_sha256 == f.artifact_digest);
  CHECK(s.tmpl.command == std::vector<std::string>{"{artifact}"});
  CHECK(s.tmpl.health.kind == ProbeKind::kNone);
  CHECK(s.update.strategy == Strategy::kRolling);
  CHECK(s.update.max_surge == CountOrPercent{25, true});
  CHECK(s.update.max_unavailable == CountOrPercent{0, false});
  CHECK(s.update.min_healthy_time.count() == 0);
  CHECK(s.update.healthy_deadline.count() == 60'000);
  CHECK(s.update.progress_deadline.count() == 600'000);
  CHECK(s.update.auto_rollback);
  CHECK(s.update.canary == 1);
  CHECK_FALSE(s.update.auto_promote);
  CHECK(s.line == 1);
  CHECK(s.column == 7);
}

TEST_CASE("the DESIGN.md example manifest loads as written", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", R"(name: web                       # unique across the directory
version: "1.4.2"
replicas: 3
artifact:
  path: ../artifacts/app
  sha256: )" + f.artifact_digest +
                          R"(
command: ["{artifact}", "--port", "{port}"]
env: {LOG_LEVEL: info}
health:
  http: {path: /healthz}
  interval: 1s
  timeout: 500ms
  failure_threshold: 3
update: {strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 2s}
history_limit: 10
)");
  ManifestSet set = f.Load();
  INFO((set.AllErrors().empty() ? "" : set.AllErrors()[0].ToString()));
  REQUIRE(set.ok());
  const ServiceSpec& s = *set.Services().at(0);
  CHECK(s.replicas == 3);
  CHECK(s.artifact_pin == f.artifact_digest);
  CHECK(s.tmpl.command == std::vector<std::string>{"{artifact}", "--port", "{port}"});
  CHECK(s.tmpl.env.at("LOG_LEVEL") == "info");
  CHECK(s.tmpl.health.kind == ProbeKind::kHttp);
  CHECK(s.tmpl.health.http_path == "/healthz");
  CHECK(s.tmpl.health.interval.count() == 1000);
  CHECK(s.tmpl.health.timeout.count() == 500);
  CHECK(s.update.max_surge == CountOrPercent{1, false});
  CHECK(s.update.min_healthy_time.count() == 2000);
}

TEST_CASE("several documents per file, and image services", "[manifest]") {
  Fixture f;
  f.Write("all.yml", std::string(kMinimal) + "---\n" + R"(name: api
version: v2
replicas: 2
image: registry.local/api@sha256:)" +
                         std::string(64, 'a') + R"(
port: 8080
health: {tcp: {}}
update: {strategy: canary, canary: 1, auto_promote: true}
---
)");
  ManifestSet set = f.Load();
  REQUIRE(set.ok());
  auto services = set.Services();
  REQUIRE(services.size() == 2);
  CHECK(services[0]->name == "api");
  CHECK(services[0]->tmpl.image == "registry.local/api@sha256:" + std::string(64, 'a'));
  CHECK(services[0]->tmpl.port == 8080);
  CHECK(services[0]->tmpl.command.empty());
  CHECK(services[0]->tmpl.health.kind == ProbeKind::kTcp);
  CHECK(services[0]->update.strategy == Strategy::kCanary);
  CHECK(services[0]->update.auto_promote);
  CHECK(services[1]->name == "web");
}

TEST_CASE("hosts limits an image service to named Docker hosts and is checked", "[manifest]") {
  const std::string image =
      "name: api\nversion: v2\nimage: registry.local/api@sha256:" + std::string(64, 'a') + "\n";
  {
    Fixture f;
    f.Write("a.yaml", image + "hosts: [b, a]\n");
    ManifestSet set = f.Load();
    REQUIRE(set.ok());
    const ServiceSpec& s = *set.Services().at(0);
    CHECK(s.tmpl.hosts == std::vector<std::string>{"b", "a"});
    // Part of the template, so a change moves instances; absent, the hash is as before.
    Template without = s.tmpl;
    without.hosts.clear();
    CHECK(s.tmpl.Hash() != without.Hash());
    CHECK(without.Canonical().find("hosts") == std::string::npos);
    StatusOr<Template> back = Template::FromCanonical(s.tmpl.Canonical());
    REQUIRE(back.ok());
    CHECK(back->hosts == s.tmpl.hosts);
  }
  struct Case {
    std::string line, error;
  };
  const std::vector<Case> cases = {
      {"hosts: [a, Bad_1]\n",
       "w.yaml:4:12: hosts[1]: a host name is 1 to 63 characters of a-z, 0-9 and '-', not "
       "starting or ending with '-', got \"Bad_1\""},
      {"hosts: [a, b, a]\n", "w.yaml:4:15: hosts[2]: host \"a\" is named twice"},
      {"hosts: []\n", "w.yaml:4:8: hosts: must not be empty"},
      {"hosts: a\n", "w.yaml:4:8: hosts: expected a list of strings, got \"a\""},
  };
  for (const Case& c : cases) {
    Fixture f;
    f.Write("w.yaml", image + c.line);
    INFO(c.line);
    auto errors = f.Errors();
    REQUIRE(errors.size() == 1);
    CHECK(errors[0] == c.error);
  }
}

TEST_CASE("percentages resolve like Kubernetes", "[manifest]") {
  CHECK(CountOrPercent{25, true}.Resolve(10, /*round_up=*/true) == 3);
  CHECK(CountOrPercent{25, true}.Resolve(10, /*round_up=*/false) == 2);
  CHECK(CountOrPercent{25, true}.Resolve(1, true) == 1);
  CHECK(CountOrPercent{25, true}.Resolve(1, false) == 0);
  CHECK(CountOrPercent{2, false}.Resolve(10, true) == 2);
  CHECK(CountOrPercent{100, true}.Resolve(7, false) == 7);
}

// One row per error kind: the document's lines after a valid header of three lines (so the
// body starts at line 4), or a whole document; then the one error it must produce.
TEST_CASE("every error names file, line, column and key", "[manifest]") {
  struct Case {
    bool whole;
    const char* doc;
    const char* error;
  };
  const std::string header = "name: web\nversion: \"1\"\nartifact: {path: ../artifacts/app}\n";
  const std::string rest = "version: \"1\"\nartifact: {path: ../artifacts/app}\n";
  const Case cases[] = {
      {false, "replicass: 3\n", "w.yaml:4:1: replicass: unknown key (did you mean \"replicas\"?)"},
      {false, "replicas: three\n", "w.yaml:4:11: replicas: expected an integer, got \"three\""},
      {false, "replicas: \"3\"\n", "w.yaml:4:11: replicas: expected an integer, got \"3\""},
      {false, "replicas: -1\n", "w.yaml:4:11: replicas: must be from 0 to 100000, got -1"},
      {false, "update:\n  max_surge: lots\n",
       "w.yaml:5:14: update.max_surge: expected a count or a percentage, got \"lots\""},
      {false, "update: {max_unavailable: 150%}\n",
       "w.yaml:4:27: update.max_unavailable: a percentage must be from 0% to 100%, got \"150%\""},
      {false, "update: {max_surge: -2}\n",
       "w.yaml:4:21: update.max_surge: a count must be 0 or more, got \"-2\""},
      {false, "update: {strategy: yolo}\n",
       "w.yaml:4:20: update.strategy: expected rolling, recreate, blue-green or canary, got "
       "\"yolo\""},
      {false, "update: {min_healthy_time: 2 seconds}\n",
       "w.yaml:4:28: update.min_healthy_time: expected a duration like 500ms, 2s or 10m, got \"2 "
       "seconds\""},
      {false, "update: {healthy_deadline: 0s}\n",
       "w.yaml:4:28: update.healthy_deadline: must be more than 0s"},
      {false, "update: {auto_rollback: maybe}\n",
       "w.yaml:4:25: update.auto_rollback: expected true or false, got \"maybe\""},
      {false, "update: {canary: 2}\n",
       "w.yaml:4:10: update.canary: only applies to strategy canary"},
      {false, "update: {strategy: recreate, max_surge: 1}\n",
       "w.yaml:4:30: update.max_surge: only applies to strategies rolling and canary"},
      {false, "update: {max_surge: 0, max_unavailable: 0}\n",
       "w.yaml:4:10: update.max_surge: max_surge and max_unavailable cannot both be 0: the rollout "
       "could never progress"},
      {false, "update: [rolling]\n", "w.yaml:4:9: update: expected a mapping, got a list"},
      {false, "health: {interval: 1s}\n", "w.yaml:4:9: health: needs a probe: http, tcp or exec"},
      {false, "health: {http: {path: healthz}}\n",
       "w.yaml:4:23: health.http.path: must start with '/', got \"healthz\""},
      {false, "health: {tcp: {}, exec: [true]}\n",
       "w.yaml:4:19: health.exec: a health check has one probe: http, tcp or exec"},
      {false, "health: {exec: []}\n", "w.yaml:4:16: health.exec: must not be empty"},
      {false, "health: {tcp: {port: 70000}}\n",
       "w.yaml:4:22: health.tcp.port: must be from 1 to 65535, got 70000"},
      {false, "health: {http: {}, failure_threshold: 0}\n",
       "w.yaml:4:39: health.failure_threshold: must be from 1 to 1000, got 0"},
      {false, "health: {http: {}, timeout: fast}\n",
       "w.yaml:4:29: health.timeout: expected a duration like 500ms, 2s or 10m, got \"fast\""},
      {false, "command: [\"{artifact}\", {a: b}]\n",
       "w.yaml:4:25: command[1]: expected a string, got a mapping"},
      {false, "command: run\n", "w.yaml:4:10: command: expected a list of strings, got \"run\""},
      {false, "env: {PORT: \"80\"}\n",
       "w.yaml:4:7: env.PORT: is set by kiln for every instance and cannot be overridden"},
      {false, "env: {\"bad name\": x}\n",
       "w.yaml:4:7: env.bad name: environment variable names are letters, digits and '_', got "
       "\"bad name\""},
      {false, "env: {A: [1]}\n", "w.yaml:4:10: env.A: expected a string, got a list"},
      {false, "port: 8080\n",
       "w.yaml:4:1: port: only applies to image services; process instances get {port} from "
       "kiln's port range"},
      {false, "history_limit: 0\n", "w.yaml:4:16: history_limit: must be from 1 to 1000, got 0"},
      {false, "hosts: [a]\n",
       "w.yaml:4:1: hosts: only applies to image services (Docker hosts); process instances run "
       "where kilnd runs"},
      {false, "image: nginx:latest\n",
       "w.yaml:4:1: image: a service runs an artifact (process driver) or an image (container "
       "driver), not both"},
      {true, "name: Web_1\n",
       "w.yaml:1:7: name: must be 1 to 63 characters of a-z, 0-9 and '-', "
       "not starting or ending with '-', got \"Web_1\""},
      {true, "name: -web\n",
       "w.yaml:1:7: name: must be 1 to 63 characters of a-z, 0-9 and '-', "
       "not starting or ending with '-', got \"-web\""},
      {true, "name: [web]\n", "w.yaml:1:7: name: expected a string, got a list"},
      {true, "name: web\nname: web2\n", "w.yaml:2:1: name: duplicate key"},
  };
  for (const Case& c : cases) {
    Fixture f;
    std::string doc = c.whole ? c.doc + rest : header + c.doc;
    f.Write("w.yaml", doc);
    INFO(doc);
    auto errors = f.Errors();
    REQUIRE(errors.size() == 1);
    CHECK(errors[0] == c.error);
  }
}

TEST_CASE("required keys and the artifact/image choice", "[manifest]") {
  Fixture f;
  f.Write("a.yaml", "replicas: 1\n");
  f.Write("b.yaml", "name: b\nversion: \"1\"\n");
  f.Write("c.yaml", "- just\n- a list\n");
  f.Write("d.yaml", "name: d\nversion: \"1\"\nimage: nginx:latest\n");
  f.Write("e.yaml", "name: e\nversion: \"1\"\nartifact: {}\n");
  auto errors = f.Errors();
  CHECK(errors == std::vector<std::string>{
                      "a.yaml:1:1: name: is required",
                      "a.yaml:1:1: version: is required",
                      // NOLINTNEXTLINE(bugprone-suspicious-missing-comma): split on purpose
                      "a.yaml:1:1: a service needs an artifact (process driver) or an image "
                      "(container driver)",
                      "b.yaml:1:1: a service needs an artifact (process driver) or an image "
                      "(container driver)",
                      "c.yaml:1:1: expected a service document (a mapping), got a list",
                      "d.yaml:3:8: image: must be pinned by digest, name@sha256:<64 hex digits>, "
                      "got \"nginx:latest\"",
                      "e.yaml:3:11: artifact.path: is required",
                  });
}

TEST_CASE("artifacts: missing files and pinned digests", "[manifest]") {
  Fixture f;
  f.Write("missing.yaml", "name: m\nversion: \"1\"\nartifact: {path: ../artifacts/nope}\n");
  f.Write("pinned.yaml",
          "name: p\nversion: \"1\"\nartifact:\n  path: ../artifacts/app\n  sha256: " +
              std::string(64, 'b') + "\n");
  f.Write("badpin.yaml",
          "name: q\nversion: \"1\"\nartifact: {path: ../artifacts/app, sha256: xyz}\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 3);
  CHECK(errors[0] == "badpin.yaml:3:44: artifact.sha256: expected 64 hex digits, got \"xyz\"");
  CHECK(errors[1] == "missing.yaml:3:18: artifact.path: cannot read " +
                         (f.tmp / "artifacts/nope").string() + ": No such file or directory");
  CHECK(errors[2] == "pinned.yaml:5:11: artifact.sha256: artifact " +
                         (f.tmp / "artifacts/app").string() + " has sha256 " + f.artifact_digest +
                         ", the manifest pins " + std::string(64, 'b'));
}

TEST_CASE("invalid YAML is an error with its position", "[manifest]") {
  Fixture f;
  f.Write("broken.yaml", "name: web\nversion: [1, 2\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 1);
  CHECK(errors[0].rfind("broken.yaml:", 0) == 0);
  CHECK(errors[0].find("invalid YAML: ") != std::string::npos);
}

TEST_CASE("duplicate service names are reported at both places", "[manifest]") {
  Fixture f;
  f.Write("a.yaml", kMinimal);
  f.Write("b.yaml", std::string("# another copy\n") + kMinimal);
  f.Write("c.yaml", std::string(kMinimal).replace(6, 3, "api"));
  ManifestSet set = f.Load();
  auto errors = f.Errors();
  REQUIRE(errors.size() == 2);
  CHECK(errors[0] == "a.yaml:1:7: name: service \"web\" is also declared at " +
                         (f.dir() / "b.yaml").string() + ":2:7");
  CHECK(errors[1] == "b.yaml:2:7: name: service \"web\" is also declared at " +
                         (f.dir() / "a.yaml").string() + ":1:7");
  // The files in error contribute no services; the good file does.
  REQUIRE(set.Services().size() == 1);
  CHECK(set.Services()[0]->name == "api");
  CHECK(set.files[0].declared.at(0).name == "web");
}

TEST_CASE("all errors of a directory are reported, not only the first", "[manifest]") {
  Fixture f;
  f.Write("a.yaml",
          "name: a\nversion: \"1\"\nreplicas: x\nartifact: {path: ../artifacts/app}\nbogus: 1\n");
  f.Write("b.yaml",
          "name: b\nversion: \"1\"\nartifact: {path: ../artifacts/app}\nupdate: {strategy: x}\n");
  CHECK(f.Errors().size() == 3);
}

TEST_CASE("only *.yaml and *.yml files are read - hidden and temp files are skipped",
          "[manifest]") {
  Fixture f;
  f.Write("web.yaml", kMinimal);
  f.Write("README.md", "not yaml: [");
  f.Write(".hidden.yaml", "garbage: [");
  f.Write(".web.yaml.swp", "garbage: [");
  f.Write("web.yaml~", "garbage: [");
  f.Write("#web.yaml#", "garbage: [");
  f.Write("sub/other.yaml", "garbage: [");
  ManifestSet set = f.Load();
  CHECK(set.ok());
  CHECK(set.files.size() == 1);
  CHECK(IsManifestFileName("a.yml"));
  CHECK_FALSE(IsManifestFileName(".yaml"));
  CHECK_FALSE(IsManifestFileName("a.yaml.bak"));
}

TEST_CASE("unreadable files and directories are errors", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", kMinimal);
  std::filesystem::create_symlink(f.tmp / "nowhere.yaml", f.dir() / "dangling.yaml");
  std::filesystem::create_directories(f.dir() / "dir.yaml");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 2);
  CHECK(errors[0] == "dangling.yaml: cannot read: No such file or directory");
  CHECK(errors[1] == "dir.yaml: cannot read: Is a directory");

  ManifestSet missing = LoadManifestDir(f.tmp / "absent");
  CHECK_FALSE(missing.ok());
  REQUIRE(missing.dir_errors.size() == 1);
  CHECK(missing.dir_errors[0].ToString() ==
        (f.tmp / "absent").string() + ": manifest directory does not exist");
}

TEST_CASE("an empty file and empty documents declare nothing", "[manifest]") {
  Fixture f;
  f.Write("empty.yaml", "");
  f.Write("comments.yaml", "# nothing here yet\n---\n---\n");
  ManifestSet set = f.Load();
  CHECK(set.ok());
  CHECK(set.Services().empty());
}

// Hostile manifests: each must end in an error that says what is wrong, never a crash, a hang
// or unbounded memory (the fuzz target in fuzz/ keeps looking for more).

TEST_CASE("invalid UTF-8 is an error at the bad byte, not a crash", "[manifest]") {
  Fixture f;
  f.Write("bad.yaml", "name: web\nversion: \"1.\xff\"\nartifact: {path: ../artifacts/app}\n");
  f.Write("overlong.yaml", "# \xc3\xa9t\xc3\xa9\nname: \xc0\xafx\n");
  f.Write("surrogate.yaml", "name: w\xed\xa0\x80\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 3);
  CHECK(errors[0] ==
        "bad.yaml:2:13: invalid UTF-8: byte 0xFF is not part of a valid character; "
        "manifests are UTF-8 text");
  // Columns count characters: "# été" is 5 of them.
  CHECK(errors[1].rfind("overlong.yaml:2:7: invalid UTF-8: byte 0xC0", 0) == 0);
  CHECK(errors[2].rfind("surrogate.yaml:1:8: invalid UTF-8: byte 0xED", 0) == 0);
  // Everything a loaded set says can be written as JSON.
  CHECK_NOTHROW(nlohmann::json(errors).dump());
}

TEST_CASE("a raw control character is an error at its place, not a crash", "[manifest]") {
  Fixture f;
  // Found by the fuzzer: after a NUL, libfyaml handed back bytes from outside the input.
  f.Write("nul.yaml", std::string("|\0 .,.)", 7));
  f.Write("escape.yaml", "name: \"a\\x01b\"\nversion: \"1.\\x1b\"\n# \xc3\xa9\x7f\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 2);
  CHECK(errors[0] ==
        "escape.yaml:3:4: control character 0x7F is not allowed in YAML; write it as an escape "
        "(\\x7F) inside a double-quoted string");
  CHECK(errors[1].rfind("nul.yaml:1:2: control character 0x00 is not allowed in YAML", 0) == 0);
  CHECK_NOTHROW(nlohmann::json(errors).dump());
}

TEST_CASE("a file name that is not UTF-8 is an error, its file is not read", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", kMinimal);
  f.Write("w\xfe.yaml", std::string(kMinimal).replace(6, 3, "api"));
  ManifestSet set = f.Load();
  auto errors = f.Errors();
  REQUIRE(errors.size() == 1);
  CHECK(errors[0] == "w\xef\xbf\xbd.yaml: the file name is not valid UTF-8; rename it");
  REQUIRE(set.Services().size() == 1);
  CHECK(set.Services()[0]->name == "web");
}

TEST_CASE("token soup that hung or exhausted yaml-cpp is an error", "[manifest]") {
  for (const char* text : {",", "{:", "[:", "[[[", "a: [1, 2\n", "- {a: [b, {c: ,]}"}) {
    INFO(text);
    Fixture f;
    f.Write("soup.yaml", text);
    auto errors = f.Errors();
    REQUIRE(errors.size() == 1);
    CHECK(errors[0].rfind("soup.yaml:", 0) == 0);
    CHECK(errors[0].find(": invalid YAML: ") != std::string::npos);
  }
}

TEST_CASE("alias bombs, deep nesting and huge scalars stop at the documented limits",
          "[manifest]") {
  // Nine levels of nine aliases: 9^9 (387 million) nodes if expanded.
  std::string bomb = "name: web\nversion: \"1\"\nartifact: {path: ../artifacts/app}\n";
  bomb += "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n";
  for (int i = 1; i < 9; ++i) {
    std::string prev = "*a" + std::to_string(i - 1);
    bomb += "x" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 9; ++k) bomb += (k ? ", " : "") + prev;
    bomb += "]\n";
  }
  Fixture f;
  f.Write("bomb.yaml", bomb);
  f.Write("deep.yaml", std::string(100'000, '[') + std::string(100'000, ']'));
  f.Write("huge.yaml",
          "name: web\nversion: \"" + std::string(kMaxManifestScalarBytes + 1, 'v') + "\"\n");
  f.Write("self.yaml", "a: &x [1, *x]\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 4);
  CHECK(errors[0].rfind("bomb.yaml:", 0) == 0);
  CHECK(errors[0].find("invalid YAML: more than 100000 nodes in one file (each alias counts as a "
                       "copy of what it refers to)") != std::string::npos);
  CHECK(errors[1] == "deep.yaml:1:33: invalid YAML: nested deeper than 32 levels");
  CHECK(errors[2] == "huge.yaml:2:10: invalid YAML: a string longer than 65536 bytes");
  CHECK(errors[3] ==
        "self.yaml:1:12: invalid YAML: alias *x refers to no complete anchored node "
        "before it");
}

TEST_CASE("anchors and aliases within bounds load", "[manifest]") {
  Fixture f;
  f.Write("web.yaml",
          "name: web\nversion: &v \"1.2\"\nartifact: {path: ../artifacts/app}\n"
          "command: [\"{artifact}\", *v]\nenv: {VERSION: *v}\n");
  ManifestSet set = f.Load();
  INFO((set.AllErrors().empty() ? "" : set.AllErrors()[0].ToString()));
  REQUIRE(set.ok());
  const ServiceSpec& s = *set.Services().at(0);
  CHECK(s.tmpl.command == std::vector<std::string>{"{artifact}", "1.2"});
  CHECK(s.tmpl.env.at("VERSION") == "1.2");
}

TEST_CASE("only regular files are read: FIFOs and devices are errors, not hangs", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", kMinimal);
  REQUIRE(::mkfifo((f.dir() / "fifo.yaml").c_str(), 0600) == 0);
  REQUIRE(::mkfifo((f.tmp / "artifacts/pipe").c_str(), 0600) == 0);
  f.Write("zero.yaml", "name: z\nversion: \"1\"\nartifact: {path: /dev/zero}\n");
  f.Write("random.yaml", "name: r\nversion: \"1\"\nartifact: {path: /dev/urandom}\n");
  f.Write("pipe.yaml", "name: p\nversion: \"1\"\nartifact: {path: ../artifacts/pipe}\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 4);
  CHECK(errors[0] == "fifo.yaml: cannot read: not a regular file (a FIFO)");
  CHECK(errors[1] == "pipe.yaml:3:18: artifact.path: cannot read " +
                         (f.tmp / "artifacts/pipe").string() + ": not a regular file (a FIFO)");
  CHECK(errors[2] ==
        "random.yaml:3:18: artifact.path: cannot read /dev/urandom: not a regular "
        "file (a character device)");
  CHECK(errors[3] ==
        "zero.yaml:3:18: artifact.path: cannot read /dev/zero: not a regular file (a "
        "character device)");
  // The good file still loads.
  REQUIRE(f.Load().Services().size() == 1);
}

TEST_CASE("a manifest file over 1 MiB is refused unparsed", "[manifest]") {
  Fixture f;
  f.Write("big.yaml",
          std::string(kMinimal) + "# " + std::string(kMaxManifestFileBytes, 'x') + "\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 1);
  CHECK(errors[0] == "big.yaml: cannot read: larger than the limit of 1048576 bytes");
  ManifestFile direct = ParseManifest("big.yaml", std::string(kMaxManifestFileBytes + 1, ' '), {});
  REQUIRE(direct.errors.size() == 1);
  CHECK(direct.errors[0].message ==
        "is 1048577 bytes; a manifest file is limited to 1048576 bytes (1 MiB)");
}

TEST_CASE("every field limit is an error naming the field", "[manifest]") {
  struct Case {
    std::string body;  // after the three-line header
    std::string error;
  };
  const std::string header = "name: web\nversion: \"1\"\nartifact: {path: ../artifacts/app}\n";
  auto list = [](size_t n, const std::string& item) {
    std::string out = "[";
    for (size_t i = 0; i < n; ++i) out += (i ? ", " : "") + item;
    return out + "]";
  };
  std::string many_env = "{";
  for (size_t i = 0; i <= kMaxEnvVars; ++i)
    many_env += (i ? ", V" : "V") + std::to_string(i) + ": x";
  many_env += "}";
  const Case cases[] = {
      {"command: " + list(kMaxCommandArgs + 1, "a") + "\n",
       "w.yaml:4:10: command: has 257 arguments; the limit is 256"},
      {"command: [a, " + std::string(kMaxCommandArgBytes + 1, 'x') + "]\n",
       "w.yaml:4:14: command[1]: is 4097 bytes; the limit is 4096"},
      {"health: {exec: " + list(kMaxCommandArgs + 1, "a") + "}\n",
       "w.yaml:4:16: health.exec: has 257 arguments; the limit is 256"},
      {"health: {http: {path: /" + std::string(kMaxHealthPathBytes, 'p') + "}}\n",
       "w.yaml:4:23: health.http.path: is 1025 bytes; the limit is 1024"},
      {"env: " + many_env + "\n", "w.yaml:4:6: env: has 129 variables; the limit is 128"},
      {"env: {" + std::string(kMaxEnvNameBytes + 1, 'N') + ": x}\n",
       "w.yaml:4:7: env: a variable name is 129 bytes; the limit is 128"},
      {"env: {BIG: " + std::string(kMaxEnvValueBytes + 1, 'v') + "}\n",
       "w.yaml:4:12: env.BIG: is 4097 bytes; the limit is 4096"},
      {"env: {" +
           [] {
             std::string e;
             for (int i = 0; i < 20; ++i)
               e += (i ? ", V" : "V") + std::to_string(i) + ": " + std::string(4000, 'v');
             return e;
           }() +
           "}\n",
       "w.yaml:1:1: the service's template (version, command, env, health) is 80436 bytes as JSON; "
       "the limit is 65536"},
  };
  for (const Case& c : cases) {
    Fixture f;
    f.Write("w.yaml", header + c.body);
    INFO(c.error);
    auto errors = f.Errors();
    REQUIRE(errors.size() == 1);
    CHECK(errors[0] == c.error);
  }

  Fixture f;
  f.Write("v.yaml", "name: web\nversion: \"" + std::string(kMaxVersionBytes + 1, 'v') +
                        "\"\nartifact: {path: ../artifacts/app}\n");
  f.Write("c.yaml", "name: api\nversion: \"1\\e[31m\"\nartifact: {path: ../artifacts/app}\n");
  f.Write("i.yaml", "name: img\nversion: \"1\"\nimage: " + std::string(kMaxImageBytes, 'i') +
                        "@sha256:" + std::string(64, 'a') + "\n");
  f.Write("p.yaml", "name: pth\nversion: \"1\"\nartifact: {path: " +
                        std::string(kMaxArtifactPathBytes + 1, 'p') + "}\n");
  f.Write("n.yaml", "name: " + std::string(kMaxServiceNameBytes + 1, 'n') +
                        "\nversion: \"1\"\nartifact: {path: ../artifacts/app}\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 5);
  CHECK(errors[0] ==
        "c.yaml:2:10: version: must not contain control characters, got \"1\\x1b[31m\"");
  CHECK(errors[1] == "i.yaml:3:8: image: is 584 bytes; the limit is 512");
  CHECK(errors[2].rfind("n.yaml:1:7: name: must be 1 to 63 characters", 0) == 0);
  CHECK(errors[3] == "p.yaml:3:18: artifact.path: is 4097 bytes; the limit is 4096");
  CHECK(errors[4] == "v.yaml:2:10: version: is 129 bytes; the limit is 128");
}

TEST_CASE("errors quote at most 80 bytes of a value, and at most 50 errors per file",
          "[manifest]") {
  Fixture f;
  f.Write("long.yaml", "name: web\nversion: \"1\"\nartifact: {path: ../artifacts/app}\nreplicas: " +
                           std::string(1000, '9') + "x\n");
  std::string many = "name: api\nversion: \"1\"\nartifact: {path: ../artifacts/app}\n";
  for (int i = 0; i < 200; ++i) many += "bogus" + std::to_string(i) + ": 1\n";
  f.Write("many.yaml", many);
  auto errors = f.Errors();
  REQUIRE(errors.size() == 2 + kMaxManifestErrorsPerFile);
  CHECK(errors[0] == "long.yaml:4:11: replicas: expected an integer, got \"" +
                         std::string(80, '9') + "\"... (1001 bytes)");
  CHECK(errors[1] == "many.yaml:4:1: bogus0: unknown key");
  CHECK(errors.back() ==
        "many.yaml:54:1: and 150 more errors in this file from here on (only the "
        "first 50 are reported)");
}

TEST_CASE("a long unknown key is reported without its text", "[manifest]") {
  // Found by the fuzzer: suggesting a near key compared every byte of a 32 KB key.
  Fixture f;
  f.Write("w.yaml", std::string(kMinimal) + std::string(kMaxKeyBytes + 1, 'k') + ": 1\n");
  auto errors = f.Errors();
  REQUIRE(errors.size() == 1);
  CHECK(errors[0] == "w.yaml:4:1: unknown key of 129 bytes (keys are at most 128)");
}

TEST_CASE("expose: a stable address, its drain, and its errors at their place", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", std::string(kMinimal) + "expose: {port: 8080, drain: 30s}\n");
  f.Write("api.yaml", R"(name: api
version: "1.0"
artifact: {path: ../artifacts/app}
expose: {listen: "[::1]:9000"}
)");
  ManifestSet set = f.Load();
  REQUIRE(set.ok());
  std::map<std::string, ExposeSpec> by_name;
  for (const ServiceSpec* s : set.Services()) {
    REQUIRE(s->expose);
    by_name[s->name] = *s->expose;
  }
  CHECK(by_name["web"].listen_host == "127.0.0.1");
  CHECK(by_name["web"].port == 8080);
  CHECK(by_name["web"].drain == Duration(30'000));
  CHECK(by_name["web"].line == 4);
  CHECK(by_name["api"].listen_host == "::1");
  CHECK(by_name["api"].port == 9000);
  CHECK(by_name["api"].drain == Duration(10'000));  // the default

  // Stored and read back with the rest of the spec; a spec stored before has none.
  const ServiceSpec* web = nullptr;
  for (const ServiceSpec* s : set.Services()) {
    if (s->name == "web") web = s;
  }
  REQUIRE(web != nullptr);
  StatusOr<ServiceSpec> back = ServiceSpecFromJson(ServiceSpecToJson(*web));
  REQUIRE(back.ok());
  CHECK(back->expose == web->expose);
  nlohmann::json old = nlohmann::json::parse(ServiceSpecToJson(*web));
  old.erase("expose");
  StatusOr<ServiceSpec> before = ServiceSpecFromJson(old.dump());
  REQUIRE(before.ok());
  CHECK_FALSE(before->expose);

  f.Write("web.yaml", std::string(kMinimal) + "expose: {port: 70000, drain: soon}\n");
  f.Write("api.yaml", R"(name: api
version: "1.0"
artifact: {path: ../artifacts/app}
expose: {port: 1, listen: "localhost:80"}
)");
  CHECK(f.Errors() ==
        std::vector<std::string>{
            "api.yaml:4:19: expose.listen: give expose.port (on 127.0.0.1) or expose.listen "
            "(HOST:PORT), not both",
            "api.yaml:4:27: expose.listen: expected IP:PORT with a port in 1-65535 "
            "(127.0.0.1:8080, 0.0.0.0:8080, [::1]:8080), got \"localhost:80\"",
            "web.yaml:4:16: expose.port: must be from 1 to 65535, got 70000",
            "web.yaml:4:30: expose.drain: expected a duration like 500ms, 2s or 10m, got "
            "\"soon\""});
}

TEST_CASE("expose: one port, one service, across files", "[manifest]") {
  Fixture f;
  f.Write("web.yaml", std::string(kMinimal) + "expose: {port: 8080}\n");
  f.Write("api.yaml", R"(name: api
version: "1.0"
artifact: {path: ../artifacts/app}
expose: {listen: "0.0.0.0:8080"}
)");
  f.Write("db.yaml", R"(name: db
version: "1.0"
artifact: {path: ../artifacts/app}
expose: {listen: "127.0.0.2:8081"}
)");
  const std::string dir = f.dir().string() + "/";
  CHECK(f.Errors() ==
        std::vector<std::string>{
            "api.yaml:4:18: expose: port 8080 is also exposed by service \"web\" at " + dir +
                "web.yaml:4:16",
            "web.yaml:4:16: expose: port 8080 is also exposed by service \"api\" at " + dir +
                "api.yaml:4:18"});
  const ManifestSet set = f.Load();
  std::vector<const ServiceSpec*> loaded = set.Services();
  REQUIRE(loaded.size() == 1);  // another address on another port is fine
  CHECK(loaded[0]->name == "db");
}

TEST_CASE("ParseManifestFiles reads given contents by the directory's rules", "[manifest]") {
  Fixture f;
  const std::string dir = f.dir().string() + "/";
  // Nothing on disk but the artifact: the texts are what a client sent.
  const ManifestSet set = ParseManifestFiles(
      "", {{dir + "web.yaml", kMinimal},
           {dir + "again.yaml", std::string(kMinimal) + "replicas: 2\n"},
           {dir + "api.yaml", "name: api\nversion: \"2\"\nartifact: {path: ../artifacts/app}\n"}});
  REQUIRE(set.files.size() == 3);
  CHECK(set.files[0].path == dir + "again.yaml");  // sorted by path
  std::vector<std::string> errors;
  for (const ManifestError& e : set.AllErrors()) errors.push_back(e.ToString());
  CHECK(errors == std::vector<std::string>{
                      dir + "again.yaml:1:7: name: service \"web\" is also declared at " + dir +
                          "web.yaml:1:7",
                      dir + "web.yaml:1:7: name: service \"web\" is also declared at " + dir +
                          "again.yaml:1:7"});
  REQUIRE(set.Services().size() == 1);
  CHECK(set.Services()[0]->name == "api");
  CHECK(set.Services()[0]->tmpl.artifact_sha256 == f.artifact_digest);
}

}  // namespace
}  // namespace kiln
