// monitoring/ against the real things: a real Prometheus scraping a real kilnd through a failed
// rollout answers every expression of the Grafana dashboard and the alert rules; a webhook
// receiver on loopback gets a real rollout failure's notification, signed, after a retry.

#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>

#include "common/url.h"
#include "daemon/notifier.h"
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

// The prometheus executable's path, "" when it (or promtool) is not installed.
std::string PrometheusPath() {
  RunResult r = Run({"/bin/sh", "-c", "command -v promtool >/dev/null && command -v prometheus"});
  std::string path = r.exit_code == 0 ? r.out : "";
  while (!path.empty() && std::isspace(static_cast<unsigned char>(path.back()))) path.pop_back();
  return path;
}

// Every PromQL expression of the Grafana dashboard, with its variables as Grafana would fill
// them for "All" services.
std::vector<std::string> DashboardExpressions() {
  std::ifstream in(SourcePath("monitoring/grafana/kiln.json"));
  const nlohmann::json dash = nlohmann::json::parse(in);
  std::vector<std::string> out;
  auto fill = [](std::string e) {
    for (auto [var, value] :
         {std::pair<std::string, std::string>{"$__rate_interval", "1m"}, {"$service", ".*"}}) {
      for (size_t at = e.find(var); at != std::string::npos; at = e.find(var)) {
        e.replace(at, var.size(), value);
      }
    }
    return e;
  };
  for (const auto& panel : dash["panels"]) {
    if (!panel.contains("targets")) continue;
    for (const auto& t : panel["targets"]) out.push_back(fill(t["expr"].get<std::string>()));
  }
  for (const auto& a : dash["annotations"]["list"])
    out.push_back(fill(a["expr"].get<std::string>()));
  return out;
}

struct Prometheus {
  Prometheus(const std::filesystem::path& dir, int kilnd_http_port) {
    std::filesystem::create_directories(dir / "data");
    const std::filesystem::path config = dir / "prometheus.yml";
    WriteFile(config,
              "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
              "rule_files: [\"" +
                  SourcePath("monitoring/prometheus/kiln-alerts.yml") +
                  "\"]\n"
                  "scrape_configs:\n"
                  "  - job_name: kiln\n"
                  "    static_configs: [{targets: [\"127.0.0.1:" +
                  std::to_string(kilnd_http_port) + "\"]}]\n");
    port = FreePort();
    child = std::make_unique<Child>(
        std::vector<std::string>{PrometheusPath(), "--config.file=" + config.string(),
                                 "--storage.tsdb.path=" + (dir / "data").string(),
                                 "--web.listen-address=127.0.0.1:" + std::to_string(port)},
        dir);
  }
  // The query's result (an instant vector), or an error line.
  StatusOr<nlohmann::json> Query(const std::string& expr) const {
    HttpReply r = HttpRequest(port, "/api/v1/query?query=" + UrlEncode(expr));
    if (r.status == 0) return UnavailableError("prometheus did not answer");
    nlohmann::json j = nlohmann::json::parse(r.body, nullptr, false);
    if (j.is_discarded() || j.value("status", "") != "success") {
      return InvalidArgumentError("HTTP " + std::to_string(r.status) + ": " + r.body);
    }
    return j["data"]["result"];
  }
  bool HasData(const std::string& expr) const {
    StatusOr<nlohmann::json> r = Query(expr);
    return r.ok() && !r->empty();
  }
  int port = 0;
  std::unique_ptr<Child> child;
};

TEST_CASE("a real Prometheus answers every dashboard and alert expression", "[monitoring]") {
  if (PrometheusPath().empty()) {
    WARN("SKIPPED: prometheus or promtool is not installed (Debian package prometheus)");
    return;
  }
  KilndHarness h;
  const int expose_port = FreePort();
  h.SetExtraYaml("expose: {port: " + std::to_string(expose_port) + ", drain: 1s}\n");
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  h.Declare("web", "1.0", 2, policy);
  // A webhook nobody answers: the notification counters have series.
  h.Start({"--notify", "http://127.0.0.1:" + std::to_string(FreePort()) + "/hook"});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  Prometheus prom(h.tmp() / "prometheus", h.HttpPort());
  REQUIRE(prom.child->WaitForStderr("Server is ready to receive web requests", 60s));
  REQUIRE(WaitFor([&] { return prom.HasData("kiln_service_desired_replicas"); }, 60s));

  // Traffic through the proxy, a gRPC call, a broken manifest and a rollout that fails and is
  // rolled back automatically.
  REQUIRE(WaitFor([&] { return HttpRequest(expose_port, "/healthz").status == 200; }, 30s));
  for (int i = 0; i < 5; ++i) CHECK(HttpRequest(expose_port, "/healthz").status == 200);
  REQUIRE(Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status"}).exit_code == 0);
  WriteFile(h.manifests() / "broken.yaml", "name: [\n");
  h.Declare("web", "2.0", 2, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor(
      [&] {
        auto s = h.Service("web");
        return s.ok() && s->pinned_revision > 0;
      },
      60s));
  // Prometheus has scraped the pinned state and, later, enough samples for the rates.
  REQUIRE(WaitFor([&] { return prom.HasData("kiln_service_info{pinned_by=\"automatic\"} == 1"); },
                  60s));
  REQUIRE(WaitFor([&] { return prom.HasData("kiln_manifest_errors > 0"); }, 60s));
  REQUIRE(
      WaitFor([&] { return prom.HasData("increase(kiln_proxy_connections_total[1m]) > 0"); }, 60s));

  const std::vector<std::string> dashboard = DashboardExpressions();
  CHECK(dashboard.size() > 25);
  for (const std::string& expr : dashboard) {
    INFO("dashboard: " << expr);
    StatusOr<nlohmann::json> r = prom.Query(expr);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    // A counter born late in the test (the rollback's) needs two scrapes before a rate.
    CHECK(WaitFor([&] { return prom.HasData(expr); }, 20s));
  }

  // The rules as Prometheus loaded them: every one parsed, evaluates without error, and those
  // whose situation this test made return data.
  HttpReply rules = HttpRequest(prom.port, "/api/v1/rules");
  REQUIRE(rules.status == 200);
  std::map<std::string, std::string> queries;
  REQUIRE(WaitFor([&] {
    const nlohmann::json j = nlohmann::json::parse(HttpRequest(prom.port, "/api/v1/rules").body);
    queries.clear();
    bool evaluated = true;
    for (const auto& g : j["data"]["groups"]) {
      for (const auto& r : g["rules"]) {
        queries[r["name"].get<std::string>()] = r["query"].get<std::string>();
        evaluated = evaluated && r.value("health", "") == "ok";
      }
    }
    return evaluated && !queries.empty();
  }));
  CHECK(queries.size() == 8);
  const std::set<std::string> made = {"KilnRolloutFailed", "KilnPinnedByAutomaticRollback",
                                      "KilnManifestErrors"};
  for (const auto& [name, expr] : queries) {
    INFO("rule " << name << ": " << expr);
    StatusOr<nlohmann::json> r = prom.Query(expr);
    REQUIRE(r.ok());
    if (made.count(name)) CHECK(!r->empty());
  }
  for (const std::string& name : made) CHECK(queries.count(name) == 1);
}

// A webhook receiver on loopback: answers 500 to the first request, 200 to the rest, and keeps
// what it got. Given a certificate and key (PEM files), it speaks HTTPS.
class Receiver {
 public:
  struct Request {
    std::string target, body, signature, content_type;
  };
  explicit Receiver(const std::string& cert = "", const std::string& key = "")
      : acceptor_(io_, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)) {
    if (!cert.empty()) {
      tls_.emplace(asio::ssl::context::tls_server);
      tls_->use_certificate_chain_file(cert);
      tls_->use_private_key_file(key, asio::ssl::context::pem);
    }
    acceptor_.non_blocking(true);
    thread_ = std::thread([this] { Serve(); });
  }
  ~Receiver() {
    stop_ = true;
    thread_.join();
  }
  int port() const { return acceptor_.local_endpoint().port(); }
  std::vector<Request> Got() const {
    std::lock_guard lock(mu_);
    return got_;
  }

 private:
  void Serve() {
    while (!stop_) {
      beast::error_code ec;
      tcp::socket socket(io_);
      acceptor_.accept(socket, ec);
      if (ec) {
        std::this_thread::sleep_for(10ms);
        continue;
      }
      socket.non_blocking(false);
      if (!tls_) {
        Answer(socket);
        continue;
      }
      asio::ssl::stream<tcp::socket&> stream(socket, *tls_);
      stream.handshake(asio::ssl::stream_base::server, ec);
      if (!ec) Answer(stream);  // a client that refused the certificate ends the handshake
    }
  }
  template <typename Stream>
  void Answer(Stream& stream) {
    beast::error_code ec;
    beast::flat_buffer buffer;
    http::request<http::string_body> req;
    http::read(stream, buffer, req, ec);
    if (ec) return;
    bool first = false;
    {
      std::lock_guard lock(mu_);
      got_.push_back({std::string(req.target()), req.body(), std::string(req["X-Kiln-Signature"]),
                      std::string(req[http::field::content_type])});
      first = got_.size() == 1;
    }
    http::response<http::string_body> res{
        first ? http::status::internal_server_error : http::status::ok, 11};
    res.body() = first ? "not now" : "ok";
    res.prepare_payload();
    http::write(stream, res, ec);
  }
  asio::io_context io_;
  std::optional<asio::ssl::context> tls_;
  tcp::acceptor acceptor_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;  // guards got_
  std::vector<Request> got_;
  std::thread thread_;
};

TEST_CASE("a failed rollout is notified to a webhook signed and after a retry", "[notify]") {
  Receiver receiver;
  KilndHarness h;
  const std::filesystem::path secret = h.tmp() / "secret";
  WriteFile(secret, "s3cret-for-the-hook\n");
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  h.Declare("web", "1.0", 1, policy);
  h.Declare("other", "1.0", 1, policy);
  h.Start({"--notify", "http://127.0.0.1:" + std::to_string(receiver.port()) + "/kiln-hook",
           "--notify-on", "rollout_failed", "--notify-service", "web", "--notify-secret-file",
           secret.string()});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1 && h.Healthy("other") == 1; }));
  h.Declare("web", "2.0", 1, policy, ", \"--unhealthy-after\", \"0s\"");
  h.Declare("other", "2.0", 1, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor([&] { return h.HasEvent("other", EventKind::kRolloutFailed); }, 60s));
  // The first attempt got a 500; the retry (after backoff) is the second request.
  REQUIRE(WaitFor([&] { return receiver.Got().size() >= 2; }, 30s));
  const std::vector<Receiver::Request> got = receiver.Got();
  CHECK(got.size() == 2);  // one rollout failure of web; none of other (filtered)
  for (const auto& r : got) {
    CHECK(r.target == "/kiln-hook");
    CHECK(r.content_type == "application/json");
    CHECK(r.signature == NotificationSignature("s3cret-for-the-hook", r.body));
    CHECK(r.signature != NotificationSignature("another secret", r.body));
    const nlohmann::json j = nlohmann::json::parse(r.body);
    CHECK(j["service"] == "web");
    CHECK(j["kind"] == "rollout_failed");
    CHECK(j["revision"] == 2);
    CHECK(j["version"] == "2.0");
    CHECK(j["actor"] == "kilnd");
    CHECK(!j["message"].get<std::string>().empty());
    CHECK(j["time"].get<std::string>().size() == 24);
    CHECK(j["dashboard"] == "http://127.0.0.1:" + std::to_string(h.HttpPort()) + "/");
  }
  CHECK(got[0].body == got[1].body);
  HttpReply m;
  REQUIRE(WaitFor([&] {
    m = HttpRequest(h.HttpPort(), "/metrics");
    return m.body.find("kiln_notifications_total{result=\"delivered\"} 1") != std::string::npos;
  }));
  CHECK(m.body.find("kiln_notifications_total{result=\"retried\"} 1") != std::string::npos);
  CHECK(m.body.find("kiln_notifications_total{result=\"dropped\"} 0") != std::string::npos);
}

// SSL_CERT_FILE for the scope: the trust store OpenSSL's default paths load.
class TrustOnly {
 public:
  explicit TrustOnly(const std::string& pem) { ::setenv("SSL_CERT_FILE", pem.c_str(), 1); }
  ~TrustOnly() { ::unsetenv("SSL_CERT_FILE"); }
  TrustOnly(const TrustOnly&) = delete;
  TrustOnly& operator=(const TrustOnly&) = delete;
};

TEST_CASE("https webhooks verify the receiver's certificate against the trust store", "[notify]") {
  TempDir tmp;
  // The receiver's certificate names 127.0.0.1; `other` is a certificate nobody signed it with.
  for (const std::string name : {"receiver", "other"}) {
    RunResult made = Run(
        {"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=kiln test " + name, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
         (tmp.path() / (name + ".key")).string(), "-out", (tmp.path() / (name + ".pem")).string()});
    INFO(made.err);
    REQUIRE(made.exit_code == 0);
  }
  Receiver receiver((tmp.path() / "receiver.pem").string(), (tmp.path() / "receiver.key").string());
  const std::string url = "https://127.0.0.1:" + std::to_string(receiver.port()) + "/hook";
  EventRecord e{.time_ms = 1'700'000'000'000,
                .kind = EventKind::kRolloutFailed,
                .service = "web",
                .revision = 2,
                .actor = "kilnd",
                .message = "rollout to revision 2 failed"};
  auto options = [&](Metrics& metrics) {
    Notifier::Options o;
    o.urls = {*ParseWebhookUrl(url)};
    o.kinds = {EventKind::kRolloutFailed};
    o.secret = "s";
    o.attempts = 2;
    o.first_backoff = 50ms;
    o.metrics = &metrics;
    return o;
  };
  {
    // Trusting another certificate only: every attempt fails at the handshake, nothing arrives.
    TrustOnly trust((tmp.path() / "other.pem").string());
    Metrics metrics;
    Notifier notifier(options(metrics));
    notifier.Notify(e, "2.0");
    REQUIRE(WaitFor([&] {
      return metrics.ValueForTest("kiln_notifications_total", {{"result", "failed"}}) == 1;
    }));
    CHECK(receiver.Got().empty());
  }
  {
    TrustOnly trust((tmp.path() / "receiver.pem").string());
    Metrics metrics;
    Notifier notifier(options(metrics));
    notifier.Notify(e, "2.0");
    // The receiver answers 500 first: the retry is delivered.
    REQUIRE(WaitFor([&] {
      return metrics.ValueForTest("kiln_notifications_total", {{"result", "delivered"}}) == 1;
    }));
    const std::vector<Receiver::Request> got = receiver.Got();
    REQUIRE(got.size() == 2);
    CHECK(got[1].target == "/hook");
    CHECK(got[1].signature == NotificationSignature("s", got[1].body));
    CHECK(nlohmann::json::parse(got[1].body)["version"] == "2.0");
  }
}

TEST_CASE("notification signatures are HMAC-SHA256 and flags parse strictly", "[notify]") {
  // RFC 4231, test case 2.
  CHECK(NotificationSignature("Jefe", "what do ya want for nothing?") ==
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  StatusOr<WebhookUrl> url = ParseWebhookUrl("http://hooks.internal:8081/a/b?c=d");
  REQUIRE(url.ok());
  CHECK(url->host == "hooks.internal");
  CHECK(url->port == "8081");
  CHECK(url->target == "/a/b?c=d");
  url = ParseWebhookUrl("http://hooks.internal");
  REQUIRE(url.ok());
  CHECK(url->port == "80");
  CHECK(url->target == "/");
  url = ParseWebhookUrl("https://hooks.internal/x");
  REQUIRE(url.ok());
  CHECK(url->tls);
  CHECK(url->port == "443");
  CHECK(!ParseWebhookUrl("ftp://hooks.internal/x").ok());
  CHECK(!ParseWebhookUrl("hooks.internal/x").ok());
  CHECK(!ParseWebhookUrl("http://:80/x").ok());
  CHECK(!ParseWebhookUrl("http://h:8x/").ok());
  StatusOr<std::set<EventKind>> kinds = ParseNotifyKinds("rollout_failed,rolled_back");
  REQUIRE(kinds.ok());
  CHECK(*kinds == std::set<EventKind>{EventKind::kRolloutFailed, EventKind::kRolledBack});
  CHECK(!ParseNotifyKinds("rollout_failed,nope").ok());
  CHECK(!ParseNotifyKinds(",").ok());
}

TEST_CASE("kilnd refuses notification flags it cannot honour", "[notify]") {
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--notify", "https://hooks.example/x"},
        {"--notify", "http://127.0.0.1:9/x", "--notify-on", "rollout_failed,no_such_kind"},
        {"--notify-on", "rollout_failed"},
        {"--notify", "http://127.0.0.1:9/x", "--notify-secret-file", "/nonexistent/secret"}}) {
    KilndHarness h;
    h.Start(flags);
    INFO(flags[1]);
    CHECK(h.kilnd().Wait(30s) != 0);
    CHECK(!h.kilnd().Stderr().empty());
  }
}

}  // namespace
}  // namespace kiln::testing
