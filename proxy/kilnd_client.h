#pragma once

// kiln-proxy's link to kilnd: the pools come in through the WatchEndpoints stream, what the proxy
// does with them goes back through ReportProxy (proto/kiln/v1/kiln.proto holds the contract).
//
// The data plane never waits on the control plane. The client runs on threads of its own (one
// for the stream, one for the reports) and reaches the Proxy only by posting onto its io_context:
// Apply for each snapshot, Snapshot for each report. kilnd down, restarting or hung changes
// nothing for the connections being served: the proxy goes on with what it applied last, the
// client logs each distinct error once and reconnects with back-off, and a kilnd that comes back
// with a new kilnd_id sends its whole state, which is applied as any other snapshot.

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "kiln/v1/kiln.pb.h"
#include "proxy/proxy.h"

namespace kiln {

// The routes a snapshot asks for: one per service with `expose` (listening on its host, or
// 127.0.0.1 when it names none, and port), each with the endpoints in state READY only, so that
// NOT_READY and DRAINING ones take no new connection (the Proxy lets open ones finish). What
// cannot be served (a port outside 0-65535, an endpoint with no host) is left out and described
// in `skipped` when given.
std::vector<ServiceRoute> RoutesFromSnapshot(const v1::EndpointsSnapshot& snapshot,
                                             std::vector<std::string>* skipped = nullptr);

// What a proxy tells kilnd: every route and endpoint of `stats`, for the snapshot applied.
v1::ProxyReport ReportFromStats(const ProxyStats& stats, const std::string& proxy_id,
                                const std::string& kilnd_id, uint64_t version,
                                int64_t started_unix_ms);

class KilndClient {
 public:
  struct Options {
    std::string target;  // gRPC target: "unix:/path/kiln.sock" or "host:port"
    std::string token;   // sent as "authorization: Bearer TOKEN"; "" sends none
    // PEM contents. With a CA (or a client certificate), the channel is TLS and kilnd's
    // certificate must be signed by that CA; cert and key: mutual TLS. All "": plaintext.
    std::string tls_ca, tls_cert, tls_key;
    std::string proxy_id;
    // Rewritten (atomically) with each snapshot received from kilnd; "" for none.
    std::filesystem::path endpoints_file;
    // The snapshot the proxy already serves (read from endpoints_file at start-up): the stream
    // resumes from it, so an unchanged kilnd sends nothing new. "" and 0: none.
    std::string kilnd_id;
    uint64_t version = 0;
    int64_t started_unix_ms = 0;
    Duration backoff_first = std::chrono::milliseconds(100);  // doubles on each failure...
    Duration backoff_max = std::chrono::seconds(2);           // ...up to this
    // Between reports until kilnd's first ReportProxyResponse says otherwise.
    Duration report_interval = std::chrono::milliseconds(500);
    Duration report_timeout = std::chrono::seconds(2);  // a hung kilnd fails a report after this
  };

  // REQUIRES: `proxy` lives on `io`, and outlives Stop(); it is destroyed on io's thread (as
  // every Proxy call is made), so a snapshot posted before Stop and run after it is dropped.
  KilndClient(boost::asio::io_context& io, Proxy& proxy, Options options);
  ~KilndClient();  // Stop()
  KilndClient(const KilndClient&) = delete;
  KilndClient& operator=(const KilndClient&) = delete;

  // Starts the stream and report threads.
  void Start();
  // Cancels the calls in flight and asks the threads to end, without waiting: safe on the io
  // thread. Handlers it posted earlier leave the Proxy alone when they run after it.
  void RequestStop();
  // RequestStop, then waits for the threads (promptly: every wait of theirs ends on a stop).
  void Stop();

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln
