#pragma once

// kilnd's HTTP server (Boost.Beast on the daemon's io_context): /metrics, /healthz, /readyz,
// the read-only JSON of /api/v1, and the dashboard at /. Bounded: header and body limits, a
// read timeout that drops slow clients, a cap on connections. Beast stays out of this header.

#include <functional>
#include <memory>
#include <string>

#include "common/clock.h"
#include "common/status.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class StateReader;

class HttpServer {
 public:
  struct Options {
    std::string listen = "127.0.0.1:9090";  // HOST:PORT; port 0 picks one
    int max_connections = 256;
    Duration read_timeout{10'000};
    size_t header_limit = 8 * 1024;
    size_t body_limit = 16 * 1024;
  };
  struct Readiness {
    bool ready = false;
    std::string json;  // {"ready":..,"checks":{..}}
  };
  struct Sources {
    std::function<std::string()> metrics;     // Prometheus text
    std::function<Readiness()> readiness;     // /readyz
    StateReader* reader = nullptr;            // /api/v1; used on the io_context's thread only
  };

  static StatusOr<std::unique_ptr<HttpServer>> Start(boost::asio::io_context& io, const Options& options,
                                                     Sources sources);
  ~HttpServer();
  int port() const;

 private:
  struct Impl;
  explicit HttpServer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// The dashboard page (HTML, CSS and JavaScript, no external resources).
const char* DashboardHtml();

}  // namespace kiln
