// The data plane through real sockets on 127.0.0.1: echo backends, blocking clients, the proxy on
// its own io thread. Every port is chosen by the kernel (port 0).

#include "proxy/proxy.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <map>
#include <mutex>

#include "proxy/pump.h"
#include "tests/proxy/proxy_test_util.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::EchoBackend;
using testing::Eventually;
using testing::IoThread;
using testing::Request;

// A Proxy on its own io thread; Apply and Snapshot run there.
class ProxyUnderTest {
 public:
  explicit ProxyUnderTest(Proxy::Options options = {}) {
    t_.Run([&] {
      proxy_.emplace(t_.io(), options);
      return 0;
    });
  }
  ~ProxyUnderTest() {
    t_.Run([&] {
      proxy_.reset();
      return 0;
    });
  }
  ProxyUnderTest(const ProxyUnderTest&) = delete;
  ProxyUnderTest& operator=(const ProxyUnderTest&) = delete;

  void Apply(const std::vector<ServiceRoute>& routes) {
    t_.Run([&] {
      proxy_->Apply(routes);
      return 0;
    });
  }
  ProxyStats Snapshot() {
    return t_.Run([&] { return proxy_->Snapshot(); });
  }
  std::optional<RouteStats> Route(const std::string& service) {
    for (RouteStats& r : Snapshot().routes) {
      if (r.service == service) return r;
    }
    return std::nullopt;
  }
  std::optional<EndpointStats> EndpointOf(const std::string& service, const std::string& instance) {
    std::optional<RouteStats> r = Route(service);
    if (!r) return std::nullopt;
    for (EndpointStats& e : r->endpoints) {
      if (e.endpoint.instance == instance) return e;
    }
    return std::nullopt;
  }
  // The port the service listens on; fails the test when it is not bound.
  int Port(const std::string& service) {
    std::optional<RouteStats> r = Route(service);
    REQUIRE(r.has_value());
    INFO(r->bind_error);
    REQUIRE(r->bound_port > 0);
    return r->bound_port;
  }

 private:
  IoThread t_;
  std::optional<Proxy> proxy_;
};

Endpoint To(const EchoBackend& b, int64_t revision = 1) {
  return {.instance = b.name(), .host = "127.0.0.1", .port = b.port(), .revision = revision};
}

ServiceRoute Web(std::vector<Endpoint> endpoints, int listen_port = 0) {
  return {.service = "web",
          .listen_host = "127.0.0.1",
          .listen_port = listen_port,
          .endpoints = std::move(endpoints)};
}

TEST_CASE("the proxy forwards both ways and keeps a half-closed connection", "[proxy]") {
  EchoBackend a("web-1");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(a)})});
  int port = proxy.Port("web");

  SECTION("a request sent with a half-close gets the whole reply") {
    CHECK(Request(port, "hello") == "web-1");
  }

  SECTION("bulk bytes, written and read at once, arrive whole and are counted") {
    std::string payload(3 << 20, 'x');
    for (size_t i = 0; i < payload.size(); i += 4093) payload[i] = static_cast<char>('a' + i % 26);
    UniqueFd fd = testing::Connect(port);
    REQUIRE(fd);
    bool sent = false;
    std::thread writer(
        [&] { sent = testing::SendAll(fd.get(), payload) && ::shutdown(fd.get(), SHUT_WR) == 0; });
    std::optional<std::string> reply = testing::ReadAll(fd.get());
    writer.join();
    CHECK(sent);
    REQUIRE(reply.has_value());
    CHECK(*reply == payload + "|web-1");
    fd.reset();
    REQUIRE(Eventually([&] { return proxy.EndpointOf("web", "web-1")->open_connections == 0; }));
    EndpointStats e = *proxy.EndpointOf("web", "web-1");
    CHECK(e.total_connections == 1);
    CHECK(e.bytes_in == payload.size());
    CHECK(e.bytes_out == payload.size() + 6);
    CHECK(e.state == EndpointState::kActive);
  }
}

TEST_CASE("urgent data does not cut the stream short", "[proxy]") {
  // A read stops at TCP's urgent mark with bytes still queued behind it: a short read must not
  // be taken for an empty socket (or, after the client's FIN, for the end of stream). The
  // urgent byte itself is out of band and not forwarded (HAProxy does the same).
  EchoBackend a("web-1");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(a)})});
  const int port = proxy.Port("web");
  const bool with_fin = GENERATE(true, false);
  CAPTURE(with_fin);
  UniqueFd fd = testing::Connect(port);
  REQUIRE(fd);
  REQUIRE(testing::SendAll(fd.get(), "aaaa"));
  REQUIRE(::send(fd.get(), "b", 1, MSG_OOB | MSG_NOSIGNAL) == 1);
  REQUIRE(testing::SendAll(fd.get(), "cccc"));
  if (with_fin) {
    REQUIRE(::shutdown(fd.get(), SHUT_WR) == 0);
    CHECK(testing::ReadAll(fd.get()) == "aaaacccc|web-1");
  } else {
    CHECK(testing::ReadExactly(fd.get(), 8) == "aaaacccc");
  }
}

TEST_CASE("more clients at once than one batch of events are all served", "[proxy]") {
  EchoBackend a("web-1");
  EchoBackend b("web-2");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(a), To(b)})});
  const int port = proxy.Port("web");
  // Connected first, then all sending at once: far more ready sockets than the 64 events one
  // epoll_wait takes.
  std::vector<UniqueFd> clients;
  for (int i = 0; i < 300; ++i) {
    clients.push_back(testing::Connect(port));
    REQUIRE(clients.back());
  }
  for (UniqueFd& c : clients) {
    REQUIRE(testing::SendAll(c.get(), "x"));
    REQUIRE(::shutdown(c.get(), SHUT_WR) == 0);
  }
  int served = 0;
  for (UniqueFd& c : clients) {
    std::optional<std::string> reply = testing::ReadAll(c.get());
    if (reply == "x|web-1" || reply == "x|web-2") ++served;
  }
  CHECK(served == 300);
  clients.clear();
  CHECK(Eventually([&] {
    return proxy.EndpointOf("web", "web-1")->open_connections == 0 &&
           proxy.EndpointOf("web", "web-2")->open_connections == 0;
  }));
}

TEST_CASE("a conversation past the splice threshold keeps every byte in order", "[proxy]") {
  EchoBackend a("web-1");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(a)})});
  UniqueFd fd = testing::Connect(proxy.Port("web"));
  REQUIRE(fd);
  // 160 rounds of 1 KiB each way, each echoed before the next is sent: both directions copy
  // first, cross kSpliceAfterBytes (64 KiB) in the middle of the conversation, then splice.
  size_t total = 0;
  for (int round = 0; round < 160; ++round) {
    std::string message(1024, static_cast<char>('a' + round % 26));
    message[0] = static_cast<char>(round);
    REQUIRE(testing::SendAll(fd.get(), message));
    REQUIRE(testing::ReadExactly(fd.get(), message.size()) == message);
    total += message.size();
  }
  REQUIRE(total > 2 * kSpliceAfterBytes);
  // A half-close after the switch still reaches the backend, and its reply comes back.
  ::shutdown(fd.get(), SHUT_WR);
  CHECK(testing::ReadAll(fd.get()) == "|web-1");
  fd.reset();
  REQUIRE(Eventually([&] { return proxy.EndpointOf("web", "web-1")->open_connections == 0; }));
  EndpointStats e = *proxy.EndpointOf("web", "web-1");
  CHECK(e.bytes_in == total);
  CHECK(e.bytes_out == total + 6);
}

TEST_CASE("the proxy shares new connections round-robin and Apply is idempotent", "[proxy]") {
  EchoBackend a("web-1");
  EchoBackend b("web-2");
  EchoBackend c("web-3");
  ProxyUnderTest proxy;
  std::vector<ServiceRoute> routes = {Web({To(a), To(b), To(c)})};
  proxy.Apply(routes);
  int port = proxy.Port("web");

  std::map<std::string, int> answered;
  for (int i = 0; i < 30; ++i) {
    std::optional<std::string> who = Request(port, "req" + std::to_string(i));
    REQUIRE(who.has_value());
    ++answered[*who];
    if (i == 14) proxy.Apply(routes);  // the same state again: no new listener, no reset
  }
  CHECK(answered == std::map<std::string, int>{{"web-1", 10}, {"web-2", 10}, {"web-3", 10}});
  CHECK(proxy.Port("web") == port);
  for (const EchoBackend* backend : {&a, &b, &c}) {
    CHECK(backend->accepted() == 10);
    CHECK(proxy.EndpointOf("web", backend->name())->total_connections == 10);
  }
}

TEST_CASE("a refused connect is retried on another endpoint, which is ejected", "[proxy]") {
  FakeClock clock;
  EchoBackend live("web-2");
  ProxyUnderTest proxy({.clock = &clock, .eject_first = 1s, .eject_max = 4s});
  Endpoint dead{.instance = "web-1", .host = "127.0.0.1", .port = testing::RefusingPort()};
  std::vector<ServiceRoute> routes = {Web({dead, To(live)})};
  proxy.Apply(routes);
  int port = proxy.Port("web");

  // Round-robin starts at web-1, which refuses: the client is answered by web-2.
  CHECK(Request(port, "first") == "web-2");
  std::optional<EndpointStats> e = proxy.EndpointOf("web", "web-1");
  CHECK(e->state == EndpointState::kEjected);
  CHECK(e->connect_failures == 1);
  CHECK(e->open_connections == 0);
  // Out of rotation: every connection goes to web-2, web-1 is not tried again.
  for (int i = 0; i < 4; ++i) CHECK(Request(port, "next") == "web-2");
  CHECK(proxy.EndpointOf("web", "web-1")->connect_failures == 1);

  SECTION("after its back-off it is tried again, and ejected for twice as long") {
    clock.Advance(1s);
    CHECK(proxy.EndpointOf("web", "web-1")->state == EndpointState::kActive);
    CHECK(Request(port, "a") == "web-2");
    CHECK(Request(port, "b") == "web-2");
    CHECK(proxy.EndpointOf("web", "web-1")->connect_failures == 2);
    clock.Advance(1s);
    CHECK(proxy.EndpointOf("web", "web-1")->state == EndpointState::kEjected);
    clock.Advance(1s);
    CHECK(proxy.EndpointOf("web", "web-1")->state == EndpointState::kActive);
  }

  SECTION("an Apply that lists it again puts it back in rotation") {
    proxy.Apply(routes);
    CHECK(proxy.EndpointOf("web", "web-1")->state == EndpointState::kActive);
  }

  SECTION("with no endpoint left the client is closed") {
    proxy.Apply({Web({dead})});
    clock.Advance(1s);
    CHECK(Request(port, "nobody") == std::nullopt);
    CHECK(proxy.Route("web")->rejected_connections == 1);
    proxy.Apply({Web({})});
    CHECK(Request(port, "nobody") == std::nullopt);
    CHECK(proxy.Route("web")->rejected_connections == 2);
  }
}

TEST_CASE("a connect that times out is retried on another endpoint", "[proxy]") {
  // A listener with a backlog of 0 that never accepts: once one connection waits in its queue,
  // the kernel drops further SYNs, so a connect to it neither succeeds nor fails.
  UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(silent.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  REQUIRE(::listen(silent.get(), 0) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(::getsockname(silent.get(), reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  int silent_port = ntohs(addr.sin_port);
  UniqueFd queued = testing::Connect(silent_port);
  REQUIRE(queued);

  EchoBackend live("web-2");
  ProxyUnderTest proxy({.connect_timeout = 200ms});
  Endpoint stuck{.instance = "web-1", .host = "127.0.0.1", .port = silent_port};
  proxy.Apply({Web({stuck, To(live)})});

  CHECK(Request(proxy.Port("web"), "slow") == "web-2");
  std::optional<EndpointStats> e = proxy.EndpointOf("web", "web-1");
  CHECK(e->state == EndpointState::kEjected);
  CHECK(e->connect_failures == 1);
  CHECK(e->open_connections == 0);
}

TEST_CASE("an endpoint left out of Apply drains: its open connection goes on", "[proxy]") {
  EchoBackend old_one("web-1");
  EchoBackend new_one("web-2");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(old_one, 1)})});
  int port = proxy.Port("web");

  UniqueFd kept = testing::Connect(port);
  REQUIRE(kept);
  REQUIRE(testing::SendAll(kept.get(), "ping"));
  CHECK(testing::ReadExactly(kept.get(), 4) == "ping");

  proxy.Apply({Web({To(new_one, 2)})});
  std::optional<EndpointStats> draining = proxy.EndpointOf("web", "web-1");
  REQUIRE(draining.has_value());
  CHECK(draining->state == EndpointState::kDraining);
  CHECK(draining->open_connections == 1);
  CHECK(proxy.EndpointOf("web", "web-2")->state == EndpointState::kActive);

  // New connections go to the new endpoint only; the old connection still works both ways.
  for (int i = 0; i < 3; ++i) CHECK(Request(port, "new") == "web-2");
  REQUIRE(testing::SendAll(kept.get(), "pong"));
  CHECK(testing::ReadExactly(kept.get(), 4) == "pong");
  CHECK(old_one.accepted() == 1);
  CHECK(proxy.EndpointOf("web", "web-1")->open_connections == 1);

  // Its client ends it: the reply still arrives, then the endpoint leaves the snapshot.
  ::shutdown(kept.get(), SHUT_WR);
  CHECK(testing::ReadAll(kept.get()) == "|web-1");
  kept.reset();
  CHECK(Eventually([&] { return !proxy.EndpointOf("web", "web-1").has_value(); }));
  CHECK(proxy.Route("web")->endpoints.size() == 1);
}

TEST_CASE("a removed service stops listening and drains its connections", "[proxy]") {
  EchoBackend a("web-1");
  ProxyUnderTest proxy;
  proxy.Apply({Web({To(a)})});
  int port = proxy.Port("web");
  UniqueFd kept = testing::Connect(port);
  REQUIRE(testing::SendAll(kept.get(), "ping"));
  CHECK(testing::ReadExactly(kept.get(), 4) == "ping");

  proxy.Apply({});
  std::optional<RouteStats> r = proxy.Route("web");
  REQUIRE(r.has_value());
  CHECK(r->removed);
  CHECK(r->bound_port == 0);
  CHECK(r->endpoints.at(0).state == EndpointState::kDraining);
  CHECK_FALSE(testing::Connect(port));  // nothing listens there any more

  ::shutdown(kept.get(), SHUT_WR);
  CHECK(testing::ReadAll(kept.get()) == "|web-1");
  kept.reset();
  CHECK(Eventually([&] { return proxy.Snapshot().routes.empty(); }));
}

TEST_CASE("destroying the proxy closes its listeners and its connections", "[proxy]") {
  EchoBackend a("web-1");
  auto proxy = std::make_unique<ProxyUnderTest>();
  proxy->Apply({Web({To(a)})});
  int port = proxy->Port("web");
  UniqueFd kept = testing::Connect(port);
  REQUIRE(testing::SendAll(kept.get(), "ping"));
  CHECK(testing::ReadExactly(kept.get(), 4) == "ping");

  proxy.reset();
  CHECK(testing::ReadAll(kept.get()) == "");  // end of stream, not the 10 s timeout
  CHECK_FALSE(testing::Connect(port));
}

TEST_CASE("a listen port in use is an error on its route, retried, and others work", "[proxy]") {
  EchoBackend a("web-1");
  EchoBackend b("api-1");
  auto squatter = std::make_unique<IoThread>();
  auto taken = std::make_unique<asio::ip::tcp::acceptor>(
      squatter->io(), asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  int busy_port = taken->local_endpoint().port();

  ProxyUnderTest proxy({.bind_retry = 20ms});
  proxy.Apply({Web({To(a)}, busy_port),
               {.service = "api", .listen_host = "127.0.0.1", .endpoints = {To(b)}}});
  std::optional<RouteStats> web = proxy.Route("web");
  REQUIRE(web.has_value());
  CHECK(web->bound_port == 0);
  CHECK_THAT(web->bind_error,
             Catch::Contains(std::to_string(busy_port)) && Catch::Contains("in use"));
  CHECK(Request(proxy.Port("api"), "hi") == "api-1");

  // The port is freed: the retry binds it and the service answers there.
  taken.reset();
  REQUIRE(Eventually([&] { return proxy.Route("web")->bound_port == busy_port; }));
  CHECK(proxy.Route("web")->bind_error.empty());
  CHECK(Request(busy_port, "hi") == "web-1");
}

TEST_CASE("swapping the endpoint set under load fails no connection", "[proxy]") {
  constexpr int kRequests = 200;
  constexpr int kClients = 16;
  std::vector<std::unique_ptr<EchoBackend>> backends;
  for (int i = 1; i <= 6; ++i) {
    backends.push_back(std::make_unique<EchoBackend>("web-" + std::to_string(i)));
  }
  auto set = [&](int first, int64_t revision) {
    std::vector<Endpoint> v;
    for (int i = first; i < first + 3; ++i) v.push_back(To(*backends[i], revision));
    return v;
  };
  ProxyUnderTest proxy;
  proxy.Apply({Web(set(0, 1))});
  int port = proxy.Port("web");

  std::atomic<int> next{0};
  std::atomic<int> completed{0};
  std::atomic<int> failed{0};
  std::mutex mu;  // guards answered
  std::map<std::string, int> answered;
  std::vector<std::thread> clients;
  clients.reserve(kClients);
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&] {
      for (int i = next++; i < kRequests; i = next++) {
        std::optional<std::string> who = Request(port, "request-" + std::to_string(i));
        if (!who) {
          ++failed;
        } else {
          std::lock_guard lock(mu);
          ++answered[*who];
        }
        ++completed;
      }
    });
  }
  // Mid-way, the old set leaves the pool (drains) and the new set takes the new connections.
  bool halfway = Eventually([&] { return completed.load() >= kRequests / 2; }, 30s);
  proxy.Apply({Web(set(3, 2))});
  for (std::thread& t : clients) t.join();

  CHECK(halfway);
  CHECK(failed.load() == 0);
  CHECK(completed.load() == kRequests);
  int old_answers = answered["web-1"] + answered["web-2"] + answered["web-3"];
  int new_answers = answered["web-4"] + answered["web-5"] + answered["web-6"];
  CHECK(old_answers >= kRequests / 2);
  CHECK(new_answers > 0);
  CHECK(old_answers + new_answers == kRequests);
  // Once their connections are closed, the old endpoints are gone from the snapshot.
  CHECK(Eventually([&] { return proxy.Route("web")->endpoints.size() == 3; }));
  std::optional<RouteStats> after = proxy.Route("web");
  REQUIRE(after.has_value());
  for (const EndpointStats& e : after->endpoints) {
    CHECK(e.endpoint.revision == 2);
    CHECK(e.state == EndpointState::kActive);
    CHECK(e.connect_failures == 0);
  }
}

}  // namespace
}  // namespace kiln
