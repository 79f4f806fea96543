#include "proxy/proxy.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/container/small_vector.hpp>
#include <boost/intrusive/list.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <optional>
#include <span>
#include <utility>

#include "common/cancel_quietly.h"
#include "common/logging.h"
#include "common/unique_fd.h"
#include "proxy/poller.h"
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

// A connect in flight, in Shared's list of them until it ends (the hook unlinks itself).
struct ConnectDeadline {
  using Hook = boost::intrusive::list_member_hook<
      boost::intrusive::link_mode<boost::intrusive::auto_unlink>>;
  Hook hook;
  std::chrono::steady_clock::time_point at;
  virtual void TimedOut() = 0;

 protected:
  ~ConnectDeadline() = default;
};

// An open client connection, in Shared's list of them until it is closed.
struct OpenConnection {
  ConnectDeadline::Hook open_hook;
  virtual void Close() noexcept = 0;

 protected:
  ~OpenConnection() = default;
};

}  // namespace

struct Proxy::Shared : std::enable_shared_from_this<Proxy::Shared> {
  Shared(asio::io_context& io_context, Options opts)
      : io(io_context), options(opts), poller(io_context), connect_timer(io_context) {}

  // Watches the connects in flight: one timer for all, at the oldest one's deadline (every
  // connect has the same timeout, so the list is in deadline order).
  void WatchConnect(ConnectDeadline& c);
  void OnConnectTimer();

  asio::io_context& io;
  Options options;
  Poller poller;
  // The open connections, closed with the Proxy.
  boost::intrusive::list<OpenConnection,
                         boost::intrusive::member_hook<OpenConnection, ConnectDeadline::Hook,
                                                       &OpenConnection::open_hook>,
                         boost::intrusive::constant_time_size<false>>
      sessions;
  boost::intrusive::list<
      ConnectDeadline,
      boost::intrusive::member_hook<ConnectDeadline, ConnectDeadline::Hook, &ConnectDeadline::hook>,
      boost::intrusive::constant_time_size<false>>
      connecting;
  asio::steady_timer connect_timer;
  bool connect_timer_armed = false;
};

struct Proxy::Route : Pollable, std::enable_shared_from_this<Proxy::Route> {
  Route(std::shared_ptr<Shared> s, std::string name)
      : shared(std::move(s)), service(std::move(name)), timer(shared->io) {}

  // Binds and listens on listen_host:listen_port, or keeps the error and tries again later.
  void Listen();
  void Unlisten() noexcept {
    CancelQuietly(timer, "listen retry timer");
    accept_paused = false;
    shared->poller.Forget(this);
    listener.reset();
    bound_port = 0;
  }
  // Out of descriptors, most likely: pause rather than spin on the error, then accept again
  // (what is pending raises no new edge).
  void PauseAccepting(const std::string& error);
  // Accepts what is pending, each socket non-blocking and close-on-exec from accept4(2) itself,
  // until EAGAIN (the set is edge-triggered) or a batch, after which it takes another turn.
  void OnReady(unsigned tag, uint32_t events) override;
  // The next endpoint in rotation that `tried` does not hold; null when none is left.
  std::shared_ptr<Backend> Pick(std::span<const std::shared_ptr<Backend>> tried);

  std::shared_ptr<Shared> shared;
  std::string service;
  std::string listen_host;
  int listen_port = 0;
  int bound_port = 0;
  std::string bind_error;
  bool removed = false;  // not in the last Apply: no listener, kept while connections drain
  UniqueFd listener;
  bool accept_paused = false;  // after a failed accept (out of descriptors), until `timer`
  asio::steady_timer timer;    // bind retry, or a pause after a failed accept
  std::vector<std::shared_ptr<Backend>> backends;
  size_t next = 0;  // round-robin cursor into `backends`
  uint64_t rejected = 0;
};

namespace {

// One client connection: connects to an endpoint of the route (the next in rotation, then the
// others once each on failure), then forwards both directions until both have ended. Owned by
// Shared::sessions while open; Close hands it to the poller, which frees it when no event can
// name it any more.
class Session final : public Pollable, public ConnectDeadline, public OpenConnection {
 public:
  Session(Proxy::Shared& shared, std::shared_ptr<Proxy::Route> route, UniqueFd client)
      : shared_(shared), route_(std::move(route)) {
    client_.fd = std::move(client);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void Start() {
    if (Status s = shared_.poller.Add(client_.fd.get(), this, kClient); !s.ok()) {
      LogWarn("cannot watch an accepted connection; closing it",
              {{"service", route_->service}, {"error", s.message()}});
      Close();
      return;
    }
    TryNext();
  }

  // Closes both sides (which takes them out of the epoll set) and retires the session.
  void Close() noexcept override {
    if (closed_) return;
    closed_ = true;
    hook.unlink();
    client_.fd.reset();
    upstream_.fd.reset();
    if (backend_) --backend_->open;
    open_hook.unlink();
    shared_.poller.Retire(std::unique_ptr<Pollable>(this));
  }

  void OnReady(unsigned tag, uint32_t events) override {
    if (closed_) return;
    if (tag == kClient) {
      client_.Note(events);
    } else {
      upstream_.Note(events);
    }
    if (connecting_) {
      if (tag == kUpstream && events != 0) OnConnectEvent(events);
      return;
    }
    if (up_) Forward();
  }

  void TimedOut() override {
    if (!closed_ && connecting_) ConnectFailed("connect timed out");
  }

 private:
  enum Tag : unsigned { kClient = 0, kUpstream = 1 };

  void TryNext() {
    backend_ = route_->Pick({tried_.data(), tried_.size()});
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
    // Non-blocking and close-on-exec from socket(2) itself. TCP_NODELAY: forwarded bytes go as
    // they come, never held back.
    const tcp::endpoint& to = *backend_->address;
    upstream_ = PumpSocket{};
    upstream_.fd.reset(
        ::socket(to.protocol().family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!upstream_.fd) {
      LocalFailure(std::string("socket: ") + std::strerror(errno));
      return;
    }
    const int one = 1;
    ::setsockopt(upstream_.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc = 0;
    do {
      rc = ::connect(upstream_.fd.get(), to.data(), static_cast<socklen_t>(to.size()));
    } while (rc != 0 && errno == EINTR);
    if (rc != 0 && errno != EINPROGRESS) {
      const int err = errno;
      if (IsLocalShortage(err)) {
        LocalFailure(std::string("connect: ") + std::strerror(err));
      } else {
        ConnectFailed(std::strerror(err));
      }
      return;
    }
    // Added after connect(2): a socket not yet connecting reports EPOLLHUP. What happened since
    // connect returned is reported by the add itself.
    if (Status s = shared_.poller.Add(upstream_.fd.get(), this, kUpstream); !s.ok()) {
      LocalFailure(s.message());
      return;
    }
    connecting_ = true;
    shared_.WatchConnect(*this);
  }

  // The first event of a connecting socket says how the connect went: writable without an
  // error is connected (no connect(2) or getsockopt(2) to ask), an error is the connect's.
  void OnConnectEvent(uint32_t events) {
    if ((events & (EPOLLERR | EPOLLHUP)) != 0) {
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(upstream_.fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      ConnectFailed(std::strerror(err != 0 ? err : ECONNREFUSED));
      return;
    }
    if ((events & EPOLLOUT) == 0) return;
    connecting_ = false;
    hook.unlink();
    ++backend_->total;
    backend_->next_ejection = shared_.options.eject_first;
    // The client has most likely sent its request already (a wasted read at worst); the
    // endpoint's reply comes after it, with its own event.
    client_.readable = client_.writable = true;
    Backend* b = backend_.get();
    up_.emplace(client_, upstream_, &b->bytes_in);
    down_.emplace(upstream_, client_, &b->bytes_out);
    Forward();
  }

  // The proxy itself is short of something (descriptors, local ports, memory): no endpoint is
  // to blame, none is ejected, and another would fare no better. The client is closed.
  static bool IsLocalShortage(int err) {
    return err == EADDRNOTAVAIL || err == EAGAIN || err == ENOBUFS || err == ENOMEM ||
           err == EMFILE || err == ENFILE;
  }
  void LocalFailure(const std::string& error) {
    LogWarn("cannot connect to an endpoint for lack of resources here; closing the client",
            {{"service", route_->service},
             {"instance", backend_->endpoint.instance},
             {"error", error}});
    ++route_->rejected;
    Close();
  }

  // Takes the endpoint out of rotation (unless a connection before this one already did) and
  // tries the next.
  void ConnectFailed(const std::string& error) {
    connecting_ = false;
    hook.unlink();
    upstream_.fd.reset();
    Backend& b = *backend_;
    --b.open;
    ++b.failures;
    const Proxy::Options& o = shared_.options;
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

  // Runs both directions. The first to end half-closes its output; the second need not, as
  // Close is next. A direction that used its turn with work left runs again after the others.
  void Forward() {
    bool again = false;
    for (auto [pump, other] : {std::pair{&*up_, &*down_}, std::pair{&*down_, &*up_}}) {
      if (pump->ended()) continue;
      switch (pump->Run()) {
        case Pump::Result::kBlocked:
          break;
        case Pump::Result::kYield:
          again = true;
          break;
        case Pump::Result::kEnded:
          if (other->ended()) {
            Close();
            return;
          }
          other->SkipHalfClose();
          break;
        case Pump::Result::kFailed:
          LogDebug("connection ended with an error",
                   {{"service", route_->service},
                    {"instance", backend_ ? backend_->endpoint.instance : std::string()},
                    {"error", std::strerror(pump->error())}});
          Close();
          return;
      }
    }
    if (again) shared_.poller.Again(this, kClient);
  }

  Proxy::Shared& shared_;
  std::shared_ptr<Proxy::Route> route_;
  PumpSocket client_;
  PumpSocket upstream_;
  std::shared_ptr<Backend> backend_;  // the endpoint being connected to or forwarded to
  boost::container::small_vector<std::shared_ptr<Backend>, 2> tried_;
  std::optional<Pump> up_;    // client -> endpoint
  std::optional<Pump> down_;  // endpoint -> client
  bool connecting_ = false;
  bool closed_ = false;
};

}  // namespace

void Proxy::Shared::WatchConnect(ConnectDeadline& c) {
  c.at = std::chrono::steady_clock::now() + options.connect_timeout;
  connecting.push_back(c);
  if (connect_timer_armed) return;
  connect_timer_armed = true;
  connect_timer.expires_at(c.at);
  connect_timer.async_wait([self = weak_from_this()](error_code ec) {
    if (auto s = self.lock(); s && !ec) s->OnConnectTimer();
  });
}

void Proxy::Shared::OnConnectTimer() {
  connect_timer_armed = false;
  const auto now = std::chrono::steady_clock::now();
  while (!connecting.empty() && connecting.front().at <= now) {
    ConnectDeadline& c = connecting.front();
    c.hook.unlink();
    c.TimedOut();  // may start another connect, which joins the list at the back
  }
  if (connecting.empty()) return;
  connect_timer_armed = true;
  connect_timer.expires_at(connecting.front().at);
  connect_timer.async_wait([self = weak_from_this()](error_code ec) {
    if (auto s = self.lock(); s && !ec) s->OnConnectTimer();
  });
}

void Proxy::Route::Listen() {
  error_code ec;
  asio::ip::address address = asio::ip::make_address(listen_host, ec);
  std::string error;
  if (ec) {
    error = ec.message();
  } else {
    tcp::endpoint at(address, static_cast<uint16_t>(listen_port));
    UniqueFd fd(::socket(at.protocol().family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    const int one = 1;
    sockaddr_storage bound{};
    socklen_t bound_len = sizeof bound;
    // TCP_NODELAY is inherited by every accepted socket on Linux: one system call per
    // listener, not per client.
    if (!fd || ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        ::bind(fd.get(), at.data(), static_cast<socklen_t>(at.size())) != 0 ||
        ::listen(fd.get(), SOMAXCONN) != 0 ||
        ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &bound_len) != 0) {
      error = std::strerror(errno);
    } else if (Status s = shared->poller.Add(fd.get(), this, 0); !s.ok()) {
      error = s.message();
    } else {
      listener = std::move(fd);
      bound_port =
          ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    }
  }
  if (!error.empty()) {
    bound_port = 0;
    error = "listen on " + HostPort(listen_host, listen_port) + ": " + error;
    if (error != bind_error) {
      LogWarn("cannot listen for a service; retrying",
              {{"service", service},
               {"address", HostPort(listen_host, listen_port)},
               {"error", error}});
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
}

void Proxy::Route::PauseAccepting(const std::string& error) {
  LogWarn("accept failed; pausing the listener", {{"service", service}, {"error", error}});
  // Each new client raises another edge meanwhile: they wait in the backlog, not in a loop of
  // failing accepts and warnings.
  accept_paused = true;
  timer.expires_after(std::chrono::milliseconds(100));
  timer.async_wait([self = shared_from_this()](error_code ec) {
    if (ec) return;
    self->accept_paused = false;
    if (self->listener) self->OnReady(0, 0);
  });
}

void Proxy::Route::OnReady(unsigned /*tag*/, uint32_t /*events*/) {
  if (accept_paused) return;
  // Connections accepted before the others' events get a turn.
  constexpr int kAcceptBatch = 16;
  for (int i = 0; i < kAcceptBatch; ++i) {
    if (!listener) return;
    int fd = ::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      // A connection that went away before it was accepted, or a signal: the next one.
      if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      return PauseAccepting(std::strerror(err));
    }
    auto* session = new Session(*shared, shared_from_this(), UniqueFd(fd));
    shared->sessions.push_back(*session);
    session->Start();
  }
  // More may be pending, and no new edge would say so.
  shared->poller.Again(this, 0);
}

std::shared_ptr<Backend> Proxy::Route::Pick(std::span<const std::shared_ptr<Backend>> tried) {
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
  while (!shared_->sessions.empty()) shared_->sessions.front().Close();
  CancelQuietly(shared_->connect_timer, "connect timer");
  // Not in a batch: nothing can name a closed session any more. (A session holds its route,
  // which holds Shared and so the poller: they must not wait for a posted handler.)
  shared_->poller.FreeRetired();
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
