#pragma once

// kilnd's HTTP server (Boost.Beast on the daemon's io_context): /metrics, /healthz, /readyz,
// the JSON of /api/v1 (read-only but for POST /api/v1/sync), and the dashboard at /. Optionally
// HTTPS, and with tokens: /api/v1 and the dashboard then need "Authorization: Bearer <token>" (any
// role reads). Bounded: header and body limits, a deadline for a request's headers, a cap on
// connections where a new connection evicts the one that has waited longest without sending a
// request, so idle connections cannot lock health checks out. Beast stays out of this header.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "api/tokens.h"
#include "common/clock.h"
#include "common/status.h"
#include "deploy/docker_hosts.h"
#include "git/git_source.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class EndpointsHub;
class StateReader;

class HttpServer {
 public:
  // kilnd's default: outside 9090-9100 (Prometheus 9090, Pushgateway 9091, Alertmanager 9093,
  // node_exporter 9100; 9100-9999 is Prometheus' exporter range) and Grafana's 3000.
  static constexpr int kDefaultPort = 7090;

  struct Options {
    std::string listen = "127.0.0.1:7090";  // HOST:PORT; port 0 picks one
    int max_connections = 256;
    // A request's complete headers must arrive within this, counted from the connection (and
    // its TLS handshake) or from the end of the previous response on a kept-alive connection.
    Duration header_timeout{5'000};
    Duration read_timeout{10'000};  // a request's body; writing a response
    size_t header_limit = size_t{8} * 1024;
    size_t body_limit = size_t{16} * 1024;
    std::string tls_cert, tls_key;  // PEM files, both or neither: HTTPS
    std::string client_ca;          // PEM: require client certificates it signed (needs TLS)
    // With tokens, / and /api/v1 need a token of any role; so does /metrics with metrics_auth.
    // /healthz and /readyz are always open.
    std::optional<std::map<std::string, Caller>> tokens;
    bool metrics_auth = false;
  };
  struct Readiness {
    bool ready = false;
    std::string json;  // {"ready":..,"checks":{..}}
  };
  struct Sources {
    std::function<std::string()> metrics;     // Prometheus text
    std::function<Readiness()> readiness;     // /readyz
    StateReader* reader = nullptr;            // /api/v1; used on the io_context's thread only
    const EndpointsHub* endpoints = nullptr;  // proxies' reports in /api/v1/services; optional
    // With --manifests git+...: the source's status in /api/v1/services[/NAME], and POST
    // /api/v1/sync (a fetch now; returns its number). Null: the manifests are a directory.
    std::function<git::SourceStatus()> git_status;
    std::function<int64_t()> sync;
    // With --docker-host: the hosts in /api/v1/services. Null: none.
    std::function<std::vector<DockerHostStatus>()> docker_hosts;
  };

  // Refuses (FAILED_PRECONDITION, with the reason) to listen off loopback without both TLS and
  // tokens; INVALID_ARGUMENT for bad options or unreadable certificates.
  static StatusOr<std::unique_ptr<HttpServer>> Start(boost::asio::io_context& io,
                                                     const Options& options, Sources sources);
  // Start's checks of `options` alone (no files read, nothing bound), for start-up to refuse
  // bad configuration before it acts.
  static Status CheckOptions(const Options& options);
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
