#include "proxy/proxy.h"

#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <optional>
#include <unordered_set>
#include <utility>

#include "common/cancel_quietly.h"
#include "common/descriptors.h"
#include "common/logging.h"
#include "proxy/pump.h"

namespace kiln {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

std::string_view EndpointStateName(EndpointState s) {
  switch (s) {
    case EndpointState::kActive:
      return "active";
    case EndpointState::kDraining:
      return "draining";
    case EndpointState::kEjected:
      return "ejected";
  }
  return "unknown";
}

namespace {

class Session;

// One endpoint of a route, shared with the connections made to it so that its counters outlive
// its place in the pool while it drains.
struct Backend {
  Endpoint endpoint;
  std::optional<tcp::endpoint> address;  // nullopt: `endpoint.host` is not an IP address
  bool listed = true;                    // in the last Apply; false: draining
  SteadyTime ejected_until{};            // out of rotation before this
  Duration next_ejection{};              // how long the next ejection lasts
  // Connections made or being made to it: a connection counts from its first connect attempt,
  // so an endpoint is never "drained" while a connect to it is still in flight.
  int64_t open = 0;
  uint64_t total = 0;
  uint64_t failures = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;

  bool Ejected(SteadyTime now) const { return listed && now < ejected_until; }
  EndpointState State(SteadyTime now) const {
    if (!listed) return EndpointState::kDraining;
    return Ejected(now) ? EndpointState::kEjected : EndpointState::kActive;
  }
  bool SameAddress(const Endpoint& e) const {
    return endpoint.instance == e.instance && endpoint.host == e.host && endpoint.port == e.port;
  }
};

std::string HostPort(const std::string& host, int port) {
  return host + ":" + std::to_string(port);
}

}  // namespace

struct Proxy::Shared {
  Shared(asio::io_context& io_context, Options opts) : io(io_context), options(opts) {}
  asio::io_context& io;
  Options options;
  std::unordered_set<Session*> sessions;  // the open connections, closed with the Proxy
};

struct Proxy::Route : std::enable_shared_from_this<Proxy::Route> {
  Route(std::shared_ptr<Shared> s, std::string name)
      : shared(std::move(s)), service(std::move(name)), acceptor(shared->io), timer(shared->io) {}

  // Binds and listens on listen_host:listen_port, or keeps the error and tries again later.
  void Listen();
  void Unlisten() noexcept {
    error_code ignored;
    CancelQuietly(timer, "listen retry timer");
    acceptor.close(ignored);
    bound_port = 0;
  }
  // Waits until the listener is readable, then AcceptReady.
  void Accept();
  // Out of descriptors, most likely: pause rather than spin on the error, then accept again
  // without waiting (what is pending raises no new readiness).
  void PauseAccepting(const std::string& error);
  // Accepts what is pending (up to a batch), each socket non-blocking and close-on-exec from
  // accept4(2) itself; waits again only after EAGAIN (the reactor is edge-triggered).
  void AcceptReady();
  // The next endpoint in rotation that `tried` does not hold; null when none is left.
  std::shared_ptr<Backend> Pick(const std::vector<std::shared_ptr<Backend>>& tried);

  std::shared_ptr<Shared> shared;
  std::string service;
  std::string listen_host;
  int listen_port = 0;
  int bound_port = 0;
  std::string bind_error;
  bool removed = false;  // not in the last Apply: no listener, kept while connections drain
  tcp::acceptor acceptor;
  tcp protocol = tcp::v4();  // the listener's, for the sockets it accepts
  uint64_t listening = 0;    // counts Listen calls: a batch posted for an older listener stops
  asio::steady_timer timer;  // bind retry, or a pause after a failed accept
  std::vector<std::shared_ptr<Backend>> backends;
  size_t next = 0;  // round-robin cursor into `backends`
  uint64_t rejected = 0;
};

namespace {

// One client connection: connects to an endpoint of the route (the next in rotation, then the
// others once each on failure), then forwards both directions until both have ended.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(std::shared_ptr<Proxy::Shared> shared, std::shared_ptr<Proxy::Route> route,
          tcp::socket client)
      : shared_(std::move(shared)),
        route_(std::move(route)),
        client_(std::move(client)),
        upstream_(shared_->io),
        timer_(shared_->io) {
    shared_->sessions.insert(this);
  }
  ~Session() {
    Close();
    shared_->sessions.erase(this);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void Start() { TryNext(); }

  // Closes both sides; pending operations end with operation_aborted and release the session.
  void Close() noexcept {
    if (closed_) return;
    closed_ = true;
    error_code ignored;
    CancelQuietly(timer_, "connect timer");
    client_.close(ignored);
    upstream_.close(ignored);
    if (backend_) --backend_->open;
  }

 private:
  void TryNext() {
    backend_ = route_->Pick(tried_);
    if (!backend_) {
      ++route_->rejected;
      LogWarn("no endpoint took the connection; closing it",
              {{"service", route_->service}, {"tried", static_cast<int64_t>(tried_.size())}});
      Close();
      return;
    }
    tried_.push_back(backend_);
    ++backend_->open;
    if (!backend_->address) {
      ConnectFailed("not an IP address: " + backend_->endpoint.host);
      return;
    }
    error_code ignored;
    upstream_.close(ignored);
    // Non-blocking and close-on-exec from socket(2) itself: Asio 1.74 opens without
    // SOCK_CLOEXEC, and two fcntl(2) after it cost time and leave a window for an exec
    // elsewhere in the process. TCP_NODELAY: forwarded bytes go as they come, never held back.
    tcp protocol = backend_->address->protocol();
    int fd = ::socket(protocol.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    error_code ec;
    if (fd < 0) {
      ec.assign(errno, boost::system::system_category());
    } else {
      upstream_.assign(protocol, fd, ec);
      if (ec) ::close(fd);
    }
    if (!ec) upstream_.set_option(tcp::no_delay(true), ec);
    if (ec) {
      ConnectFailed("socket: " + ec.message());
      return;
    }
    timed_out_ = false;
    timer_.expires_after(shared_->options.connect_timeout);
    // The attempt number keeps a timeout that fired just as its connect failed from cutting the
    // next attempt's connect.
    timer_.async_wait([self = shared_from_this(), attempt = tried_.size()](error_code ec) {
      if (ec || attempt != self->tried_.size()) return;
      self->timed_out_ = true;
      error_code ignored;
      self->upstream_.cancel(ignored);
    });
    Connect();
  }

  // connect(2) on the non-blocking socket, and again each time it is writable: 0 or EISCONN say
  // it is connected, EALREADY that it is still connecting (a spurious wake-up), anything else is
  // the connect's error. Asio's async_connect asks poll(2) and getsockopt(2) instead: one system
  // call more per connection.
  void Connect() {
    const tcp::endpoint& to = *backend_->address;
    for (;;) {
      if (::connect(upstream_.native_handle(), to.data(), static_cast<socklen_t>(to.size())) == 0 ||
          errno == EISCONN) {
        return Connected({});
      }
      if (errno == EINPROGRESS || errno == EALREADY) break;
      if (errno != EINTR) return Connected({errno, boost::system::system_category()});
    }
    upstream_.async_wait(tcp::socket::wait_write, [self = shared_from_this()](error_code ec) {
      if (ec) return self->Connected(ec);
      self->Connect();
    });
  }

  void Connected(error_code ec) {
    CancelQuietly(timer_, "connect timer");
    OnConnected(ec);
  }

  void OnConnected(error_code ec) {
    if (closed_) return;
    if (ec) {
      ConnectFailed(timed_out_ ? "connect timed out" : ec.message());
      return;
    }
    ++backend_->total;
    backend_->next_ejection = shared_->options.eject_first;
    Forward();
  }

  // Takes the endpoint out of rotation (unless a connection before this one already did) and
  // tries the next.
  void ConnectFailed(const std::string& error) {
    Backend& b = *backend_;
    --b.open;
    ++b.failures;
    const Proxy::Options& o = shared_->options;
    SteadyTime now = o.clock->SteadyNow();
    if (b.listed && !b.Ejected(now)) {
      Duration d = b.next_ejection.count() > 0 ? b.next_ejection : o.eject_first;
      b.ejected_until = now + d;
      b.next_ejection = std::min(d * 2, o.eject_max);
      LogWarn("endpoint failed a connect; ejected from the pool",
              {{"service", route_->service},
               {"instance", b.endpoint.instance},
               {"revision", b.endpoint.revision},
               {"address", HostPort(b.endpoint.host, b.endpoint.port)},
               {"error", error},
               {"ejected_ms", static_cast<int64_t>(d.count())}});
    }
    backend_.reset();  // still held by tried_
    TryNext();
  }

  // Both sockets are non-blocking, close-on-exec and TCP_NODELAY already (the client's from
  // the listener's options and accept4).
  void Forward() {
    Backend* b = backend_.get();
    up_ = MakePump(client_, upstream_, [b](size_t n) { b->bytes_in += n; });
    down_ = MakePump(upstream_, client_, [b](size_t n) { b->bytes_out += n; });
    // The pumps' pending operations hold the session (`self`); what a pump keeps of `done`
    // must not, or a session whose operations are dropped unrun (its io_context shut down)
    // would keep itself alive through its own pumps.
    auto self = shared_from_this();
    // The client has most likely sent its request already; the endpoint's reply comes after it.
    up_->Start(self, [this](error_code ec) { OnPumpDone(ec, *down_); });
    if (!closed_) down_->StartWaiting(self, [this](error_code ec) { OnPumpDone(ec, *up_); });
  }

  void OnPumpDone(error_code ec, Pump& other) {
    ++pumps_done_;
    // The first direction to end half-closes its output; the second need not, as Close is next.
    if (!ec && pumps_done_ == 1) other.SkipHalfClose();
    if (ec && ec != asio::error::operation_aborted) {
      LogDebug("connection ended with an error",
               {{"service", route_->service},
                {"instance", backend_ ? backend_->endpoint.instance : std::string()},
                {"error", ec.message()}});
    }
    if (ec || pumps_done_ == 2) Close();
  }

  std::shared_ptr<Proxy::Shared> shared_;
  std::shared_ptr<Proxy::Route> route_;
  tcp::socket client_;
  tcp::socket upstream_;
  asio::steady_timer timer_;          // the connect timeout
  std::shared_ptr<Backend> backend_;  // the endpoint being connected to or forwarded to
  std::vector<std::shared_ptr<Backend>> tried_;
  std::unique_ptr<Pump> up_;    // client -> endpoint
  std::unique_ptr<Pump> down_;  // endpoint -> client
  int pumps_done_ = 0;
  bool timed_out_ = false;
  bool closed_ = false;
};

}  // namespace

void Proxy::Route::Listen() {
  ++listening;
  error_code ec;
  asio::ip::address address = asio::ip::make_address(listen_host, ec);
  if (!ec) {
    tcp::endpoint at(address, static_cast<uint16_t>(listen_port));
    protocol = at.protocol();
    acceptor.open(at.protocol(), ec);
    if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    // Inherited by every accepted socket on Linux: one system call per listener, not per client.
    if (!ec) acceptor.set_option(tcp::no_delay(true), ec);
    if (!ec) acceptor.non_blocking(true, ec);
    if (!ec) acceptor.bind(at, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  }
  if (!ec) {
    if (Status s = SetCloseOnExec(acceptor.native_handle()); !s.ok()) {
      LogWarn("cannot mark a listener close-on-exec",
              {{"service", service}, {"error", s.message()}});
    }
    bound_port = acceptor.local_endpoint(ec).port();
  }
  if (ec) {
    error_code ignored;
    acceptor.close(ignored);
    bound_port = 0;
    std::string error = "listen on " + HostPort(listen_host, listen_port) + ": " + ec.message();
    if (error != bind_error) {
      LogWarn("cannot listen for a service; retrying",
              {{"service", service},
               {"address", HostPort(listen_host, listen_port)},
               {"error", ec.message()}});
    }
    bind_error = std::move(error);
    timer.expires_after(shared->options.bind_retry);
    timer.async_wait([self = shared_from_this()](error_code wec) {
      if (!wec && !self->removed) self->Listen();
    });
    return;
  }
  bind_error.clear();
  LogInfo("listening for a service",
          {{"service", service}, {"address", HostPort(listen_host, bound_port)}});
  Accept();
}

void Proxy::Route::Accept() {
  acceptor.async_wait(tcp::acceptor::wait_read, [self = shared_from_this()](error_code ec) {
    if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
    if (ec) return self->PauseAccepting(ec.message());
    self->AcceptReady();
  });
}

void Proxy::Route::PauseAccepting(const std::string& error) {
  LogWarn("accept failed", {{"service", service}, {"error", error}});
  timer.expires_after(std::chrono::milliseconds(100));
  timer.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec && self->acceptor.is_open()) self->AcceptReady();
  });
}

void Proxy::Route::AcceptReady() {
  // Connections accepted before yielding to the others' handlers.
  constexpr int kAcceptBatch = 16;
  for (int i = 0; i < kAcceptBatch; ++i) {
    int fd = ::accept4(acceptor.native_handle(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      // A connection that went away before it was accepted, or a signal: the next one.
      if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return Accept();
      return PauseAccepting(std::strerror(err));
    }
    tcp::socket socket(shared->io);
    error_code ec;
    socket.assign(protocol, fd, ec);
    if (ec) {
      ::close(fd);
      LogWarn("cannot watch an accepted connection; closing it",
              {{"service", service}, {"error", ec.message()}});
      continue;
    }
    std::make_shared<Session>(shared, shared_from_this(), std::move(socket))->Start();
  }
  // More may be pending, and no new readiness would say so.
  asio::post(shared->io, [self = shared_from_this(), listening = listening] {
    if (self->acceptor.is_open() && self->listening == listening) self->AcceptReady();
  });
}

std::shared_ptr<Backend> Proxy::Route::Pick(const std::vector<std::shared_ptr<Backend>>& tried) {
  SteadyTime now = shared->options.clock->SteadyNow();
  for (size_t i = 0; i < backends.size(); ++i) {
    size_t at = (next + i) % backends.size();
    const std::shared_ptr<Backend>& b = backends[at];
    if (!b->listed || b->Ejected(now)) continue;
    if (std::find(tried.begin(), tried.end(), b) != tried.end()) continue;
    next = at + 1;
    return b;
  }
  return nullptr;
}

Proxy::Proxy(asio::io_context& io, Options options)
    : shared_(std::make_shared<Shared>(io, options)) {
  ::signal(SIGPIPE, SIG_IGN);
}

Proxy::~Proxy() {
  for (auto& [name, route] : routes_) {
    route->removed = true;
    route->Unlisten();
  }
  for (Session* s : shared_->sessions) s->Close();
}

void Proxy::Apply(const std::vector<ServiceRoute>& wanted) {
  std::map<std::string_view, const ServiceRoute*> by_name;
  for (const ServiceRoute& r : wanted) {
    if (!by_name.emplace(r.service, &r).second) {
      LogError("service listed twice; the first wins", {{"service", r.service}});
    }
  }
  // Removed services first, so that a port one of them held is free for a service added now.
  for (auto& [name, route] : routes_) {
    if (route->removed || by_name.contains(name)) continue;
    route->removed = true;
    route->Unlisten();
    LogInfo("service removed; its endpoints drain", {{"service", name}});
    for (const std::shared_ptr<Backend>& b : route->backends) b->listed = false;
  }
  for (const auto& [name, spec] : by_name) {
    std::shared_ptr<Route>& route = routes_[std::string(name)];
    bool relisten = false;
    if (!route) {
      route = std::make_shared<Route>(shared_, std::string(name));
      relisten = true;
    }
    if (route->removed || route->listen_host != spec->listen_host ||
        route->listen_port != spec->listen_port) {
      relisten = true;
    }
    if (relisten) {
      route->Unlisten();
      route->removed = false;
      route->listen_host = spec->listen_host;
      route->listen_port = spec->listen_port;
      route->bind_error.clear();
      route->Listen();
    }

    std::vector<std::shared_ptr<Backend>> pool;
    auto find = [](const std::vector<std::shared_ptr<Backend>>& v, const Endpoint& e) {
      return std::find_if(v.begin(), v.end(), [&](const auto& b) { return b->SameAddress(e); });
    };
    for (const Endpoint& e : spec->endpoints) {
      if (find(pool, e) != pool.end()) continue;  // listed twice
      auto old = find(route->backends, e);
      if (old != route->backends.end()) {
        Backend& b = **old;
        if (!b.listed) {
          LogInfo("endpoint back in the pool",
                  {{"service", route->service}, {"instance", e.instance}});
        }
        b.endpoint.revision = e.revision;
        b.listed = true;
        b.ejected_until = {};
        pool.push_back(*old);
        continue;
      }
      auto b = std::make_shared<Backend>();
      b->endpoint = e;
      b->next_ejection = shared_->options.eject_first;
      error_code ec;
      asio::ip::address address = asio::ip::make_address(e.host, ec);
      if (!ec) {
        b->address = tcp::endpoint(address, static_cast<uint16_t>(e.port));
      } else {
        LogWarn("endpoint host is not an IP address; every connect to it fails",
                {{"service", route->service}, {"instance", e.instance}, {"host", e.host}});
      }
      LogInfo("endpoint joined the pool", {{"service", route->service},
                                           {"instance", e.instance},
                                           {"revision", e.revision},
                                           {"address", HostPort(e.host, e.port)}});
      pool.push_back(std::move(b));
    }
    for (const std::shared_ptr<Backend>& b : route->backends) {
      if (find(pool, b->endpoint) != pool.end()) continue;
      if (b->listed) {
        b->listed = false;
        LogInfo("endpoint left the pool; draining", {{"service", route->service},
                                                     {"instance", b->endpoint.instance},
                                                     {"revision", b->endpoint.revision},
                                                     {"open_connections", b->open}});
      }
      pool.push_back(b);
    }
    route->backends = std::move(pool);
  }
  Collect();
}

void Proxy::Collect() {
  for (auto it = routes_.begin(); it != routes_.end();) {
    Route& route = *it->second;
    std::erase_if(route.backends, [&](const std::shared_ptr<Backend>& b) {
      if (b->listed || b->open > 0) return false;
      LogInfo("endpoint drained", {{"service", route.service},
                                   {"instance", b->endpoint.instance},
                                   {"revision", b->endpoint.revision}});
      return true;
    });
    if (route.removed && route.backends.empty()) {
      it = routes_.erase(it);
    } else {
      ++it;
    }
  }
}

ProxyStats Proxy::Snapshot() {
  Collect();
  SteadyTime now = shared_->options.clock->SteadyNow();
  ProxyStats stats;
  for (const auto& [name, route] : routes_) {
    RouteStats r;
    r.service = name;
    r.listen_host = route->listen_host;
    r.listen_port = route->listen_port;
    r.bound_port = route->bound_port;
    r.bind_error = route->bind_error;
    r.removed = route->removed;
    r.rejected_connections = route->rejected;
    for (const std::shared_ptr<Backend>& b : route->backends) {
      r.endpoints.push_back({.endpoint = b->endpoint,
                             .state = b->State(now),
                             .open_connections = b->open,
                             .total_connections = b->total,
                             .connect_failures = b->failures,
                             .bytes_in = b->bytes_in,
                             .bytes_out = b->bytes_out});
    }
    stats.routes.push_back(std::move(r));
  }
  return stats;
}

}  // namespace kiln
