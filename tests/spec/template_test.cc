#include "spec/template.h"

#include <catch2/catch.hpp>

#include "spec/manifest.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::TempDir;
using testing::WriteFile;

// Loads one manifest document (with an artifact beside it) and returns its template hash.
std::string HashOf(const std::string& doc, const std::string& artifact = "bits-v1") {
  TempDir tmp;
  WriteFile(tmp / "app", artifact);
  WriteFile(tmp / "m/s.yaml", doc);
  ManifestSet set = LoadManifestDir(tmp / "m");
  if (!set.ok()) FAIL(set.AllErrors()[0].ToString());
  REQUIRE(set.Services().size() == 1);
  return set.Services()[0]->tmpl.Hash();
}

const std::string kBase = R"(name: web
version: "1.4.2"
replicas: 3
artifact: {path: ../app}
command: ["{artifact}", "--port", "{port}"]
env: {LOG_LEVEL: info, MODE: fast}
health: {http: {path: /healthz}, interval: 1s, timeout: 500ms}
update: {strategy: rolling, max_surge: 1}
history_limit: 10
)";

TEST_CASE("the template hash ignores order, quoting, comments and whitespace", "[template]") {
  const std::string h = HashOf(kBase);
  CHECK(h.size() == 64);
  CHECK(HashOf(R"(# the web tier
history_limit: 10
update: {max_surge: 1, strategy: rolling}
health:
  timeout: 500ms
  interval: 1s
  http:
    path: "/healthz"
env:
  MODE: 'fast'
  LOG_LEVEL: "info"   # trailing comment
command:
  - "{artifact}"
  - --port
  - '{port}'
artifact:
  path: ../app
replicas: 3
version: '1.4.2'
name: "web"
)") == h);
}

TEST_CASE("replicas, update and history_limit do not change the template hash", "[template]") {
  const std::string h = HashOf(kBase);
  std::string changed = kBase;
  changed.replace(changed.find("replicas: 3"), 11, "replicas: 9");
  changed.replace(changed.find("max_surge: 1"), 12, "max_surge: 50%");
  changed.replace(changed.find("history_limit: 10"), 17, "history_limit: 2");
  CHECK(HashOf(changed) == h);
}

TEST_CASE("every template field changes the hash", "[template]") {
  const std::string h = HashOf(kBase);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string doc = kBase;
    size_t at = doc.find(from);
    REQUIRE(at != std::string::npos);
    return HashOf(doc.replace(at, from.size(), to));
  };
  CHECK(with("1.4.2", "1.4.3") != h);
  CHECK(with("--port", "--listen") != h);
  CHECK(with("MODE: fast", "MODE: slow") != h);
  CHECK(with("MODE: fast", "MODE2: fast") != h);
  CHECK(with("/healthz", "/ready") != h);
  CHECK(with("interval: 1s", "interval: 2s") != h);
  CHECK(with("timeout: 500ms", "timeout: 400ms") != h);
  CHECK(with("{http: {path: /healthz}", "{tcp: {}") != h);
  CHECK(HashOf(kBase, "bits-v2") != h);  // the artifact's digest
}

TEST_CASE("a template reads back from its canonical form", "[template]") {
  Template t;
  t.version = "2";
  t.artifact_sha256 = std::string(64, 'c');
  t.command = {"{artifact}", "--port", "{port}"};
  t.env = {{"A", "1"}, {"B", "x y"}};
  t.health.kind = ProbeKind::kExec;
  t.health.exec = {"/bin/true"};
  t.health.interval = Duration(250);
  StatusOr<Template> back = Template::FromCanonical(t.Canonical());
  REQUIRE(back.ok());
  CHECK(*back == t);
  CHECK(back->Hash() == t.Hash());
  CHECK(Template::FromCanonical("{").status().code() == StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kiln
