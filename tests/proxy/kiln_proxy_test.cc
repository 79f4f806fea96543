// The kiln-proxy binary through the real path: a real process, fed over gRPC by a fake kilnd
// (tests/proxy/fake_kiln.h), forwarding to echo backends on loopback, seen from the outside:
// the bytes clients get back, the reports kilnd receives, its log, its exit code.

#include <signal.h>
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "proxy/endpoints_file.h"
#include "tests/integration/process.h"
#include "tests/proxy/fake_kiln.h"
#include "tests/proxy/proxy_test_util.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::BinPath;
using testing::Child;
using testing::EchoBackend;
using testing::EndpointAt;
using testing::Eventually;
using testing::Exposed;
using testing::FakeKiln;
using testing::ReportedEndpoint;
using testing::ReportedRoute;
using testing::Request;
using testing::TempDir;

// Ports of this test process's window (tests/test_util.h): no other test uses them meanwhile,
// and, below the ephemeral range, a reconnect to a stopped fake kilnd cannot connect to itself.
int NextPort() {
  static int next = 0;
  return testing::PortWindow() + next++;
}

std::unique_ptr<Child> StartProxy(const TempDir& dir, std::vector<std::string> args) {
  args.insert(args.begin(), BinPath("kiln-proxy"));
  args.emplace_back("--log-level=debug");
  return std::make_unique<Child>(args, dir.path());
}

size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

// True when every one of `n` requests through `port` is answered by `backend`.
bool AllAnsweredBy(int port, const std::string& backend, int n = 10) {
  for (int i = 0; i < n; ++i) {
    std::optional<std::string> who = Request(port, "ping" + std::to_string(i));
    if (who != backend) {
      UNSCOPED_INFO("request " << i << " answered by " << who.value_or("(failed)"));
      return false;
    }
  }
  return true;
}

// A report of snapshot `version` (of `kilnd_id`) in which `service` listens on `port`.
std::function<bool(const v1::ProxyReport&)> Serving(const std::string& kilnd_id, uint64_t version,
                                                    const std::string& service, int port) {
  return [=](const v1::ProxyReport& r) {
    std::optional<v1::ProxyRoute> route = ReportedRoute(r, service);
    return r.kilnd_id() == kilnd_id && r.version() == version && route &&
           route->bound_port() == port;
  };
}

TEST_CASE("kiln-proxy forwards to READY endpoints only and reports open connections",
          "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a"), b("b"), c("c");
  FakeKiln kiln("k1", NextPort());
  const int web = NextPort();
  const uint64_t ver1 = kiln.Publish({
      Exposed("web", web,
              {EndpointAt("a", a.port()), EndpointAt("b", b.port(), v1::ENDPOINT_STATE_NOT_READY),
               EndpointAt("c", c.port(), v1::ENDPOINT_STATE_DRAINING)}),
      // No `expose:`: no stable address.
      [&] {
        v1::ServiceEndpoints s;
        s.set_service("internal");
        *s.add_endpoints() = EndpointAt("a", a.port());
        return s;
      }(),
  });
  testing::WriteFile(dir / "token", "  secret-token \nsecond line\n");
  auto proxy = StartProxy(
      dir, {"--kilnd", kiln.target(), "--id", "proxy-1", "--token-file", (dir / "token").string()});

  std::optional<v1::ProxyReport> report = kiln.WaitForReport(Serving("k1", ver1, "web", web));
  INFO(proxy->Stderr());
  REQUIRE(report);
  CHECK(report->proxy() == "proxy-1");
  CHECK(report->started_unix_ms() > 0);
  REQUIRE(report->routes_size() == 1);  // "internal" has no listener
  const v1::ProxyRoute& route = report->routes(0);
  CHECK(route.listen_host() == "127.0.0.1");
  CHECK(route.listen_port() == web);
  CHECK(route.bind_error().empty());
  REQUIRE(route.endpoints_size() == 1);
  CHECK(route.endpoints(0).instance() == "a");
  CHECK(route.endpoints(0).port() == a.port());
  CHECK(route.endpoints(0).state() == v1::PROXY_ENDPOINT_STATE_ACTIVE);
  std::vector<FakeKiln::Watch> watches = kiln.Watches();
  REQUIRE(!watches.empty());
  CHECK(watches[0].authorization == "Bearer secret-token");
  CHECK(watches[0].request.kilnd_id().empty());
  CHECK(watches[0].request.after_version() == 0);

  CHECK(AllAnsweredBy(web, "a", 20));
  CHECK(b.accepted() == 0);
  CHECK(c.accepted() == 0);

  // A connection held open counts on its endpoint...
  UniqueFd held = testing::Connect(web);
  REQUIRE(held);
  REQUIRE(testing::SendAll(held.get(), "hold"));
  REQUIRE(testing::ReadExactly(held.get(), 4) == "hold");
  CHECK(kiln.WaitForReport([](const v1::ProxyReport& r) {
    auto e = ReportedEndpoint(r, "web", "a");
    return e && e->open_connections() == 1 && e->total_connections() == 21;
  }));

  // ...and once the endpoint leaves the pool it drains: listed as draining while it is open.
  const uint64_t ver2 = kiln.Publish({Exposed(
      "web", web,
      {EndpointAt("a", a.port(), v1::ENDPOINT_STATE_DRAINING), EndpointAt("b", b.port())})});
  report = kiln.WaitForReport([&](const v1::ProxyReport& r) { return r.version() == ver2; });
  REQUIRE(report);
  std::optional<v1::ProxyEndpoint> drained = ReportedEndpoint(*report, "web", "a");
  REQUIRE(drained);
  CHECK(drained->state() == v1::PROXY_ENDPOINT_STATE_DRAINING);
  CHECK(drained->open_connections() == 1);
  std::optional<v1::ProxyEndpoint> joined = ReportedEndpoint(*report, "web", "b");
  REQUIRE(joined);
  CHECK(joined->state() == v1::PROXY_ENDPOINT_STATE_ACTIVE);
  CHECK(AllAnsweredBy(web, "b"));

  // The held connection still works, and when it closes the endpoint has drained.
  REQUIRE(testing::SendAll(held.get(), "more"));
  CHECK(testing::ReadExactly(held.get(), 4) == "more");
  ::shutdown(held.get(), SHUT_WR);
  CHECK(testing::ReadAll(held.get()) == "|a");
  held.reset();
  CHECK(kiln.WaitForReport([&](const v1::ProxyReport& r) {
    auto e = ReportedEndpoint(r, "web", "a");
    return r.version() == ver2 && (!e || e->open_connections() == 0);
  }));
  CHECK(kiln.WaitForReport([&](const v1::ProxyReport& r) {
    auto e = ReportedEndpoint(r, "web", "b");
    return e && e->bytes_in() > 0 && e->bytes_out() > 0 && e->total_connections() == 10;
  }));
}

TEST_CASE("kiln-proxy keeps serving while kilnd is down and resyncs with a new kilnd",
          "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a"), b("b");
  const int web = NextPort();
  auto kiln = std::make_unique<FakeKiln>("k1", NextPort());
  const int kiln_port = kiln->port();
  const uint64_t ver1 = kiln->Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", kiln->target()});
  INFO(proxy->Stderr());
  REQUIRE(kiln->WaitForReport(Serving("k1", ver1, "web", web)));
  REQUIRE(proxy->WaitForStderr("connected to kilnd", 5s));

  kiln.reset();  // kilnd gone: the stream breaks, reports fail, reconnects are refused
  // Back-off from 100 ms to 2 s: about a dozen failed attempts of each call in this time, and
  // requests all the while.
  auto until = std::chrono::steady_clock::now() + 4s;
  int requests = 0;
  while (std::chrono::steady_clock::now() < until) {
    REQUIRE(AllAnsweredBy(web, "a", 1));
    ++requests;
    std::this_thread::sleep_for(50ms);
  }
  CHECK(requests > 20);
  const std::string log = proxy->Stderr();
  // Once per distinct error, not once per retry.
  const size_t failures = Count(log, "call to kilnd failed;");
  CHECK(failures >= 1);
  CHECK(failures <= 4);
  CHECK(proxy->Wait(0ms) == -1);  // still running

  // A new kilnd (new kilnd_id) on the same address: the proxy resyncs to its pools.
  FakeKiln again("k2", kiln_port);
  const uint64_t v = again.Publish({Exposed("web", web, {EndpointAt("b", b.port())})});
  REQUIRE(again.WaitForReport(Serving("k2", v, "web", web)));
  CHECK(AllAnsweredBy(web, "b"));
  std::vector<FakeKiln::Watch> watches = again.Watches();
  REQUIRE(!watches.empty());
  CHECK(watches[0].request.kilnd_id() == "k1");  // resumed from what it had...
  CHECK(watches[0].request.after_version() == ver1);
  CHECK(watches[0].sent >= 1);  // ...and, kilnd being another one, got its whole state
  CHECK(proxy->WaitForStderr("connected to kilnd again", 5s));

  // The next outage is logged again, and the proxy still serves.
  again.Stop();
  CHECK(Eventually([&] { return Count(proxy->Stderr(), "call to kilnd failed;") > failures; }));
  CHECK(AllAnsweredBy(web, "b"));
}

TEST_CASE("kiln-proxy follows kilnd on its unix socket across a kilnd restart", "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a"), b("b");
  const int web = NextPort();
  const fs::path socket = dir / "kiln.sock";
  auto kiln = std::make_unique<FakeKiln>("k1", socket);
  const uint64_t ver1 = kiln->Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", "unix:" + socket.string()});
  INFO(proxy->Stderr());
  REQUIRE(kiln->WaitForReport(Serving("k1", ver1, "web", web)));
  CHECK(AllAnsweredBy(web, "a"));

  kiln.reset();
  REQUIRE(proxy->WaitForStderr("call to kilnd failed;", 5s));
  CHECK(AllAnsweredBy(web, "a"));

  FakeKiln again("k2", socket);
  const uint64_t ver2 = again.Publish({Exposed("web", web, {EndpointAt("b", b.port())})});
  REQUIRE(again.WaitForReport(Serving("k2", ver2, "web", web)));
  CHECK(AllAnsweredBy(web, "b"));
}

TEST_CASE("kiln-proxy keeps serving while kilnd hangs", "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a"), b("b");
  const int web = NextPort();
  FakeKiln kiln("k1", NextPort());
  const uint64_t ver1 = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", kiln.target()});
  INFO(proxy->Stderr());
  REQUIRE(kiln.WaitForReport(Serving("k1", ver1, "web", web)));

  // Calls are accepted and never answered: reports time out, the data plane does not notice.
  kiln.SetHung(true);
  const uint64_t ver2 = kiln.Publish({Exposed("web", web, {EndpointAt("b", b.port())})});
  REQUIRE(proxy->WaitForStderr("DEADLINE_EXCEEDED", 10s));
  CHECK(AllAnsweredBy(web, "a", 20));
  CHECK(proxy->Wait(0ms) == -1);

  kiln.SetHung(false);
  REQUIRE(kiln.WaitForReport(Serving("k1", ver2, "web", web)));
  CHECK(AllAnsweredBy(web, "b"));
  CHECK(proxy->WaitForStderr("connected to kilnd again", 5s));
}

TEST_CASE("kiln-proxy reaches kilnd over TLS with --tls-ca", "[kiln-proxy]") {
  TempDir dir;
  testing::RunResult cert =
      testing::Run({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                    "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", (dir / "key.pem").string(), "-out", (dir / "cert.pem").string()});
  INFO(cert.err);
  REQUIRE(cert.exit_code == 0);
  grpc::SslServerCredentialsOptions tls;
  tls.pem_key_cert_pairs.push_back(
      {testing::ReadFile(dir / "key.pem"), testing::ReadFile(dir / "cert.pem")});
  EchoBackend a("a");
  const int web = NextPort();
  FakeKiln kiln("k1", NextPort(), grpc::SslServerCredentials(tls));
  const uint64_t v = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});

  // Plaintext to a TLS port: refused, logged, nothing served.
  auto plain = StartProxy(dir, {"--kilnd", kiln.target()});
  CHECK(plain->WaitForStderr("call to kilnd failed;", 10s));
  plain->Signal(SIGTERM);
  CHECK(plain->Wait(5s) == 0);
  CHECK(kiln.Reports().empty());

  auto proxy = StartProxy(dir, {"--kilnd", kiln.target(), "--tls-ca", (dir / "cert.pem").string()});
  INFO(proxy->Stderr());
  REQUIRE(kiln.WaitForReport(Serving("k1", v, "web", web)));
  CHECK(AllAnsweredBy(web, "a"));

  // Mutual TLS: kilnd asks for a client certificate signed by its CA (here, the same one).
  tls.pem_root_certs = testing::ReadFile(dir / "cert.pem");
  tls.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  FakeKiln mutual("k2", NextPort(), grpc::SslServerCredentials(tls));
  const uint64_t mv = mutual.Publish({Exposed("api", NextPort(), {EndpointAt("a", a.port())})});
  auto without =
      StartProxy(dir, {"--kilnd", mutual.target(), "--tls-ca", (dir / "cert.pem").string()});
  CHECK(without->WaitForStderr("call to kilnd failed;", 10s));
  without->Signal(SIGTERM);
  CHECK(without->Wait(5s) == 0);
  CHECK(mutual.Reports().empty());
  auto with = StartProxy(
      dir, {"--kilnd", mutual.target(), "--tls-ca", (dir / "cert.pem").string(), "--tls-cert",
            (dir / "cert.pem").string(), "--tls-key", (dir / "key.pem").string()});
  CHECK(mutual.WaitForReport([&](const v1::ProxyReport& r) { return r.version() == mv; }));

  testing::RunResult alone = testing::Run(
      {BinPath("kiln-proxy"), "--kilnd", kiln.target(), "--tls-cert", (dir / "cert.pem").string()});
  CHECK(alone.exit_code == 2);
  CHECK(alone.err.find("--tls-key") != std::string::npos);
}

TEST_CASE("kiln-proxy resumes the stream from the snapshot it applied", "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a"), b("b");
  const int web = NextPort();
  FakeKiln kiln("k1", NextPort());
  const uint64_t ver1 = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", kiln.target()});
  INFO(proxy->Stderr());
  REQUIRE(kiln.WaitForReport(Serving("k1", ver1, "web", web)));

  kiln.EndStreams();
  REQUIRE(kiln.WaitForWatches(2));
  std::this_thread::sleep_for(300ms);
  std::vector<FakeKiln::Watch> watches = kiln.Watches();
  REQUIRE(watches.size() == 2);
  CHECK(watches[1].request.kilnd_id() == "k1");
  CHECK(watches[1].request.after_version() == ver1);
  CHECK(watches[1].sent == 0);  // nothing changed: nothing sent, nothing applied again
  CHECK(Count(proxy->Stderr(), "endpoints applied") == 1);
  CHECK(AllAnsweredBy(web, "a"));

  const uint64_t ver2 = kiln.Publish({Exposed("web", web, {EndpointAt("b", b.port())})});
  REQUIRE(kiln.WaitForReport(Serving("k1", ver2, "web", web)));
  CHECK(kiln.Watches()[1].sent == 1);
  CHECK(AllAnsweredBy(web, "b"));
}

TEST_CASE("kiln-proxy restarted with no kilnd reachable serves the endpoints file",
          "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a");
  const int web = NextPort();
  const fs::path file = dir / "endpoints.json";
  std::string kiln_target;
  {
    FakeKiln kiln("k1", NextPort());
    kiln_target = kiln.target();
    const uint64_t v = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
    auto proxy = StartProxy(dir, {"--kilnd", kiln.target(), "--endpoints-file", file.string()});
    INFO(proxy->Stderr());
    REQUIRE(kiln.WaitForReport(Serving("k1", v, "web", web)));
    REQUIRE(Eventually([&] {
      StatusOr<v1::EndpointsSnapshot> kept = ReadEndpointsFile(file);
      return kept.ok() && kept->kilnd_id() == "k1" && kept->version() == v;
    }));
    CHECK(!fs::exists(file.string() + ".tmp"));
    proxy->Signal(SIGTERM);
    REQUIRE(proxy->Wait(5s) == 0);
  }

  SECTION("with --kilnd unreachable") {
    auto proxy = StartProxy(dir, {"--kilnd", kiln_target, "--endpoints-file", file.string()});
    INFO(proxy->Stderr());
    REQUIRE(proxy->WaitForStderr("serving the endpoints file", 5s));
    CHECK(Eventually([&] { return Request(web, "x") == "a"; }));
    CHECK(AllAnsweredBy(web, "a"));
    proxy->Signal(SIGTERM);
    CHECK(proxy->Wait(5s) == 0);
  }
  SECTION("without --kilnd (static mode)") {
    auto proxy = StartProxy(dir, {"--endpoints-file", file.string()});
    INFO(proxy->Stderr());
    REQUIRE(proxy->WaitForStderr("kiln-proxy ready", 5s));
    CHECK(Eventually([&] { return Request(web, "x") == "a"; }));
    CHECK(AllAnsweredBy(web, "a"));
    proxy->Signal(SIGINT);
    CHECK(proxy->Wait(5s) == 0);
  }
}

TEST_CASE("kiln-proxy with a corrupt endpoints file starts empty and rewrites it from kilnd",
          "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a");
  const int web = NextPort();
  const fs::path file = dir / "endpoints.json";
  testing::WriteFile(file, "{\"kilnd_id\": \"k0\", \"services\": [");
  FakeKiln kiln("k1", NextPort());
  const uint64_t v = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", kiln.target(), "--endpoints-file", file.string()});
  INFO(proxy->Stderr());
  REQUIRE(proxy->WaitForStderr("endpoints file unusable", 5s));
  CHECK(proxy->Stderr().find(file.string()) != std::string::npos);
  REQUIRE(kiln.WaitForReport(Serving("k1", v, "web", web)));
  CHECK(kiln.Watches()[0].request.kilnd_id().empty());  // nothing kept to resume from
  CHECK(AllAnsweredBy(web, "a"));
  CHECK(Eventually([&] {
    StatusOr<v1::EndpointsSnapshot> kept = ReadEndpointsFile(file);
    return kept.ok() && kept->version() == v;
  }));
}

TEST_CASE("kiln-proxy refuses to start with nothing to serve", "[kiln-proxy]") {
  TempDir dir;
  testing::RunResult none = testing::Run({BinPath("kiln-proxy")});
  CHECK(none.exit_code == 2);
  CHECK(none.err.find("--kilnd") != std::string::npos);
  testing::RunResult missing =
      testing::Run({BinPath("kiln-proxy"), "--endpoints-file", (dir / "none.json").string()});
  CHECK(missing.exit_code == 1);
  CHECK(missing.err.find("none.json") != std::string::npos);
  testing::WriteFile(dir / "empty-token", "\n");
  testing::RunResult token = testing::Run({BinPath("kiln-proxy"), "--kilnd", "127.0.0.1:1",
                                           "--token-file", (dir / "empty-token").string()});
  CHECK(token.exit_code == 2);
  CHECK(token.err.find("empty") != std::string::npos);
}

TEST_CASE("kiln-proxy exits 0 on SIGTERM and closes its listeners", "[kiln-proxy]") {
  TempDir dir;
  EchoBackend a("a");
  const int web = NextPort();
  FakeKiln kiln("k1", NextPort());
  const uint64_t v = kiln.Publish({Exposed("web", web, {EndpointAt("a", a.port())})});
  auto proxy = StartProxy(dir, {"--kilnd", kiln.target()});
  INFO(proxy->Stderr());
  REQUIRE(kiln.WaitForReport(Serving("k1", v, "web", web)));
  // A connection open through it does not hold the exit up.
  UniqueFd held = testing::Connect(web);
  REQUIRE(held);
  REQUIRE(testing::SendAll(held.get(), "x"));
  REQUIRE(testing::ReadExactly(held.get(), 1) == "x");

  const auto sent = std::chrono::steady_clock::now();
  proxy->Signal(SIGTERM);
  CHECK(proxy->Wait(5s) == 0);
  CHECK(std::chrono::steady_clock::now() - sent < 2s);
  CHECK(proxy->WaitForStderr("kiln-proxy stopped", 1s));
  CHECK(!testing::Connect(web));
}

}  // namespace
}  // namespace kiln
