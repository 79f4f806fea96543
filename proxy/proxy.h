#pragma once

// The data plane of kiln-proxy: one TCP listener per service with an `expose:` address, each new
// client connection forwarded to one endpoint (an available instance) of that service.
//
// The wanted state comes in whole through Apply (from the WatchEndpoints stream, in the next
// step); what the proxy is doing comes out through Snapshot, so kilnd can tell when an endpoint
// that left the pool has no open connection left (drain before stop).
//
// Threading: a Proxy lives on one io_context run by one thread, and every call (constructor,
// Apply, Snapshot, destructor) is made on that thread: its state needs no lock.

#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/clock.h"

namespace kiln {

// One instance that takes connections for a service. Identity is (instance, host, port): an
// instance that moves to another address is a new endpoint and the old one drains.
struct Endpoint {
  std::string instance;
  std::string host;  // an IP address literal
  int port = 0;
  int64_t revision = 0;
};

// A service's stable address and the pool behind it.
struct ServiceRoute {
  std::string service;
  std::string listen_host = "127.0.0.1";  // an IP address literal
  int listen_port = 0;                    // 0: any free port (tests); Snapshot tells which
  std::vector<Endpoint> endpoints;        // the pool; round-robin, so a share is by count
};

enum class EndpointState {
  kActive,    // in the pool, takes new connections
  kDraining,  // left the pool (not in the last Apply); its open connections go on
  kEjected,   // in the pool but refused a connection; out of rotation until its back-off passes
};
std::string_view EndpointStateName(EndpointState s);

struct EndpointStats {
  Endpoint endpoint;
  EndpointState state = EndpointState::kActive;
  // Open connections, counting a connect in flight: 0 on a draining endpoint means drained.
  int64_t open_connections = 0;
  uint64_t total_connections = 0;  // connections made to it
  uint64_t connect_failures = 0;   // refused, unreachable or timed out
  uint64_t bytes_in = 0;           // client -> endpoint
  uint64_t bytes_out = 0;          // endpoint -> client
};

struct RouteStats {
  std::string service;
  std::string listen_host;
  int listen_port = 0;     // as asked for
  int bound_port = 0;      // the port listened on; 0 while not bound
  std::string bind_error;  // why the listener is not bound (retried every bind_retry); "" if bound
  bool removed = false;    // not in the last Apply: no listener, shown while endpoints drain
  uint64_t rejected_connections = 0;  // clients closed because no endpoint took them
  // Endpoints of the pool in Apply's order, then the draining ones that still have connections.
  std::vector<EndpointStats> endpoints;
};

struct ProxyStats {
  // Every service of the last Apply, and services removed since whose draining endpoints still
  // have open connections (their listeners are already closed), by name.
  std::vector<RouteStats> routes;
};

class Proxy {
 public:
  struct Options {
    const Clock* clock = &RealClockInstance();
    Duration connect_timeout = std::chrono::seconds(1);
    Duration bind_retry = std::chrono::seconds(1);
    Duration eject_first = std::chrono::seconds(1);  // doubles on each failure in a row...
    Duration eject_max = std::chrono::seconds(30);   // ...up to this
  };

  // Ignores SIGPIPE for the process: splice(2) to a closed peer raises it, and the proxy must see
  // EPIPE instead. (Instances are spawned with every signal reset to default.)
  Proxy(boost::asio::io_context& io, Options options);
  explicit Proxy(boost::asio::io_context& io) : Proxy(io, Options{}) {}
  // Closes the listeners and every open connection.
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Replaces the whole wanted state; applying the same routes twice changes nothing (except that
  // an ejected endpoint listed again is back in rotation). New services get a listener, removed
  // ones lose it; endpoints no longer listed drain. A listener that cannot be bound is an error
  // kept on its route and retried, never a failure of Apply. A service listed twice: the first
  // wins, the rest are logged and ignored.
  void Apply(const std::vector<ServiceRoute>& routes);

  ProxyStats Snapshot();

  struct Route;
  struct Shared;

 private:
  // Forgets draining endpoints with no open connection and removed services with none left.
  void Collect();

  std::shared_ptr<Shared> shared_;
  std::map<std::string, std::shared_ptr<Route>, std::less<>> routes_;
};

}  // namespace kiln
