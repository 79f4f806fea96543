// kilnd's HTTP listener under --tokens, over TLS, off loopback, and against idle connections.

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";
const char* kViewer = "viewer-token-0123456789abcdef";
const char* kOperator = "operator-token-0123456789abcdef";

using Reply = HttpReply;

HttpHeaders Bearer(const std::string& token) {
  if (token.empty()) return {};
  return {{"Authorization", "Bearer " + token}};
}

Reply Get(int port, const std::string& target, const std::string& token = "") {
  return HttpRequest(port, target, http::verb::get, Bearer(token));
}

// GET over TLS, trusting only `ca`; with `client` (a PEM certificate beside its ".key"), also
// presenting a client certificate.
Reply GetTls(int port, const std::string& target, const std::filesystem::path& ca,
             const std::string& client = "") {
  asio::io_context io;
  ssl::context ctx(ssl::context::tls_client);
  ctx.load_verify_file(ca.string());
  ctx.set_verify_mode(ssl::verify_peer);
  if (!client.empty()) {
    ctx.use_certificate_chain_file(client + ".pem");
    ctx.use_private_key_file(client + ".key", ssl::context::pem);
  }
  beast::ssl_stream<beast::tcp_stream> stream(io, ctx);
  beast::get_lowest_layer(stream).expires_after(10s);
  beast::error_code ec;
  beast::get_lowest_layer(stream).connect(
      tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)), ec);
  if (!ec) stream.handshake(ssl::stream_base::client, ec);
  if (ec) return {};
  return HttpExchange(stream, target);
}

// What a connection the test holds does next, waiting at most `timeout`: closed by the peer,
// data, or nothing (the peer keeps it open).
enum class Next { kClosed, kData, kNothing };
Next WaitForPeer(tcp::socket& s, std::chrono::seconds timeout) {
  struct timeval tv {};
  tv.tv_sec = static_cast<time_t>(timeout.count());
  ::setsockopt(s.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[256];
  while (true) {
    ssize_t n = ::recv(s.native_handle(), buf, sizeof buf, 0);
    if (n > 0) return Next::kData;
    if (n == 0 || errno == ECONNRESET) return Next::kClosed;
    if (errno != EINTR) return Next::kNothing;
  }
}

std::filesystem::path WriteTokens(const TempDir& tmp) {
  auto path = tmp / "tokens";
  WriteFile(path, std::string(kViewer) + " viewer alice\n" + kOperator + " operator bob\n");
  return path;
}

struct Fixture {
  explicit Fixture(const std::vector<std::string>& extra) {
    h.Declare("web", "1.0", 1, kPolicy);
    h.Start(extra);
    REQUIRE(h.WaitReady());
    port = h.HttpPort();
    REQUIRE(port > 0);
    REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  }
  KilndHarness h;
  int port = 0;
};

TEST_CASE("with --tokens, /api/v1 and the dashboard need a token, health and metrics do not",
          "[http][security]") {
  TempDir tmp;
  Fixture f({"--tokens", WriteTokens(tmp).string()});
  for (const char* path :
       {"/api/v1/services", "/api/v1/services/web", "/api/v1/events?since=0", "/"}) {
    INFO(path);
    Reply none = Get(f.port, path);
    CHECK(none.status == 401);
    CHECK(none.www_authenticate == "Bearer realm=\"kilnd\"");
    CHECK(Get(f.port, path, "not-a-token-at-all-xxxxxxxx").status == 401);
    CHECK(Get(f.port, path, kViewer).status == 200);
    CHECK(Get(f.port, path, kOperator).status == 200);
  }
  Reply none = Get(f.port, "/api/v1/services");
  CHECK(nlohmann::json::parse(none.body)["error"] == "missing authorization: Bearer <token>");
  CHECK(none.body.find("web") == std::string::npos);
  // The page a browser gets without a token asks for one; it holds no data.
  Reply page = Get(f.port, "/");
  CHECK(page.content_type == "text/html; charset=utf-8");
  CHECK(page.body.find("kilnd needs a token") != std::string::npos);
  Reply services = Get(f.port, "/api/v1/services", kViewer);
  CHECK(nlohmann::json::parse(services.body)["services"][0]["name"] == "web");
  CHECK(Get(f.port, "/healthz").status == 200);
  CHECK(Get(f.port, "/readyz").status == 200);
  CHECK(Get(f.port, "/metrics").status == 200);
}

TEST_CASE("http-metrics-auth puts /metrics behind a token too", "[http][security]") {
  TempDir tmp;
  Fixture f({"--tokens", WriteTokens(tmp).string(), "--http-metrics-auth"});
  CHECK(Get(f.port, "/metrics").status == 401);
  Reply m = Get(f.port, "/metrics", kViewer);
  CHECK(m.status == 200);
  CHECK(m.body.find("kiln_build_info") != std::string::npos);
  CHECK(Get(f.port, "/healthz").status == 200);
}

TEST_CASE("http-metrics-auth without tokens is a usage error", "[http][security]") {
  KilndHarness h;
  h.Start({"--http-metrics-auth"});
  CHECK(h.kilnd().Wait(20s) == 2);
  CHECK(h.kilnd().Stderr().find("--http-metrics-auth needs --tokens") != std::string::npos);
}

TEST_CASE("HTTPS with the certificate the gRPC listener uses", "[http][security]") {
  TempDir tmp;
  RunResult cert =
      Run({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
           (tmp / "key.pem").string(), "-out", (tmp / "cert.pem").string()});
  INFO(cert.err);
  REQUIRE(cert.exit_code == 0);
  Fixture f({"--tls-cert", (tmp / "cert.pem").string(), "--tls-key", (tmp / "key.pem").string()});
  CHECK(f.h.kilnd().Stderr().find("HTTP listening listen=127.0.0.1:0 port=" +
                                  std::to_string(f.port) + " tls=true") != std::string::npos);
  Reply alive = GetTls(f.port, "/healthz", tmp / "cert.pem");
  CHECK(alive.status == 200);
  CHECK(alive.body == "{\"status\":\"alive\"}");
  CHECK(GetTls(f.port, "/api/v1/services", tmp / "cert.pem").status == 200);
  // Plain HTTP to the HTTPS port gets no HTTP answer.
  CHECK(Get(f.port, "/healthz").status == 0);
}

TEST_CASE("with --client-ca, HTTPS serves only clients with a certificate that CA signed",
          "[http][security]") {
  TempDir tmp;
  auto sh = [&](const std::string& cmd) {
    RunResult r = Run({"/bin/sh", "-c", "cd " + tmp.path().string() + " && " + cmd});
    INFO(cmd << "\n" << r.out << r.err);
    REQUIRE(r.exit_code == 0);
  };
  const std::string req = "/usr/bin/openssl req -newkey rsa:2048 -nodes -days 2 ";
  const std::string sign =
      "/usr/bin/openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 ";
  sh(req + "-x509 -subj /CN=kiln-test-ca -keyout ca.key -out ca.pem");
  sh(req + "-subj /CN=127.0.0.1 -keyout server.key -out server.csr");
  sh("echo subjectAltName=IP:127.0.0.1 > san.ext && " + sign +
     "-in server.csr -extfile san.ext -out server.pem");
  sh(req + "-subj /CN=client -keyout client.key -out client.csr");
  sh(sign + "-in client.csr -out client.pem");
  sh(req + "-x509 -subj /CN=stranger -keyout stranger.key -out stranger.pem");
  Fixture f({"--tls-cert", (tmp / "server.pem").string(), "--tls-key",
             (tmp / "server.key").string(), "--client-ca", (tmp / "ca.pem").string()});
  CHECK(GetTls(f.port, "/healthz", tmp / "ca.pem", (tmp / "client").string()).status == 200);
  CHECK(GetTls(f.port, "/healthz", tmp / "ca.pem").status == 0);
  CHECK(GetTls(f.port, "/healthz", tmp / "ca.pem", (tmp / "stranger").string()).status == 0);
}

TEST_CASE("HTTP off loopback without TLS and tokens refuses to start, before it acts",
          "[http][security]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start({}, "0.0.0.0:0");
  CHECK(h.kilnd().Wait(20s) == 1);
  const std::string err = h.kilnd().Stderr();
  INFO(err);
  CHECK(err.find(
            "cannot start HTTP error=\"refusing to serve HTTP on 0.0.0.0:0 without TLS and tokens: "
            "anyone who can reach it could read every service, instance and event. Give "
            "--tls-cert, --tls-key and --tokens, or listen on 127.0.0.1\"") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(h.state() / "kiln.db"));
  CHECK(h.InstanceProcesses().empty());
}

TEST_CASE("idle connections filling the cap do not lock /healthz out", "[http][security]") {
  // Long header timeout: room is made by evicting idle connections, not by timeouts.
  Fixture f({"--http-max-connections", "8", "--http-header-timeout", "60s"});
  asio::io_context io;
  const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(f.port));
  std::vector<std::unique_ptr<tcp::socket>> idle;
  int answered = 0;
  for (int round = 0; round < 10; ++round) {
    // Fill the cap and more, each connection sending half a request and then nothing.
    for (int i = 0; i < 12; ++i) {
      auto s = std::make_unique<tcp::socket>(io);
      s->connect(ep);
      asio::write(*s, asio::buffer(std::string("GET /api/v1/services HTTP/1.1\r\n")));
      idle.push_back(std::move(s));
    }
    answered += Get(f.port, "/healthz").status == 200;
  }
  CHECK(answered == 10);
  // The oldest idle connections were the ones closed; the newest is still open.
  CHECK(WaitForPeer(*idle.front(), 10s) == Next::kClosed);
  CHECK(WaitForPeer(*idle.back(), 1s) == Next::kNothing);
}

TEST_CASE("a client that does not send its headers in time is dropped", "[http][security]") {
  Fixture f({"--http-header-timeout", "300ms"});
  asio::io_context io;
  tcp::socket slow(io);
  slow.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(f.port)));
  asio::write(slow,
              asio::buffer(std::string("GET /healthz HTTP/1.1\r\nHost: x\r\n")));  // never ends
  CHECK(WaitForPeer(slow, 20s) == Next::kClosed);
  CHECK(Get(f.port, "/healthz").status == 200);
}

TEST_CASE("idle gRPC TCP connections are closed, and the API still answers", "[grpc][security]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start({"--grpc-listen", "127.0.0.1:0"});
  REQUIRE(h.WaitReady());
  const int port = h.TcpPort();
  REQUIRE(port > 0);
  asio::io_context io;
  std::vector<std::unique_ptr<tcp::socket>> idle;
  for (int i = 0; i < 50; ++i) {
    auto s = std::make_unique<tcp::socket>(io);
    s->connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)));
    idle.push_back(std::move(s));
  }
  RunResult st = Run({BinPath("kilnctl"), "--addr", "127.0.0.1:" + std::to_string(port), "status"});
  CHECK(st.exit_code == 0);
  // No handshake within the server's deadline: each is closed (the read ends; it would block
  // forever if the server kept the connection).
  int closed = 0;
  for (auto& s : idle) {
    Next next = Next::kData;
    while (next == Next::kData) next = WaitForPeer(*s, 30s);  // a server may say goodbye first
    closed += next == Next::kClosed;
  }
  CHECK(closed == 50);
}

}  // namespace
}  // namespace kiln::testing
