// kilnd's HTTP server: metrics (checked by promtool), health, /api/v1, limits, and the dashboard
// in a real browser.

#include <array>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/integration/process.h"

namespace kiln::testing {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

using Reply = HttpReply;

// `extra_header_value` pads the request with an X-Padding header (for the header size limit).
Reply Request(int port, const std::string& target, http::verb method = http::verb::get,
              const std::string& extra_header_value = "") {
  HttpHeaders headers;
  if (!extra_header_value.empty()) headers.push_back({"X-Padding", extra_header_value});
  return HttpRequest(port, target, method, headers);
}

struct HttpFixture {
  explicit HttpFixture(const std::vector<std::string>& extra = {}) {
    h.Declare("web", "1.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
    h.Start(extra);
    REQUIRE(h.WaitReady());
    port = h.HttpPort();
    REQUIRE(port > 0);
    REQUIRE(WaitFor(
        [&] { return h.Healthy("web") == 2 && h.HasEvent("web", EventKind::kRolloutCompleted); }));
  }
  KilndHarness h;
  int port = 0;
};

TEST_CASE("health and readiness say which check failed", "[http]") {
  HttpFixture f;
  Reply alive = Request(f.port, "/healthz");
  CHECK(alive.status == 200);
  CHECK(nlohmann::json::parse(alive.body)["status"] == "alive");
  Reply ready = Request(f.port, "/readyz");
  CHECK(ready.status == 200);
  auto j = nlohmann::json::parse(ready.body);
  CHECK(j["ready"] == true);
  CHECK(j["checks"]["store_writable"]["ok"] == true);
  CHECK(j["checks"]["manifests_loaded"]["ok"] == true);
  CHECK(j["checks"]["reconciler_responsive"]["ok"] == true);
}

TEST_CASE("metrics pass promtool and count what happened", "[http]") {
  HttpFixture f;
  // A gRPC call, so its counter has a series.
  RunResult st = Run({BinPath("kilnctl"), "--addr", f.h.UnixAddr(), "status"});
  REQUIRE(st.exit_code == 0);
  Reply m = Request(f.port, "/metrics");
  REQUIRE(m.status == 200);
  const std::string info_line =
      "kiln_service_info{service=\"web\",desired_revision=\"1\",pinned_revision=\"0\","
      "target_revision=\"1\",version=\"1.0\",pinned_by=\"\"} 1";
  CHECK(m.content_type.rfind("text/plain; version=0.0.4", 0) == 0);
  for (const char* needle :
       {"kiln_build_info{version=\"",
        "kiln_instances{service=\"web\",revision=\"1\",state=\"healthy\"} 2",
        "kiln_reconcile_passes_total{result=\"ok\"}",
        "kiln_reconcile_duration_seconds_bucket{le=\"+Inf\"}",
        "kiln_rollouts_total{service=\"web\",result=\"completed\"} 1",
        "kiln_rollouts_started_total{service=\"web\"} 1",
        "kiln_instance_starts_total{service=\"web\"} 2",
        "kiln_probes_total{service=\"web\",result=\"ok\"}",
        "kiln_service_desired_replicas{service=\"web\"} 2",
        "kiln_service_available_replicas{service=\"web\"} 2",
        "kiln_service_live_instances{service=\"web\",state=\"healthy\"} 2",
        "kiln_service_live_instances{service=\"web\",state=\"starting\"} 0",
        "kiln_service_paused{service=\"web\"} 0",
        "kiln_service_pinned{service=\"web\"} 0",
        info_line.c_str(),
        "kiln_service_rollout_state{service=\"web\",state=\"completed\"} 1",
        "kiln_service_rollout_state{service=\"web\",state=\"failed\"} 0",
        "kiln_service_rollout_seconds_since_progress{service=\"web\"} 0",
        "kiln_service_condition{service=\"web\",condition=\"Available\"} 1",
        "kiln_store_writable 1",
        "kiln_manifest_errors 0",
        "kiln_workqueue_wait_seconds_count ",
        "kiln_workqueue_depth ",
        "kiln_workqueue_retries_total ",
        "kiln_store_commit_duration_seconds_count ",
        "kiln_grpc_requests_total{method=\"/kiln.v1.Kiln/ListServices\",code=\"OK\"} 1",
        "# TYPE kiln_manifest_errors_total counter",
        "# TYPE kiln_probe_failures_total counter",
        "# TYPE kiln_driver_errors_total counter",
        "# TYPE kiln_rollbacks_total counter"}) {
    INFO(needle);
    CHECK(m.body.find(needle) != std::string::npos);
  }
  WriteFile(f.h.tmp() / "metrics.txt", m.body);
  RunResult promtool =
      Run({"/bin/sh", "-c", "promtool check metrics < " + (f.h.tmp() / "metrics.txt").string()});
  INFO(promtool.out << promtool.err);
  CHECK(promtool.exit_code == 0);
}

TEST_CASE("metrics show a failed rollout and the automatic rollback that pinned it", "[http]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  h.Declare("web", "1.0", 1, policy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  h.Declare("web", "2.0", 1, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor(
      [&] {
        auto s = h.Service("web");
        return s.ok() && s->pinned_revision > 0;
      },
      60s));
  Reply m;
  // The pass that pinned it has committed; what /metrics reads follows.
  REQUIRE(WaitFor([&] {
    m = Request(h.HttpPort(), "/metrics");
    return m.body.find("pinned_by=\"automatic\"") != std::string::npos;
  }));
  const std::string pinned_line =
      "kiln_service_info{service=\"web\",desired_revision=\"2\",pinned_revision=\"3\","
      "target_revision=\"3\",version=\"1.0\",pinned_by=\"automatic\"} 1";
  for (const char* needle : {"kiln_rollouts_total{service=\"web\",result=\"failed\"} 1",
                             "kiln_rollbacks_total{service=\"web\",trigger=\"automatic\"} 1",
                             "kiln_probes_total{service=\"web\",result=\"deadline\"}",
                             "kiln_probes_total{service=\"web\",result=\"failed\"}",
                             "kiln_instance_failures_total{service=\"web\",how=\"deadline\"}",
                             "kiln_service_pinned{service=\"web\"} 1", pinned_line.c_str()}) {
    INFO(needle);
    CHECK(m.body.find(needle) != std::string::npos);
  }
  WriteFile(h.tmp() / "metrics.txt", m.body);
  RunResult promtool =
      Run({"/bin/sh", "-c", "promtool check metrics < " + (h.tmp() / "metrics.txt").string()});
  INFO(promtool.out << promtool.err);
  CHECK(promtool.exit_code == 0);
}

TEST_CASE("the JSON API serves what the gRPC API serves", "[http]") {
  HttpFixture f;
  Reply list = Request(f.port, "/api/v1/services");
  REQUIRE(list.status == 200);
  auto services = nlohmann::json::parse(list.body)["services"];
  REQUIRE(services.size() == 1);
  CHECK(services[0]["name"] == "web");
  CHECK(services[0]["available"] == 2);
  Reply one = Request(f.port, "/api/v1/services/web");
  REQUIRE(one.status == 200);
  auto svc = nlohmann::json::parse(one.body)["service"];
  CHECK(svc["instances"].size() == 2);
  CHECK(svc["instances"][0]["state"] == "INSTANCE_STATE_HEALTHY");
  Reply missing = Request(f.port, "/api/v1/services/nope");
  CHECK(missing.status == 404);
  CHECK(nlohmann::json::parse(missing.body)["error"] == "service \"nope\" is not known");
  Reply events = Request(f.port, "/api/v1/events?since=2");
  REQUIRE(events.status == 200);
  auto ev = nlohmann::json::parse(events.body)["events"];
  REQUIRE(!ev.empty());
  CHECK(ev[0]["seq"] == "3");
  CHECK(Request(f.port, "/api/v1/events?since=abc").status == 400);
  // What a client sent comes back in the error, as sent (not decoded); the body stays JSON.
  for (const char* target : {"/api/v1/events?since=a%0A%22%FF\\b", "/nope%0A%FF"}) {
    Reply bad = Request(f.port, target);
    CHECK((bad.status == 400 || bad.status == 404));
    CHECK_NOTHROW(nlohmann::json::parse(bad.body).at("error").get<std::string>());
  }
}

TEST_CASE("endpoints: where each instance is reached, over HTTP and kilnctl", "[http]") {
  HttpFixture f;
  Reply one = Request(f.port, "/api/v1/services/web");
  REQUIRE(one.status == 200);
  std::set<std::string> ports;
  const nlohmann::json svc = nlohmann::json::parse(one.body)["service"];
  for (const auto& i : svc["instances"]) {
    ports.insert(std::to_string(i["port"].get<int>()));
  }
  REQUIRE(ports.size() == 2);

  Reply eps = Request(f.port, "/api/v1/services/web/endpoints");
  REQUIRE(eps.status == 200);
  auto services = nlohmann::json::parse(eps.body)["services"];
  REQUIRE(services.size() == 1);
  CHECK(services[0]["service"] == "web");
  REQUIRE(services[0]["endpoints"].size() == 2);
  for (const auto& e : services[0]["endpoints"]) {
    CHECK(e["host"] == "127.0.0.1");
    CHECK(ports.count(std::to_string(e["port"].get<int>())) == 1);
    CHECK(e["state"] == "ENDPOINT_STATE_READY");
    CHECK(e["revision"] == "1");
    CHECK(e["version"] == "1.0");
  }
  CHECK(Request(f.port, "/api/v1/services/nope/endpoints").status == 404);

  RunResult table = Run({BinPath("kilnctl"), "--addr", f.h.UnixAddr(), "endpoints", "web"});
  INFO(table.err);
  REQUIRE(table.exit_code == 0);
  CHECK(table.out.rfind("SERVICE  INSTANCE  ADDRESS", 0) == 0);
  for (const std::string& port : ports) {
    CHECK(table.out.find("127.0.0.1:" + port + "  ready") != std::string::npos);
  }
  RunResult js = Run({BinPath("kilnctl"), "--addr", f.h.UnixAddr(), "-o", "json", "endpoints"});
  REQUIRE(js.exit_code == 0);
  CHECK(nlohmann::json::parse(js.out)["services"][0]["endpoints"].size() == 2);
}

TEST_CASE("unknown paths are 404, wrong methods 405, huge headers 431", "[http]") {
  HttpFixture f;
  CHECK(Request(f.port, "/nope").status == 404);
  Reply post = Request(f.port, "/metrics", http::verb::post);
  CHECK(post.status == 405);
  CHECK(post.allow == "GET, HEAD");
  CHECK(Request(f.port, "/healthz", http::verb::delete_).status == 405);
  CHECK(Request(f.port, "/healthz", http::verb::get, std::string(20000, 'x')).status == 431);
  Reply head = Request(f.port, "/healthz", http::verb::head);
  CHECK(head.status == 200);
}

// Slow clients and the connection cap: http_security_test.cc.

TEST_CASE("the dashboard shows a rollout live in a real browser", "[http][browser]") {
  HttpFixture f;
  const std::string shots = std::string(KILN_BIN_DIR) + "/../screenshots";
  std::filesystem::create_directories(shots);
  Child browser({"/usr/bin/node", SourcePath("tests/browser/dashboard.mjs"),
                 "http://127.0.0.1:" + std::to_string(f.port) + "/", shots},
                f.h.tmp().path());
  INFO(browser.Stdout() << browser.Stderr());
  REQUIRE(browser.WaitForStdout("READY", 60s));
  f.h.Declare("web", "2.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  CHECK(browser.Wait(90s) == 0);
  CHECK(browser.Stdout().find("UPDATED") != std::string::npos);
  INFO(browser.Stdout() << browser.Stderr());
  CHECK(std::filesystem::exists(shots + "/dashboard-after.png"));
}

TEST_CASE("with --tokens the dashboard takes its token from the link and shows the rollout",
          "[http][browser]") {
  TempDir tokens_dir;
  const std::string token = "viewer-token-0123456789abcdef";
  WriteFile(tokens_dir / "tokens", token + " viewer alice\n");
  HttpFixture f({"--tokens", (tokens_dir / "tokens").string()});
  const std::string shots = std::string(KILN_BIN_DIR) + "/../screenshots/tokens";
  std::filesystem::create_directories(shots);
  // The fragment stays in the browser: the page keeps the token and sends it as a header.
  Child browser({"/usr/bin/node", SourcePath("tests/browser/dashboard.mjs"),
                 "http://127.0.0.1:" + std::to_string(f.port) + "/#token=" + token, shots},
                f.h.tmp().path());
  INFO(browser.Stdout() << browser.Stderr());
  REQUIRE(browser.WaitForStdout("READY", 60s));
  f.h.Declare("web", "2.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  CHECK(browser.Wait(90s) == 0);
  CHECK(browser.Stdout().find("UPDATED") != std::string::npos);
  CHECK(std::filesystem::exists(shots + "/dashboard-after.png"));
}

TEST_CASE("the dashboard shows a stable address with its live pool and a proxy that cannot bind",
          "[http][browser][expose]") {
  // Two ports on 127.0.0.1 the kernel hands out (outside kilnd's --port-range window): one for
  // "web", free; one for "busy", held by a listener here so that kiln-proxy cannot bind it.
  asio::io_context io;
  tcp::acceptor taken(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  const int busy_port = taken.local_endpoint().port();
  int web_port = 0;
  {
    tcp::acceptor probe(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    web_port = probe.local_endpoint().port();
  }
  // A long drain: the connection held across the rollout keeps its instance draining until the
  // page has shown it.
  const std::string web_expose = "expose: {port: " + std::to_string(web_port) + ", drain: 60s}\n";
  KilndHarness h;
  h.SetExtraYaml("expose: {listen: \"127.0.0.1:" + std::to_string(busy_port) + "\"}\n");
  h.Declare("busy", "1.0", 1, "{strategy: rolling}");
  h.SetExtraYaml(web_expose);
  h.Declare("web", "1.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  h.Start();
  REQUIRE(h.WaitReady());
  const int port = h.HttpPort();
  REQUIRE(port > 0);
  const std::string shots = std::string(KILN_BIN_DIR) + "/../screenshots/expose";
  std::filesystem::create_directories(shots);
  Child browser({"/usr/bin/node", SourcePath("tests/browser/dashboard.mjs"),
                 "http://127.0.0.1:" + std::to_string(port) + "/", shots,
                 "127.0.0.1:" + std::to_string(web_port), "busy", "drain"},
                h.tmp().path());
  INFO(browser.Stdout() << browser.Stderr());
  REQUIRE(browser.WaitForStdout("READY", 90s));
  // A connection through the address, open across the rollout: its instance drains with it.
  tcp::socket held(io);
  held.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(web_port)));
  // A request and its reply prove it reaches an instance (keep-alive: it stays open).
  const std::string request = "GET / HTTP/1.1\r\nHost: web\r\n\r\n";
  asio::write(held, asio::buffer(request));
  std::array<char, 512> reply{};
  const size_t got = held.read_some(asio::buffer(reply));
  REQUIRE(std::string_view(reply.data(), got).starts_with("HTTP/1.1 200"));
  h.Declare("web", "2.0", 2, "{strategy: rolling, max_surge: 1, max_unavailable: 0}");
  if (!browser.WaitForStdout("DRAINING", 60s)) FAIL(browser.Stdout() << browser.Stderr());
  held.close();
  CHECK(browser.Wait(90s) == 0);
  CHECK(browser.Stdout().find("UPDATED") != std::string::npos);
  INFO(browser.Stdout() << browser.Stderr());
  CHECK(std::filesystem::exists(shots + "/dashboard-after.png"));
}

}  // namespace
}  // namespace kiln::testing
