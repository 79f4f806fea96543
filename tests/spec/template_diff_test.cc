#include "spec/template_diff.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

std::vector<std::string> Lines(const std::vector<FieldChange>& changes) {
  std::vector<std::string> out;
  out.reserve(changes.size());
  for (const FieldChange& c : changes) out.push_back(c.ToString());
  return out;
}

Template Web() {
  Template t;
  t.version = "1.4.2";
  t.artifact_sha256 = std::string(64, 'a');
  t.command = {"{artifact}", "--port", "{port}"};
  t.env = {{"LOG_LEVEL", "info"}, {"REGION", "eu"}};
  t.health.kind = ProbeKind::kHttp;
  t.health.http_path = "/healthz";
  return t;
}

TEST_CASE("DiffTemplates of equal templates is empty", "[template_diff]") {
  CHECK(DiffTemplates(Web(), Web()).empty());
}

TEST_CASE("DiffTemplates lists version env and health in manifest order", "[template_diff]") {
  Template a = Web();
  Template b = Web();
  b.version = "1.5.0";
  b.env["LOG_LEVEL"] = "debug";
  b.env.erase("REGION");
  b.env["ADDED"] = "with space";
  b.health.http_path = "/ready";
  b.health.interval = Duration(2500);
  CHECK(Lines(DiffTemplates(a, b)) == std::vector<std::string>{
                                          "version: 1.4.2 \u2192 1.5.0",
                                          "env.ADDED: (unset) \u2192 \"with space\"",
                                          "env.LOG_LEVEL: info \u2192 debug",
                                          "env.REGION: eu \u2192 (unset)",
                                          "health.http.path: /healthz \u2192 /ready",
                                          "health.interval: 1s \u2192 2s500ms",
                                      });
  const auto changes = DiffTemplates(a, b);
  CHECK(changes[1].added());
  CHECK(changes[3].removed());
  CHECK_FALSE(changes[0].added());
}

TEST_CASE("DiffTemplates of a probe of another kind names both kinds' fields", "[template_diff]") {
  Template a = Web();
  Template b = Web();
  b.health.kind = ProbeKind::kTcp;
  b.health.port = 9000;
  CHECK(Lines(DiffTemplates(a, b)) == std::vector<std::string>{
                                          "health.http.path: /healthz \u2192 (unset)",
                                          "health.http.port: 0 \u2192 (unset)",
                                          "health.tcp.port: (unset) \u2192 9000",
                                      });
  b.health.kind = ProbeKind::kNone;
  CHECK(Lines(DiffTemplates(a, b)).front() == "health: (unset) \u2192 none");
}

TEST_CASE("DiffTemplates shows commands as lists and images in full", "[template_diff]") {
  Template a;
  a.version = "1";
  a.image = "nginx@sha256:" + std::string(64, 'b');
  a.command = {"nginx", "-g", "daemon off;"};
  Template b = a;
  b.image = "nginx@sha256:" + std::string(64, 'c');
  b.command = {"nginx"};
  b.port = 80;
  CHECK(Lines(DiffTemplates(a, b)) == std::vector<std::string>{
                                          "image: nginx@sha256:" + std::string(64, 'b') +
                                              " \u2192 nginx@sha256:" + std::string(64, 'c'),
                                          "command: [nginx, -g, \"daemon off;\"] \u2192 [nginx]",
                                          "port: (unset) \u2192 80",
                                      });
}

TEST_CASE("DiffServiceSpecs adds replicas update history_limit and expose after the template",
          "[template_diff]") {
  ServiceSpec a;
  a.name = "web";
  a.tmpl = Web();
  ServiceSpec b = a;
  b.tmpl.version = "2";
  b.replicas = 3;
  b.update.strategy = Strategy::kCanary;
  b.update.max_surge = {1, false};
  b.history_limit = 5;
  b.expose = ExposeSpec{.port = 8080};
  b.file = "elsewhere.yaml";  // where it is declared is not part of the diff
  b.line = 7;
  CHECK(Lines(DiffServiceSpecs(a, b)) == std::vector<std::string>{
                                             "version: 1.4.2 \u2192 2",
                                             "replicas: 1 \u2192 3",
                                             "update.strategy: rolling \u2192 canary",
                                             "update.max_surge: 25% \u2192 1",
                                             "update.canary: (unset) \u2192 1",
                                             "update.auto_promote: (unset) \u2192 false",
                                             "history_limit: 10 \u2192 5",
                                             "expose: none \u2192 (unset)",
                                             "expose.listen: (unset) \u2192 127.0.0.1:8080",
                                             "expose.drain: (unset) \u2192 10s",
                                         });
  CHECK(DiffServiceSpecs(b, b).empty());
}

TEST_CASE("DiffValue quotes only what would be ambiguous", "[template_diff]") {
  CHECK(DiffValue("debug") == "debug");
  CHECK(DiffValue("") == "\"\"");
  CHECK(DiffValue("a b") == "\"a b\"");
  CHECK(DiffValue("tab\there") == "\"tab\\there\"");
  CHECK(DiffValue("say \"hi\"") == "\"say \\\"hi\\\"\"");
}

}  // namespace
}  // namespace kiln
