// Stable addresses end to end: a real kilnd, the kiln-proxy it runs, kiln-testsvc instances, and
// clients that send requests through `expose.port` the whole time, some on a new connection per
// request, some on long-lived keep-alive connections. Every way an instance is replaced must cost
// them no failed request.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <mutex>
#include <thread>

#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

int Connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool SendAll(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t n = ::send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Reads one HTTP/1.1 response (headers, then Content-Length bytes). Returns the body, or "" with
// `got_any` saying whether any byte of a response arrived.
std::optional<std::string> ReadResponse(int fd, bool* got_any, std::string* error) {
  std::string buf;
  char chunk[4096];
  *got_any = false;
  size_t header_end = std::string::npos;
  while (header_end == std::string::npos) {
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n <= 0) {
      *error = n == 0 ? "connection closed" : std::string("recv: ") + std::strerror(errno);
      return std::nullopt;
    }
    *got_any = true;
    buf.append(chunk, static_cast<size_t>(n));
    header_end = buf.find("\r\n\r\n");
  }
  if (buf.rfind("HTTP/1.1 200", 0) != 0) {
    *error = "status line: " + buf.substr(0, buf.find("\r\n"));
    return std::nullopt;
  }
  size_t cl = buf.find("Content-Length: ");
  if (cl == std::string::npos || cl > header_end) {
    *error = "no Content-Length";
    return std::nullopt;
  }
  const size_t length = std::stoul(buf.substr(cl + 16));
  while (buf.size() < header_end + 4 + length) {
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n <= 0) {
      *error = "body cut short";
      return std::nullopt;
    }
    buf.append(chunk, static_cast<size_t>(n));
  }
  return buf.substr(header_end + 4, length);
}

// One GET / on a new connection through `port`: the body of a 200, or nullopt.
std::optional<std::string> GetOnce(int port) {
  int fd = Connect(port);
  if (fd < 0) return std::nullopt;
  bool any = false;
  std::string err;
  std::optional<std::string> body;
  if (SendAll(fd, "GET / HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")) {
    body = ReadResponse(fd, &any, &err);
  }
  ::close(fd);
  return body;
}

// Clients sending GET / through the stable address until stopped: `short_clients` threads with
// a new connection per request, `keepalive_clients` threads each reusing one connection. A
// keep-alive client does what HTTP clients do when the server closed an idle connection before
// any byte of the response: it sends the request again on a new connection (a reconnect, not a
// failure). Anything else that does not end in 200 is a failure.
class Load {
 public:
  Load(int port, int short_clients, int keepalive_clients) : port_(port) {
    for (int i = 0; i < short_clients; ++i) threads_.emplace_back([this] { ShortLoop(); });
    for (int i = 0; i < keepalive_clients; ++i) threads_.emplace_back([this] { KeepAliveLoop(); });
  }
  ~Load() { Stop(); }
  void Stop() {
    stop_ = true;
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  struct Failure {
    std::chrono::steady_clock::time_point at;
    std::string why;
  };
  // Failures since the last call, with when and why.
  std::vector<Failure> TakeFailures() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(failures_, {});
  }
  uint64_t ok() const { return ok_; }
  uint64_t reconnects() const { return reconnects_; }
  std::set<std::string> Versions() {
    std::lock_guard<std::mutex> lock(mu_);
    return versions_;
  }

 private:
  void Fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    failures_.push_back({std::chrono::steady_clock::now(), why});
  }
  void Ok(const std::string& body) {
    ++ok_;
    std::lock_guard<std::mutex> lock(mu_);
    versions_.insert(body);
  }
  void ShortLoop() {
    const std::string req = "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
    while (!stop_) {
      int fd = Connect(port_);
      if (fd < 0) {
        Fail(std::string("connect: ") + std::strerror(errno));
      } else {
        bool any = false;
        std::string error;
        std::optional<std::string> body;
        if (!SendAll(fd, req)) {
          error = "send failed";
        } else {
          body = ReadResponse(fd, &any, &error);
        }
        ::close(fd);
        if (body) {
          Ok(*body);
        } else {
          Fail("new connection: " + error);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(4));
    }
  }
  void KeepAliveLoop() {
    const std::string req = "GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    int fd = -1;
    while (!stop_) {
      bool reused = fd >= 0;
      if (fd < 0) fd = Connect(port_);
      if (fd < 0) {
        Fail(std::string("keep-alive connect: ") + std::strerror(errno));
      } else {
        bool any = false;
        std::string error;
        std::optional<std::string> body;
        if (SendAll(fd, req)) body = ReadResponse(fd, &any, &error);
        if (!body && reused && !any) {  // closed while idle: retry once on a new connection
          ++reconnects_;
          ::close(fd);
          fd = Connect(port_);
          if (fd >= 0 && SendAll(fd, req)) body = ReadResponse(fd, &any, &error);
        }
        if (body) {
          Ok(*body);
        } else {
          Fail("keep-alive: " + error);
          if (fd >= 0) ::close(fd);
          fd = -1;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (fd >= 0) ::close(fd);
  }

  const int port_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> ok_{0};
  std::atomic<uint64_t> reconnects_{0};
  std::mutex mu_;  // guards failures_ and versions_
  std::vector<Failure> failures_;
  std::set<std::string> versions_;
  std::vector<std::thread> threads_;
};

// `replicas` live instances of `web`, every one healthy and of its target's template (a
// rollback's revision has the template of the one it went back to), none draining.
bool Converged(KilndHarness& h, int replicas) {
  auto store = h.Store();
  if (!store) return false;
  auto svc = store->GetService("web");
  if (!svc.ok()) return false;
  const int64_t target = svc->pinned_revision > 0 ? svc->pinned_revision : svc->desired_revision;
  auto target_rev = store->GetRevision("web", target);
  auto live = store->ListInstances("web", false);
  if (!target_rev.ok() || !live.ok() || static_cast<int>(live->size()) != replicas) return false;
  for (const auto& i : *live) {
    auto rev = store->GetRevision("web", i.revision);
    if (i.state != InstanceState::kHealthy || !rev.ok() ||
        rev->template_hash != target_rev->template_hash) {
      return false;
    }
  }
  return true;
}

std::string Joined(const std::vector<Load::Failure>& v) {
  std::string out;
  for (size_t i = 0; i < v.size() && i < 10; ++i) out += v[i].why + "\n";
  return out;
}

int Kilnctl(KilndHarness& h, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {BinPath("kilnctl"), "--addr", h.UnixAddr()};
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv).exit_code;
}

const char* const kHealth =
    "{http: {path: /healthz}, interval: 100ms, timeout: 500ms, failure_threshold: 2}";

TEST_CASE(
    "expose: clients through the stable address see no failed request across every kind "
    "of replacement",
    "[expose][integration]") {
  KilndHarness h;
  const int port = FreePort();
  h.SetExtraYaml("expose: {port: " + std::to_string(port) + ", drain: 3s}\n");
  const std::string rolling =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 300ms}";
  h.Declare("web", "v1", 3, rolling);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return Converged(h, 3); }));
  // The proxy serves once it has the pool.
  REQUIRE(WaitFor([&] { return GetOnce(port).has_value(); }));

  Load load(port, 4, 2);
  int cut_by_kill = 0;
  const auto began = std::chrono::steady_clock::now();
  // `killed`: the step kills an instance with SIGKILL at that time. The proxy forwards TCP: it
  // retries a connect an instance refuses, but a request already sent to the instance killed
  // cannot be replayed safely (it may have been acted on), so a client with a request in
  // flight on it at that very moment sees its connection end. Those, and only those, are
  // allowed: a connection cut without a response within 250 ms of the kill.
  std::optional<std::chrono::steady_clock::time_point> killed;
  // Ends once `replicas` instances of the target run and the address answers `serves` (so a
  // step whose manifest kilnd has not reloaded yet does not pass for converged).
  auto step = [&](const std::string& what, const std::function<void()>& act, int replicas,
                  const std::string& serves) {
    INFO(what);
    killed.reset();
    act();
    CHECK(WaitFor([&] { return Converged(h, replicas) && GetOnce(port) == serves + "\n"; },
                  std::chrono::seconds(60)));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::vector<Load::Failure> failures;
    for (Load::Failure& f : load.TakeFailures()) {
      const bool in_flight_on_killed = killed && f.at >= *killed &&
                                       f.at - *killed < std::chrono::milliseconds(250) &&
                                       (f.why.find("connection closed") != std::string::npos ||
                                        f.why.find("reset by peer") != std::string::npos);
      if (in_flight_on_killed) {
        ++cut_by_kill;
      } else {
        failures.push_back(std::move(f));
      }
    }
    CHECK(failures.size() == 0);
    if (!failures.empty()) FAIL_CHECK(Joined(failures));
  };

  step(
      "rolling update", [&] { h.Declare("web", "v2", 3, rolling); }, 3, "v2");
  CHECK(load.Versions().count("v2\n") == 1);

  step(
      "blue-green update",
      [&] { h.Declare("web", "v3", 3, "{strategy: blue-green, min_healthy_time: 300ms}"); }, 3,
      "v3");

  step(
      "canary with promotion",
      [&] {
        h.Declare("web", "v4", 3,
                  "{strategy: canary, canary: 1, auto_promote: false, min_healthy_time: 300ms}");
        REQUIRE(WaitFor([&] {
          auto svc = h.Service("web");
          return svc.ok() && h.Healthy("web", svc->desired_revision) >= 1 &&
                 Kilnctl(h, {"promote", "web"}) == 0;
        }));
      },
      3, "v4");

  step(
      "automatic rollback of a revision that never becomes healthy",
      [&] {
        h.Declare("web", "v5", 3,
                  "{strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 300ms, "
                  "healthy_deadline: 2s, progress_deadline: 3s, auto_rollback: true}",
                  ", \"--unhealthy-after\", \"0s\"", kHealth);
        REQUIRE(WaitFor([&] { return h.HasEvent("web", EventKind::kRolledBack); },
                        std::chrono::seconds(30)));
      },
      3, "v4");
  CHECK(load.Versions().count("v5\n") == 0);  // never in the pool

  step(
      "kill -9 of an instance",
      [&] {
        auto live = h.Live("web");
        REQUIRE(!live.empty());
        killed = std::chrono::steady_clock::now();
        ::kill(static_cast<pid_t>(live[0].pid), SIGKILL);
      },
      3, "v4");

  step(
      "kilnctl replace",
      [&] {
        auto live = h.Live("web");
        REQUIRE(!live.empty());
        REQUIRE(Kilnctl(h, {"replace", live[0].name}) == 0);
      },
      3, "v4");

  // Unpin (the rollback pinned it) and scale down then up.
  REQUIRE(Kilnctl(h, {"unpin", "web"}) == 0);
  h.Declare("web", "v6", 3, rolling);
  REQUIRE(WaitFor([&] { return Converged(h, 3) && GetOnce(port) == "v6\n"; },
                  std::chrono::seconds(60)));
  CHECK(load.TakeFailures().empty());
  step(
      "scale 3 -> 1", [&] { h.Declare("web", "v6", 1, rolling); }, 1, "v6");
  step(
      "scale 1 -> 3", [&] { h.Declare("web", "v6", 3, rolling); }, 3, "v6");

  step(
      "SIGKILL of kilnd in the middle of a rolling update, then a restart",
      [&] {
        h.Declare("web", "v7", 3, rolling);
        REQUIRE(WaitFor([&] { return h.Healthy("web") >= 4 || !h.Live("web").empty(); }));
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        h.Kill9();
        std::this_thread::sleep_for(std::chrono::seconds(1));  // the proxy alone serves
        h.Start();
        REQUIRE(h.WaitReady());
      },
      3, "v7");

  load.Stop();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  WARN("expose: " << load.ok() << " requests in " << seconds << " s ("
                  << static_cast<int>(load.ok() / seconds) << "/s), " << load.reconnects()
                  << " keep-alive reconnects after an idle close, " << cut_by_kill
                  << " cut in flight by the kill -9");
  CHECK(cut_by_kill <= 6);  // at most one per client
  CHECK(load.TakeFailures().empty());
}

TEST_CASE(
    "expose: a long-lived connection keeps its instance until it closes, then the "
    "instance is stopped",
    "[expose][integration]") {
  KilndHarness h;
  const int port = FreePort();
  h.SetExtraYaml("expose: {port: " + std::to_string(port) + ", drain: 30s}\n");
  h.Declare("web", "v1", 1, "{strategy: rolling}");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return Converged(h, 1); }));
  int fd = -1;
  REQUIRE(WaitFor([&] {
    fd = Connect(port);
    bool any = false;
    std::string err;
    if (fd >= 0 && SendAll(fd, "GET / HTTP/1.1\r\nHost: w\r\n\r\n") &&
        ReadResponse(fd, &any, &err) == std::optional<std::string>("v1\n")) {
      return true;
    }
    if (fd >= 0) ::close(fd);
    return false;
  }));
  const std::string old = h.Live("web")[0].name;

  h.Declare("web", "v2", 1, "{strategy: rolling}");
  REQUIRE(WaitFor([&] {
    for (const auto& i : h.Live("web")) {
      if (i.name == old && i.state == InstanceState::kDraining) return true;
    }
    return false;
  }));
  // New connections go to v2; the open one still reaches v1, for as long as it stays open.
  for (int i = 0; i < 5; ++i) {
    bool any = false;
    std::string err;
    REQUIRE(SendAll(fd, "GET / HTTP/1.1\r\nHost: w\r\n\r\n"));
    CHECK(ReadResponse(fd, &any, &err) == std::optional<std::string>("v1\n"));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  CHECK_FALSE(h.HasEvent("web", EventKind::kInstanceDrained));
  auto drain_line = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status", "web"});
  CHECK(drain_line.out.find("draining: 1 open connection") != std::string::npos);
  const int64_t closed_ms = ToUnixMillis(std::chrono::system_clock::now());
  ::close(fd);
  REQUIRE(WaitFor([&] { return Converged(h, 1); }));
  // Drained after the close, and stopped after it was drained.
  int64_t drained_ms = 0, terminated_ms = 0;
  for (const auto& e : h.Events("web")) {
    if (e.instance != old) continue;
    if (e.kind == EventKind::kInstanceDrained) drained_ms = e.time_ms;
    if (e.kind == EventKind::kInstanceTerminated) terminated_ms = e.time_ms;
  }
  CHECK(drained_ms >= closed_ms);
  CHECK(terminated_ms >= drained_ms);

  // What the proxy did is in kilnd's metrics, by service and revision, with each instance's
  // pool state.
  CHECK(GetOnce(port) == std::optional<std::string>("v2\n"));
  HttpReply metrics;
  CHECK(WaitFor([&] {
    metrics = HttpRequest(h.HttpPort(), "/metrics");
    return metrics.body.find("kiln_proxy_connections_total{service=\"web\",revision=\"2\"} 1") !=
           std::string::npos;
  }));
  CHECK(metrics.body.find("kiln_pool_endpoints{service=\"web\",revision=\"2\"") !=
        std::string::npos);
  CHECK(metrics.body.find("kiln_proxy_process_up 1") != std::string::npos);
}

TEST_CASE("expose: a port another program holds is a Degraded condition, retried until free",
          "[expose][integration]") {
  // Another program has the port.
  const int port = FreePort();
  int holder = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  REQUIRE(::bind(holder, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(holder, 8) == 0);

  KilndHarness h;
  h.SetExtraYaml("expose: {port: " + std::to_string(port) + "}\n");
  h.Declare("web", "v1", 1, "{strategy: rolling}");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return Converged(h, 1); }));
  auto status = [&] {
    return Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status", "web"}).out;
  };
  CHECK(WaitFor([&] { return status().find("ExposeBindFailed") != std::string::npos; }));
  const std::string out = status();
  CHECK(out.find("cannot listen on 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK(out.find("Address already in use") != std::string::npos);
  CHECK(h.kilnd().Wait(std::chrono::milliseconds(0)) == -1);  // kilnd runs on

  ::close(holder);
  CHECK(WaitFor([&] { return GetOnce(port) == std::optional<std::string>("v1\n"); }));
  CHECK(WaitFor([&] { return status().find("ExposeBindFailed") == std::string::npos; }));
}

TEST_CASE(
    "expose: the proxy keeps serving while kilnd is down, and nothing is left when the "
    "service is retired",
    "[expose][integration]") {
  KilndHarness h;
  const int port = FreePort();
  h.SetExtraYaml("expose: {port: " + std::to_string(port) + ", drain: 2s}\n");
  h.Declare("web", "v1", 2, "{strategy: rolling}");
  h.SetExtraYaml("");
  // A directory that declares no service at all is an error (kilnd keeps what it had): a second
  // service stays when `web` goes.
  h.Declare("other", "v1", 1, "{strategy: rolling}");
  h.Start({"--retire-after", "0s"});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return Converged(h, 2); }));
  auto get = [&] { return GetOnce(port).has_value(); };
  REQUIRE(WaitFor(get));
  REQUIRE(h.ProxyProcesses().size() == 1);
  const pid_t proxy = h.ProxyProcesses()[0];

  h.kilnd().Signal(SIGTERM);
  REQUIRE(h.kilnd().Wait(std::chrono::seconds(10)) == 0);
  for (int i = 0; i < 20; ++i) CHECK(get());
  h.Start({"--retire-after", "0s"});
  REQUIRE(h.WaitReady());
  h.Kill9();
  for (int i = 0; i < 20; ++i) CHECK(get());

  // The next kilnd adopts the same proxy rather than starting a second one.
  h.Start({"--retire-after", "0s"});
  REQUIRE(h.WaitReady());
  std::this_thread::sleep_for(std::chrono::seconds(1));
  CHECK(h.ProxyProcesses() == std::vector<pid_t>{proxy});

  std::filesystem::remove(h.manifests() / "web.yaml");
  REQUIRE(WaitFor([&] { return h.Live("web").empty(); }, std::chrono::seconds(30)));
  auto web_processes = [&] {
    int n = 0;
    for (const auto& [pid, name] : h.InstanceProcesses()) n += name.rfind("web-", 0) == 0;
    return n;
  };
  // No address is left to serve: kilnd stops its proxy too.
  CHECK(WaitFor([&] { return web_processes() == 0 && h.ProxyProcesses().empty(); },
                std::chrono::seconds(15)));
  CHECK_FALSE(get());
}

}  // namespace
}  // namespace kiln::testing
