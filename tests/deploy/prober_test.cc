// Health probes against the real test service and real sockets.

#include "deploy/prober.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/ip/tcp.hpp>
#include <catch2/catch.hpp>
#include <cstdio>

#include "deploy/process_driver.h"
#include "tests/deploy/deploy_test_util.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::PortWindow;
using testing::RunUntil;
using testing::TempDir;

// One kiln-testsvc instance started through the process driver.
struct ProbeFixture {
  explicit ProbeFixture(std::vector<std::string> flags = {})
      : store(*ArtifactStore::Open(tmp / "artifacts")), prober(io) {
    ProcessDriver::Options o;
    o.log_dir = tmp / "logs";
    o.artifacts = &store;
    o.port_first = PortWindow();
    o.port_last = PortWindow() + testing::kPortWindowSize - 1;
    o.controller_id = ControllerIdForStateDir(tmp.path());
    driver = std::make_unique<ProcessDriver>(io, o);
    InstanceSpec s;
    s.instance = "web-1";
    s.service = "web";
    s.revision = 1;
    s.artifact_sha256 = *store.Put(testing::TestServicePath());
    s.command = {"{artifact}"};
    s.command.insert(s.command.end(), flags.begin(), flags.end());
    std::optional<StatusOr<InstanceHandle>> r;
    driver->Start(s, [&](StatusOr<InstanceHandle> h) { r = std::move(h); });
    RunUntil(io, [&] { return r.has_value(); });
    handle = **r;
  }
  ~ProbeFixture() {
    try {
      bool done = false;
      driver->Stop(handle, 1s, [&](const StatusOr<ExitInfo>&) { done = true; });
      RunUntil(io, [&] { return done; });
    } catch (...) {
      std::fputs("ProbeFixture: stopping the test's instance failed\n", stderr);
    }
  }

  ProbeTarget Target(ProbeKind kind) const {
    ProbeTarget t;
    t.instance = "web-1";
    t.port = handle.port;
    t.check.kind = kind;
    t.check.http_path = "/healthz";
    t.check.interval = 50ms;
    t.check.timeout = 300ms;
    t.check.failure_threshold = 2;
    return t;
  }

  ProbeResult Once(const ProbeTarget& t) {
    std::optional<ProbeResult> result;
    prober.ProbeOnce(t, [&](ProbeResult r) { result = std::move(r); });
    REQUIRE(RunUntil(io, [&] { return result.has_value(); }));
    return *result;
  }

  // Probes until the first success (the service may still be starting).
  ProbeResult UntilHealthy(const ProbeTarget& t) {
    for (int i = 0; i < 200; ++i) {
      ProbeResult r = Once(t);
      if (r.healthy) return r;
      std::this_thread::sleep_for(20ms);
    }
    return Once(t);
  }

  TempDir tmp;
  boost::asio::io_context io;
  ArtifactStore store;
  std::unique_ptr<ProcessDriver> driver;
  Prober prober;
  InstanceHandle handle;
};

TEST_CASE("http, tcp and exec probes pass against a healthy service", "[prober]") {
  ProbeFixture f;
  std::string where = "127.0.0.1:" + std::to_string(f.handle.port);
  ProbeResult http = f.UntilHealthy(f.Target(ProbeKind::kHttp));
  CHECK(http.healthy);
  CHECK(http.reason == "http 200 from " + where + "/healthz");
  ProbeResult tcp = f.Once(f.Target(ProbeKind::kTcp));
  CHECK(tcp.healthy);
  CHECK(tcp.reason == "tcp connect to " + where + " ok");
  ProbeTarget exec = f.Target(ProbeKind::kExec);
  exec.check.exec = {"/bin/sh", "-c", "test \"$PORT\" = " + std::to_string(f.handle.port)};
  exec.env = {{"PORT", std::to_string(f.handle.port)}};
  ProbeResult e = f.Once(exec);
  CHECK(e.healthy);
  CHECK(e.reason == "exec exited with code 0");
}

TEST_CASE("an exec probe holds no descriptor of kilnd's", "[prober]") {
  ProbeFixture f;
  // What kilnd might hold without close-on-exec: a pipe (a library's, a listener's...).
  int leaked[2];
  REQUIRE(::pipe(leaked) == 0);
  ProbeTarget exec = f.Target(ProbeKind::kExec);
  exec.check.exec = {testing::TestServicePath(), "--check-fds"};
  ProbeResult e = f.Once(exec);
  ::close(leaked[0]);
  ::close(leaked[1]);
  CHECK(e.reason == "exec exited with code 0");
  CHECK(e.healthy);
}

TEST_CASE("probes fail with the reason", "[prober]") {
  ProbeFixture f({"--unhealthy-after", "0s"});
  std::string where = "127.0.0.1:" + std::to_string(f.handle.port);
  ProbeTarget http = f.Target(ProbeKind::kHttp);
  ProbeResult r = f.Once(http);
  for (int i = 0; i < 200 && r.reason.find("connect refused") == 0; ++i) {
    std::this_thread::sleep_for(20ms);  // still starting
    r = f.Once(http);
  }
  CHECK_FALSE(r.healthy);
  CHECK(r.reason == "http 503 from " + where + "/healthz");

  ProbeTarget missing_path = http;
  missing_path.check.http_path = "/nope";
  CHECK(f.Once(missing_path).reason == "http 404 from " + where + "/nope");

  ProbeTarget closed = f.Target(ProbeKind::kTcp);
  closed.check.port = PortWindow() + testing::kPortWindowSize - 1;  // nothing listens there
  ProbeResult refused = f.Once(closed);
  CHECK_FALSE(refused.healthy);
  CHECK(refused.reason == "connect refused 127.0.0.1:" + std::to_string(closed.check.port));

  ProbeTarget exec = f.Target(ProbeKind::kExec);
  exec.check.exec = {"/bin/sh", "-c", "exit 7"};
  CHECK(f.Once(exec).reason == "exec exited with code 7");
  exec.check.exec = {"/nonexistent/check"};
  CHECK(f.Once(exec).reason == "exec cannot run /nonexistent/check: No such file or directory");
}

TEST_CASE("probes time out", "[prober]") {
  ProbeFixture f;
  // A server that accepts connections and never answers.
  boost::asio::ip::tcp::acceptor silent(f.io, {boost::asio::ip::make_address("127.0.0.1"),
                                               static_cast<uint16_t>(PortWindow() + 350)});
  ProbeTarget http = f.Target(ProbeKind::kHttp);
  http.check.port = PortWindow() + 350;
  http.check.timeout = 200ms;
  ProbeResult r = f.Once(http);
  CHECK_FALSE(r.healthy);
  CHECK(r.reason == "timeout after 200ms");

  ProbeTarget exec = f.Target(ProbeKind::kExec);
  exec.check.exec = {"/bin/sleep", "10"};
  exec.check.timeout = 200ms;
  auto begin = std::chrono::steady_clock::now();
  ProbeResult e = f.Once(exec);
  CHECK(e.reason == "timeout after 200ms");
  CHECK(std::chrono::steady_clock::now() - begin < 5s);  // the sleep was killed, not waited for
}

TEST_CASE("watching reports healthy, then unhealthy past the threshold", "[prober]") {
  ProbeFixture f({"--unhealthy-after", "1s"});
  std::vector<ProbeResult> transitions;
  std::vector<ProbeResult> results;  // every result, the failures below the threshold too
  f.prober.Watch(f.Target(ProbeKind::kHttp), [&](const ProbeResult& r) {
    results.push_back(r);
    if (r.transition) transitions.push_back(r);
  });
  REQUIRE(RunUntil(
      f.io, [&] { return transitions.size() == 2; }, 20s));
  CHECK(transitions[0].healthy);
  // failure_threshold 2: the first failing result is reported, but is no transition.
  auto first_failure =
      std::find_if(results.begin(), results.end(), [](const ProbeResult& r) { return !r.healthy; });
  REQUIRE(first_failure != results.end());
  CHECK_FALSE(first_failure->transition);
  CHECK_FALSE(first_failure->local_error);
  CHECK_FALSE(transitions[1].healthy);
  CHECK(transitions[1].reason ==
        "http 503 from 127.0.0.1:" + std::to_string(f.handle.port) + "/healthz");
  CHECK(f.prober.Last("web-1")->reason == transitions[1].reason);

  // Unwatch: nothing more is reported, nothing stays in flight.
  f.prober.Unwatch("web-1");
  CHECK(f.prober.WatchedCount() == 0);
  CHECK_FALSE(f.prober.Last("web-1").has_value());
  f.io.restart();
  const size_t seen = results.size();
  f.io.run_for(300ms);
  CHECK(transitions.size() == 2);
  CHECK(results.size() == seen);
}

TEST_CASE("a probe kilnd cannot run for want of descriptors is kilnd's error, not the instance's",
          "[prober]") {
#if defined(__SANITIZE_ADDRESS__)
  // The sanitizers' runtime needs descriptors of its own (it checks memory through a pipe), so
  // with none left it reports errors that are not there. `make test` runs this without them.
  return;
#endif
  ProbeFixture f;
  REQUIRE(f.UntilHealthy(f.Target(ProbeKind::kHttp)).healthy);
  // Use up this process's descriptors: a lower soft limit, then /dev/null until it is reached.
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
  rlimit low = old;
  low.rlim_cur = 256;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  std::vector<int> hog;
  for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) hog.push_back(fd);
  ProbeResult http = f.Once(f.Target(ProbeKind::kHttp));
  ProbeResult tcp = f.Once(f.Target(ProbeKind::kTcp));
  for (int fd : hog) ::close(fd);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
  CHECK_FALSE(http.healthy);
  CHECK(http.local_error);
  CHECK_FALSE(tcp.healthy);
  CHECK(tcp.local_error);
  INFO(http.reason);
  CHECK(http.reason.find("Too many open files") != std::string::npos);
  // With descriptors back, the same probe passes and is the instance's own result.
  ProbeResult again = f.Once(f.Target(ProbeKind::kHttp));
  CHECK(again.healthy);
  CHECK_FALSE(again.local_error);
}

}  // namespace
}  // namespace kiln
