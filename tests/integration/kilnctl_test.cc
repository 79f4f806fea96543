// kilnctl as a user runs it.

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/integration/process.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

TEST_CASE("kilnctl validate prints the example services with their template hashes", "[kilnctl]") {
  RunResult r = Run({BinPath("kilnctl"), "validate", SourcePath("examples/manifests")});
  INFO(r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.rfind("SERVICE  ", 0) == 0);
  for (const char* name : {"web ", "api ", "worker "}) {
    CHECK(r.out.find(std::string("\n") + name) != std::string::npos);
  }
  // The example web service has a stable address; the others show none.
  CHECK(r.out.find("  rolling   127.0.0.1:8080  ") != std::string::npos);
  CHECK(r.err.empty());

  RunResult j =
      Run({BinPath("kilnctl"), "-o", "json", "validate", SourcePath("examples/manifests")});
  CHECK(j.exit_code == 0);
  auto doc = nlohmann::json::parse(j.out);
  REQUIRE(doc["services"].size() == 3);
  for (const auto& s : doc["services"]) {
    CHECK(s["template_hash"].get<std::string>().size() == 64);
    CHECK(s["address"] == (s["name"] == "web" ? "127.0.0.1:8080" : ""));
  }
  // Same artifact and command shape but different versions: different templates.
  CHECK(doc["services"][0]["template_hash"] != doc["services"][1]["template_hash"]);
}

TEST_CASE("kilnctl validate reports every error and exits 1", "[kilnctl]") {
  TempDir tmp;
  WriteFile(tmp / "m/a.yaml", "name: a\nversion: \"1\"\nreplicas: lots\nimage: x@sha256:" +
                                  std::string(64, 'f') + "\n");
  WriteFile(tmp / "m/b.yaml", "name: b\nversion: \"1\"\nimage: nginx\nupdate: {max_surge: many}\n");
  RunResult r = Run({BinPath("kilnctl"), "validate", (tmp / "m").string()});
  CHECK(r.exit_code == 1);
  std::string a = (tmp / "m/a.yaml").string(), b = (tmp / "m/b.yaml").string();
  CHECK(r.err.find(a + ":3:11: replicas: expected an integer, got \"lots\"\n") !=
        std::string::npos);
  CHECK(r.err.find(b + ":3:8: image: must be pinned by digest") != std::string::npos);
  CHECK(r.err.find(b + ":4:21: update.max_surge: expected a count or a percentage, got \"many\"") !=
        std::string::npos);
  CHECK(r.err.find("kilnctl: 3 errors in 2 places") != std::string::npos);
}

TEST_CASE("kilnctl validate -o json on invalid UTF-8 prints JSON with the error", "[kilnctl]") {
  TempDir tmp;
  WriteFile(tmp / "m/a.yaml",
            "name: a\nversion: \"1\xff\"\nimage: x@sha256:" + std::string(64, 'f') + "\n");
  WriteFile(tmp / "m/\xfe.yaml", "name: b\n");
  RunResult r = Run({BinPath("kilnctl"), "-o", "json", "validate", (tmp / "m").string()});
  INFO(r.err);
  CHECK(r.exit_code == 1);
  nlohmann::json doc = nlohmann::json::parse(r.out);  // throws (fails) when it is not JSON
  REQUIRE(doc["errors"].size() == 2);
  CHECK(doc["errors"][0]["error"] ==
        (tmp / "m/a.yaml").string() +
            ":2:12: invalid UTF-8: byte 0xFF is not part of a valid character; manifests are UTF-8 "
            "text");
  CHECK(doc["errors"][1]["file"] == (tmp / "m/\xef\xbf\xbd.yaml").string());
}

TEST_CASE("kilnctl validate on a missing directory fails clearly", "[kilnctl]") {
  TempDir tmp;
  RunResult r = Run({BinPath("kilnctl"), "validate", (tmp / "nope").string()});
  CHECK(r.exit_code == 1);
  CHECK(r.err.find((tmp / "nope").string() + ": manifest directory does not exist") !=
        std::string::npos);
}

TEST_CASE("kilnctl --version, --help and bad usage", "[kilnctl]") {
  RunResult v = Run({BinPath("kilnctl"), "--version"});
  CHECK(v.exit_code == 0);
  CHECK(v.out.rfind("kilnctl ", 0) == 0);
  RunResult h = Run({BinPath("kilnctl"), "--help"});
  CHECK(h.exit_code == 0);
  CHECK(h.out.find("validate") != std::string::npos);
  RunResult bad = Run({BinPath("kilnctl"), "--bogus", "validate", "x"});
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("--bogus") != std::string::npos);
  RunResult none = Run({BinPath("kilnctl")});
  CHECK(none.exit_code == 2);
}

}  // namespace
}  // namespace kiln::testing
