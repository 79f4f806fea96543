// kilnd's Daemon in-process, on ports it picked, and its flags refused before it acts.

#include "daemon/daemon.h"

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "api/tokens.h"
#include "daemon/config.h"
#include "daemon/readiness.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

namespace pb = ::kiln::v1;
using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

// The harness' directories and instance clean-up, with a config on port 0 instead of a child.
DaemonConfig ConfigFor(const KilndHarness& h) {
  DaemonConfig c;
  c.manifests = h.manifests();
  c.state = h.state();
  c.port_first = PortWindow();
  c.port_last = PortWindow() + kPortWindowSize - 1;
  c.resync = Duration(2'000);
  c.stop_grace = Duration(2'000);
  c.http_listen = "127.0.0.1:0";
  c.grpc_listen = "127.0.0.1:0";
  return c;
}

nlohmann::json ReadJsonFile(const std::filesystem::path& p) {
  std::ifstream in(p);
  return in ? nlohmann::json::parse(in, nullptr, false) : nlohmann::json();
}

// The service's available count through gRPC at `addr`, or -1 when the call fails.
int Available(const std::string& addr, const std::string& service) {
  auto stub = pb::Kiln::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 5s);
  pb::ListServicesResponse r;
  if (!stub->ListServices(&ctx, {}, &r).ok()) return -1;
  for (const auto& s : r.services()) {
    if (s.name() == service) return static_cast<int>(s.available());
  }
  return -1;
}

TEST_CASE("a Daemon in-process serves HTTP and gRPC on the ports it bound", "[daemon]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  auto started = Daemon::Start(ConfigFor(h));
  REQUIRE(started.ok());
  std::unique_ptr<Daemon> d = std::move(started).value();
  const int http_port = d->http_port();
  const int grpc_port = d->grpc_tcp_port();
  CHECK(http_port > 0);
  CHECK(grpc_port > 0);
  CHECK(http_port != grpc_port);
  CHECK(d->grpc_unix_socket() == h.state() / "kiln.sock");

  std::thread runner([&] { d->Run(); });
  // Run() publishes what it bound for out-of-process clients.
  nlohmann::json addr;
  CHECK(WaitFor([&] { return (addr = ReadJsonFile(d->addr_file())).is_object(); }, 10s));
  CHECK(d->addr_file() == h.state() / "kilnd.addr");
  CHECK(addr["pid"] == ::getpid());
  CHECK(addr["http"] == "127.0.0.1:" + std::to_string(http_port));
  CHECK(addr["grpc_tcp"] == "127.0.0.1:" + std::to_string(grpc_port));
  CHECK(addr["grpc_unix"] == (h.state() / "kiln.sock").string());

  CHECK(HttpRequest(http_port, "/healthz").status == 200);
  CHECK(WaitFor([&] { return HttpRequest(http_port, "/readyz").status == 200; }, 20s));
  // The instance is started, probed and reported through both transports.
  CHECK(WaitFor([&] { return Available("127.0.0.1:" + std::to_string(grpc_port), "web") == 1; },
                30s));
  CHECK(Available("unix:" + d->grpc_unix_socket().string(), "web") == 1);
  HttpReply services = HttpRequest(http_port, "/api/v1/services");
  CHECK(services.status == 200);
  CHECK(nlohmann::json::parse(services.body)["services"][0]["name"] == "web");
  HttpReply metrics = HttpRequest(http_port, "/metrics");
  CHECK(metrics.body.find("kiln_build_info") != std::string::npos);

  // HTTP reads the store and a published snapshot on a thread of its own: it answers while the
  // reconciler's thread is held in one long step (served on that thread, these would time out).
  std::promise<void> release;
  std::promise<void> held;
  d->PostForTest([&] {
    held.set_value();
    release.get_future().wait();
  });
  held.get_future().wait();
  CHECK(HttpRequest(http_port, "/healthz").status == 200);
  CHECK(HttpRequest(http_port, "/api/v1/services").status == 200);
  CHECK(HttpRequest(http_port, "/metrics").status == 200);
  release.set_value();

  const auto instances = h.InstanceProcesses();
  CHECK(instances.size() == 1);
  d->Stop();
  runner.join();
  // A clean stop removes the address file; instances keep running.
  CHECK_FALSE(std::filesystem::exists(h.state() / "kilnd.addr"));
  d.reset();
  CHECK(h.InstanceProcesses() == instances);
  CHECK(HttpRequest(http_port, "/healthz").status == 0);
}

TEST_CASE("Daemon::Start refuses a bad config before it creates anything", "[daemon]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  DaemonConfig zero_timeout = ConfigFor(h);
  zero_timeout.http_read_timeout = Duration(0);
  auto refused = Daemon::Start(zero_timeout);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == StatusCode::kInvalidArgument);
  CHECK(refused.status().message() == "--http-read-timeout: must be more than 0");

  DaemonConfig open_grpc = ConfigFor(h);
  open_grpc.grpc_listen = "0.0.0.0:0";
  refused = Daemon::Start(open_grpc);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == StatusCode::kFailedPrecondition);
  CHECK(refused.status().message().find("refusing to serve the API on 0.0.0.0:0") !=
        std::string::npos);

  DaemonConfig no_key = ConfigFor(h);
  no_key.tls_cert = (h.tmp() / "cert.pem").string();
  refused = Daemon::Start(no_key);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().message() == "--tls-cert and --tls-key go together");
  CHECK_FALSE(std::filesystem::exists(h.state()));
}

TEST_CASE("ParseDaemonFlags reads every flag into typed values", "[daemon]") {
  const char* argv[] = {"kilnd", "--manifests",         "/m",          "--state",
                        "/s",    "--port-range",        "3000-3009",   "--resync",
                        "1m30s", "--http-read-timeout", "250ms",       "--http-listen",
                        "",      "--grpc-listen",       "localhost:0", "--event-retention",
                        "7",     "--log-format",        "json",        "--log-level",
                        "warn"};
  auto c = ParseDaemonFlags(static_cast<int>(std::size(argv)), argv);
  REQUIRE(c.ok());
  CHECK(c->manifests == "/m");
  CHECK(c->state == "/s");
  CHECK(c->port_first == 3000);
  CHECK(c->port_last == 3009);
  CHECK(c->resync == Duration(90'000));
  CHECK(c->stop_grace == Duration(10'000));
  CHECK(c->http_read_timeout == Duration(250));
  CHECK(c->http_listen.empty());
  CHECK(c->grpc_listen == "localhost:0");
  CHECK(c->event_retention == 7);
  CHECK(c->log_format == LogFormat::kJson);
  CHECK(c->log_level == LogLevel::kWarn);

  const char* help[] = {"kilnd", "--help"};
  auto h = ParseDaemonFlags(2, help);
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().code() == StatusCode::kCancelled);
  CHECK(h.status().message().find("--http-read-timeout") != std::string::npos);

  const char* range[] = {"kilnd", "--manifests", "/m", "--state", "/s", "--port-range", "9-3"};
  auto r = ParseDaemonFlags(7, range);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(r.status().message() == "--port-range: expected FIRST-LAST within 1-65535, got \"9-3\"");
}

TEST_CASE("ParseDaemonFlags takes Docker engine addresses and refuses what it cannot use",
          "[daemon]") {
  const char* one[] = {
      "kilnd", "--manifests", "/m", "--state", "/s", "--docker-host", "unix:///run/docker.sock"};
  auto c = ParseDaemonFlags(static_cast<int>(std::size(one)), one);
  REQUIRE(c.ok());
  CHECK(c->docker_hosts == std::vector<std::string>{"unix:///run/docker.sock"});

  const char* none[] = {"kilnd", "--manifests", "/m", "--state", "/s"};
  c = ParseDaemonFlags(static_cast<int>(std::size(none)), none);
  REQUIRE(c.ok());
  CHECK(c->docker_hosts.empty());

  const char* tcp[] = {"kilnd",         "--manifests",        "/m", "--state", "/s",
                       "--docker-host", "tcp://10.0.0.1:2376"};
  c = ParseDaemonFlags(static_cast<int>(std::size(tcp)), tcp);
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(c.status().message(), Catch::StartsWith("--docker-host: \"tcp://10.0.0.1:2376\""));

  const char* two[] = {
      "kilnd",         "--manifests",   "/m", "--state", "/s", "--docker-host", "unix:///a.sock",
      "--docker-host", "unix:///b.sock"};
  c = ParseDaemonFlags(static_cast<int>(std::size(two)), two);
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().message() ==
        "--docker-host: host name \"default\" is given twice (a bare address is named "
        "\"default\"; name each engine: name=NAME,ADDRESS)");

  // Several engines: one named host each, and how long one may not answer.
  const char* named[] = {"kilnd",
                         "--manifests",
                         "/m",
                         "--state",
                         "/s",
                         "--docker-host",
                         "name=a,unix:///a.sock",
                         "--docker-host",
                         "name=b,unix:///b.sock",
                         "--docker-host-timeout",
                         "3s"};
  c = ParseDaemonFlags(static_cast<int>(std::size(named)), named);
  REQUIRE(c.ok());
  CHECK(c->docker_hosts.size() == 2);
  CHECK(c->docker_host_timeout == Duration(3000));

  const char* bad_name[] = {
      "kilnd", "--manifests", "/m", "--state", "/s", "--docker-host", "name=A b,unix:///a.sock"};
  c = ParseDaemonFlags(static_cast<int>(std::size(bad_name)), bad_name);
  REQUIRE_FALSE(c.ok());
  CHECK_THAT(c.status().message(), Catch::Contains("host name \"A b\" must be 1 to 63"));

  const char* zero[] = {"kilnd", "--manifests",           "/m", "--state",
                        "/s",    "--docker-host-timeout", "0s"};
  c = ParseDaemonFlags(static_cast<int>(std::size(zero)), zero);
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().message() == "--docker-host-timeout: must be more than 0");
}

TEST_CASE("kilnd log-max-size and log-max-files flags size the instance logs", "[daemon]") {
  CHECK(*ParseByteSize("4096") == 4096);
  CHECK(*ParseByteSize("512KiB") == uint64_t{512} * 1024);
  CHECK(*ParseByteSize("10MiB") == 10 << 20);
  CHECK(*ParseByteSize("10M") == 10 << 20);
  CHECK(*ParseByteSize("1GiB") == uint64_t{1} << 30);
  for (const char* bad : {"", "MiB", "10 MiB", "10mb", "-1", "1.5MiB", "9999999999999KiB"}) {
    INFO(bad);
    CHECK(ParseByteSize(bad).status().code() == StatusCode::kInvalidArgument);
  }
  const char* ok[] = {"kilnd", "--manifests",     "/m", "--state", "/s", "--log-max-size",
                      "64KiB", "--log-max-files", "5"};
  auto c = ParseDaemonFlags(static_cast<int>(std::size(ok)), ok);
  REQUIRE(c.ok());
  CHECK(c->log_max_bytes == uint64_t{64} * 1024);
  CHECK(c->log_max_files == 5);
  const char* defaults[] = {"kilnd", "--manifests", "/m", "--state", "/s"};
  auto d = ParseDaemonFlags(5, defaults);
  REQUIRE(d.ok());
  CHECK(d->log_max_bytes == 10 << 20);
  CHECK(d->log_max_files == 3);
  const char* small[] = {"kilnd", "--manifests", "/m", "--state", "/s", "--log-max-size", "100"};
  auto e = ParseDaemonFlags(7, small);
  REQUIRE_FALSE(e.ok());
  CHECK(e.status().message() == "--log-max-size: must be at least 1KiB");
  const char* word[] = {"kilnd", "--manifests", "/m", "--state", "/s", "--log-max-size", "big"};
  auto w = ParseDaemonFlags(7, word);
  REQUIRE_FALSE(w.ok());
  CHECK(w.status().message() ==
        "--log-max-size: expected a size such as 4096, 512KiB, 10MiB or 1GiB, got \"big\"");
}

TEST_CASE("CheckDaemonConfig alone refuses a listener off loopback without TLS and tokens",
          "[daemon]") {
  TempDir tmp;
  WriteFile(tmp.path() / "cert.pem", "not checked here");
  WriteFile(tmp.path() / "key.pem", "not checked here");
  DaemonConfig c;
  c.manifests = tmp.path() / "manifests";
  c.state = tmp.path() / "state";
  c.http_listen = "127.0.0.1:0";
  CHECK(CheckDaemonConfig(c).ok());

  DaemonConfig open_http = c;
  open_http.http_listen = "0.0.0.0:0";
  Status s = CheckDaemonConfig(open_http);
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(
      s.message().starts_with("--http-listen: refusing to serve HTTP on 0.0.0.0:0 without TLS "
                              "and tokens"));

  DaemonConfig open_grpc = c;
  open_grpc.grpc_listen = "0.0.0.0:0";
  s = CheckDaemonConfig(open_grpc);
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(s.message().starts_with("--grpc-listen: refusing to serve the API on 0.0.0.0:0"));

  // Both refused: HTTP's is the one reported, as kilnd always has.
  DaemonConfig both = open_grpc;
  both.http_listen = "0.0.0.0:0";
  CHECK(CheckDaemonConfig(both).message().starts_with("--http-listen: "));

  // Anything invalid is reported before a refusal, as a usage error.
  DaemonConfig also_invalid = both;
  also_invalid.http_read_timeout = Duration(0);
  s = CheckDaemonConfig(also_invalid);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(s.message() == "--http-read-timeout: must be more than 0");

  // Tokens alone, or TLS alone, are not enough; both are.
  DaemonConfig tokens_only = both;
  tokens_only.tokens = Tokens{{"0123456789abcdef", Caller{"ops", Role::kOperator}}};
  CHECK(CheckDaemonConfig(tokens_only).code() == StatusCode::kFailedPrecondition);
  DaemonConfig tls_only = both;
  tls_only.tls_cert = (tmp.path() / "cert.pem").string();
  tls_only.tls_key = (tmp.path() / "key.pem").string();
  CHECK(CheckDaemonConfig(tls_only).code() == StatusCode::kFailedPrecondition);
  DaemonConfig tls_and_tokens = tls_only;
  tls_and_tokens.tokens = tokens_only.tokens;
  CHECK(CheckDaemonConfig(tls_and_tokens).ok());
}

TEST_CASE("ParseDaemonFlags reads --tokens once and leaves the refusal to Daemon::Start",
          "[daemon]") {
  TempDir tmp;
  const std::string tokens = (tmp.path() / "tokens").string();
  WriteFile(tokens, "# ops\n0123456789abcdef operator ops\nfedcba9876543210 viewer ci\n");
  const char* argv[] = {"kilnd",        "--manifests",   "/m",       "--state", "/s", "--tokens",
                        tokens.c_str(), "--http-listen", "0.0.0.0:0"};
  auto c = ParseDaemonFlags(static_cast<int>(std::size(argv)), argv);
  // Not a usage error: the config comes back, and CheckDaemonConfig says why it cannot serve.
  REQUIRE(c.ok());
  REQUIRE(c->tokens.has_value());
  CHECK(c->tokens->size() == 2);
  CHECK(c->tokens->at("0123456789abcdef").name == "ops");
  CHECK(c->tokens->at("fedcba9876543210").role == Role::kViewer);
  CHECK(CheckDaemonConfig(*c).code() == StatusCode::kFailedPrecondition);

  // Read once, here: a tokens file removed afterwards changes nothing for this config.
  std::filesystem::remove(tokens);
  CHECK(CheckDaemonConfig(*c).code() == StatusCode::kFailedPrecondition);
  auto missing = ParseDaemonFlags(static_cast<int>(std::size(argv)), argv);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == StatusCode::kInvalidArgument);
  CHECK(missing.status().message() == "--tokens: cannot read tokens file " + tokens);
}

TEST_CASE("readiness names each check that fails, from the published snapshot", "[daemon]") {
  const auto now = std::chrono::steady_clock::now();
  ReconcilerSnapshot s;
  s.manifests_loaded = true;
  s.recovered = true;
  s.at = now - 1s;
  HttpServer::Readiness r = ReadinessOf(s, now, 1'000'000);
  CHECK(r.ready);
  auto j = nlohmann::json::parse(r.json);
  CHECK(j["ready"] == true);
  CHECK(j["checks"]["reconciler_responsive"]["silent_ms"] == 1000);

  ReconcilerSnapshot full = s;
  full.store_error = "disk is full";
  j = nlohmann::json::parse(ReadinessOf(full, now, 1'000'000).json);
  CHECK(j["ready"] == false);
  CHECK(j["checks"]["store_writable"] ==
        nlohmann::json({{"ok", false}, {"error", "disk is full"}}));

  ReconcilerSnapshot stuck = s;
  stuck.at = now - 10s;
  CHECK_FALSE(ReadinessOf(stuck, now, 1'000'000).ready);

  // A probe kilnd could not run counts for 30 s, then is forgotten.
  ReconcilerSnapshot probes = s;
  probes.local_probe_error = "too many open files";
  probes.local_probe_error_ms = 1'000'000;
  j = nlohmann::json::parse(ReadinessOf(probes, now, 1'030'000).json);
  CHECK(j["checks"]["probes_runnable"]["error"] == "too many open files");
  CHECK(j["ready"] == false);
  CHECK(ReadinessOf(probes, now, 1'030'001).ready);

  ReconcilerSnapshot stopping = s;
  stopping.shutting_down = true;
  CHECK_FALSE(ReadinessOf(stopping, now, 1'000'000).ready);
  ReconcilerSnapshot loading = s;
  loading.manifests_loaded = false;
  CHECK_FALSE(ReadinessOf(loading, now, 1'000'000).ready);
  ReconcilerSnapshot recovering = s;
  recovering.recovered = false;
  recovering.recovery_error = "RESOURCE_EXHAUSTED: disk is full";
  j = nlohmann::json::parse(ReadinessOf(recovering, now, 1'000'000).json);
  CHECK(j["ready"] == false);
  CHECK(j["checks"]["recovered"]["error"] == "RESOURCE_EXHAUSTED: disk is full");
}

// What a kilnd run may not change: the instance's row (state, handle) and the events.
struct StoreSnapshot {
  std::vector<std::pair<std::string, std::string>> rows;  // state, handle
  size_t events = 0;
  bool operator==(const StoreSnapshot&) const = default;
};
StoreSnapshot Snapshot(KilndHarness& h) {
  StoreSnapshot s;
  for (const auto& i : h.Live("web")) {
    s.rows.emplace_back(InstanceStateName(i.state), i.handle);
  }
  s.events = h.Events("web").size();
  return s;
}

TEST_CASE("kilnd refuses a bad flag before it touches the state of an earlier run",
          "[daemon][kilnd]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  h.kilnd().Signal(SIGTERM);
  REQUIRE(h.kilnd().Wait(20s) == 0);
  CHECK_FALSE(std::filesystem::exists(h.state() / "kilnd.addr"));
  const auto instances = h.InstanceProcesses();
  REQUIRE(instances.size() == 1);
  const pid_t pid = instances.begin()->first;
  const StoreSnapshot before = Snapshot(h);
  REQUIRE(before.rows.size() == 1);

  struct Bad {
    std::vector<std::string> flags;
    int exit_code;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {{"--http-read-timeout", "banana"}, 2, "kilnd: --http-read-timeout: "},
      {{"--grpc-listen", "no-port"}, 2, "kilnd: --grpc-listen: expected HOST:PORT"},
      {{"--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"},
       2,
       "kilnd: --tls-cert: cannot read \"/nonexistent/cert.pem\""},
      {{"--grpc-listen", "0.0.0.0:0"}, 1, "refusing to serve the API on 0.0.0.0:0"},
  };
  const auto fresh = h.tmp() / "fresh-state";
  for (const auto& b : bad) {
    for (const auto& state : {h.state(), fresh}) {
      std::vector<std::string> argv = {BinPath("kilnd"), "--manifests", h.manifests().string(),
                                       "--state", state.string()};
      argv.insert(argv.end(), b.flags.begin(), b.flags.end());
      RunResult r = Run(argv);
      INFO(b.flags[0] << " " << b.flags[1] << " on " << state << ":\n" << r.err);
      CHECK(r.exit_code == b.exit_code);
      CHECK(r.err.find(b.says) != std::string::npos);
      if (b.exit_code == 2) CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
      CHECK(r.err.find("state store open") == std::string::npos);
      CHECK_FALSE(std::filesystem::exists(fresh));
      // The instance of the earlier run runs on, same process, and nothing was recorded.
      CHECK(::kill(pid, 0) == 0);
      CHECK(h.InstanceProcesses() == instances);
      CHECK(Snapshot(h) == before);
    }
  }
}

}  // namespace
}  // namespace kiln::testing
