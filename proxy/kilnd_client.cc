#include "proxy/kilnd_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "common/logging.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "proxy/endpoints_file.h"

namespace kiln {

namespace {

using std::chrono::steady_clock;

bool ValidPort(int64_t port, int64_t min) { return port >= min && port <= 65535; }

v1::ProxyEndpointState ToProto(EndpointState s) {
  switch (s) {
    case EndpointState::kActive:
      return v1::PROXY_ENDPOINT_STATE_ACTIVE;
    case EndpointState::kDraining:
      return v1::PROXY_ENDPOINT_STATE_DRAINING;
    case EndpointState::kEjected:
      return v1::PROXY_ENDPOINT_STATE_EJECTED;
  }
  return v1::PROXY_ENDPOINT_STATE_UNSPECIFIED;
}

constexpr Duration kMaxReportInterval = std::chrono::seconds(10);
constexpr int kKeepaliveMs = 20'000;  // > kMaxReportInterval: see the channel arguments

}  // namespace

std::vector<ServiceRoute> RoutesFromSnapshot(const v1::EndpointsSnapshot& snapshot,
                                             std::vector<std::string>* skipped) {
  auto skip = [skipped](std::string why) {
    if (skipped) skipped->push_back(std::move(why));
  };
  std::vector<ServiceRoute> routes;
  for (const v1::ServiceEndpoints& s : snapshot.services()) {
    if (!s.has_expose()) continue;
    const v1::Expose& expose = s.expose();
    if (!ValidPort(expose.port(), 0)) {
      skip("service " + s.service() + ": expose port " + std::to_string(expose.port()) +
           " is outside 0-65535");
      continue;
    }
    ServiceRoute route;
    route.service = s.service();
    if (!expose.host().empty()) route.listen_host = expose.host();
    route.listen_port = expose.port();
    for (const v1::Endpoint& e : s.endpoints()) {
      if (e.state() != v1::ENDPOINT_STATE_READY) continue;
      if (e.host().empty() || !ValidPort(e.port(), 1)) {
        skip("service " + s.service() + ": endpoint " + e.instance() + " has no usable address (" +
             e.host() + ":" + std::to_string(e.port()) + ")");
        continue;
      }
      route.endpoints.push_back(
          {.instance = e.instance(), .host = e.host(), .port = e.port(), .revision = e.revision()});
    }
    routes.push_back(std::move(route));
  }
  return routes;
}

v1::ProxyReport ReportFromStats(const ProxyStats& stats, const std::string& proxy_id,
                                const std::string& kilnd_id, uint64_t version,
                                int64_t started_unix_ms) {
  v1::ProxyReport report;
  report.set_proxy(proxy_id);
  report.set_kilnd_id(kilnd_id);
  report.set_version(version);
  report.set_started_unix_ms(started_unix_ms);
  for (const RouteStats& r : stats.routes) {
    v1::ProxyRoute* route = report.add_routes();
    route->set_service(r.service);
    route->set_listen_host(r.listen_host);
    route->set_listen_port(r.listen_port);
    route->set_bound_port(r.bound_port);
    route->set_bind_error(r.bind_error);
    route->set_rejected_connections(r.rejected_connections);
    for (const EndpointStats& e : r.endpoints) {
      v1::ProxyEndpoint* endpoint = route->add_endpoints();
      endpoint->set_instance(e.endpoint.instance);
      endpoint->set_revision(e.endpoint.revision);
      endpoint->set_host(e.endpoint.host);
      endpoint->set_port(e.endpoint.port);
      endpoint->set_state(ToProto(e.state));
      endpoint->set_open_connections(e.open_connections);
      endpoint->set_total_connections(e.total_connections);
      endpoint->set_connect_failures(e.connect_failures);
      endpoint->set_bytes_in(e.bytes_in);
      endpoint->set_bytes_out(e.bytes_out);
    }
  }
  return report;
}

struct KilndClient::Impl : std::enable_shared_from_this<KilndClient::Impl> {
  Impl(boost::asio::io_context& io_context, Proxy& p, Options o)
      : io(io_context), proxy(p), options(std::move(o)) {}

  enum Call { kWatch, kReport, kCalls };
  static const char* CallName(Call c) { return c == kWatch ? "WatchEndpoints" : "ReportProxy"; }

  // What a report is made of, taken on the io thread in one go so that the counters belong to
  // the snapshot named.
  struct Taken {
    ProxyStats stats;
    std::string kilnd_id;
    uint64_t version = 0;
  };

  void WatchLoop();
  void ReportLoop();
  void Received(const v1::EndpointsSnapshot& snapshot);
  std::optional<Taken> Take();
  void Prepare(grpc::ClientContext& ctx) const;
  std::unique_ptr<v1::Kiln::Stub> MakeStub() const;
  // Sleeps for `d`; false when asked to stop meanwhile.
  bool Sleep(Duration d);
  // Logs each distinct error once (the same error of both calls once) until kilnd is reached
  // again; repeats go to the debug level.
  void Failed(Call call, const grpc::Status& status);
  void Succeeded(Call call);

  boost::asio::io_context& io;
  Proxy& proxy;
  const Options options;
  std::thread watch_thread, report_thread;
  // Read by handlers posted to the io thread: once set, they leave the Proxy alone.
  std::atomic<bool> stopped{false};

  // Io thread only: the snapshot the Proxy serves.
  std::string applied_kilnd_id;
  uint64_t applied_version = 0;

  // Guards the members below; never held across a gRPC call, a file write or a wait on the
  // io thread.
  std::mutex mu;
  std::condition_variable cv;  // stop, report_now, a taken report
  bool stopping = false;
  bool report_now = false;                  // a snapshot was just applied
  grpc::ClientContext* calls[kCalls] = {};  // the calls in flight, cancelled on stop
  std::set<std::string> errors[kCalls];     // seen since the call last succeeded; logged
  bool connected = false;                   // the last report went through
  bool ever_connected = false;
  std::string file_error;  // the last error writing endpoints_file, logged
};

void KilndClient::Impl::Prepare(grpc::ClientContext& ctx) const {
  if (!options.token.empty()) ctx.AddMetadata("authorization", "Bearer " + options.token);
}

std::unique_ptr<v1::Kiln::Stub> KilndClient::Impl::MakeStub() const {
  grpc::ChannelArguments args;
  // A channel of its own, not one shared through gRPC's global pool of connections: a failed
  // call is retried on a new one, which connects at once, on this client's back-off (100 ms to
  // 2 s). A channel kept across failures would wait for gRPC's own reconnect back-off, which
  // grows to 2 minutes (seen: 7 s before a restarted kilnd was reached).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // Over TCP, a kilnd host that vanishes (no RST) would leave the stream waiting for ever on a
  // dead connection; pings find it. (A unix socket's peer dying ends the stream at once.) The
  // reports keep kilnd writing between pings, so its ping policy counts no strike.
  if (!options.target.starts_with("unix:")) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, kKeepaliveMs);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  }
  // A snapshot holds every pool at once.
  args.SetMaxReceiveMessageSize(static_cast<int>(kMaxEndpointsFileBytes));
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_ca.empty() || !options.tls_cert.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_ca;
    ssl.pem_cert_chain = options.tls_cert;
    ssl.pem_private_key = options.tls_key;
    credentials = grpc::SslCredentials(ssl);
  }
  return v1::Kiln::NewStub(grpc::CreateCustomChannel(options.target, credentials, args));
}

bool KilndClient::Impl::Sleep(Duration d) {
  std::unique_lock lock(mu);
  return !cv.wait_for(lock, d, [this] { return stopping; });
}

void KilndClient::Impl::Failed(Call call, const grpc::Status& status) {
  std::string error = status.ok() ? "the stream ended" : status.error_message();
  std::string code =
      status.ok() ? "OK"
                  : std::string(StatusCodeName(static_cast<StatusCode>(status.error_code())));
  std::string key = code + " " + error;
  std::lock_guard lock(mu);
  if (call == kReport) connected = false;
  // kilnd down fails both calls alike: one line for the two.
  const bool logged = errors[kWatch].contains(key) || errors[kReport].contains(key);
  errors[call].insert(std::move(key));
  if (logged) {
    LogDebug("call to kilnd failed again", {{"call", CallName(call)}, {"error", error}});
    return;
  }
  LogWarn("call to kilnd failed; serving the endpoints last applied",
          {{"kilnd", options.target}, {"call", CallName(call)}, {"code", code}, {"error", error}});
}

void KilndClient::Impl::Succeeded(Call call) {
  std::lock_guard lock(mu);
  errors[call].clear();
  // The report is the heartbeat (every interval): it tells when kilnd is reachable again, where
  // a resumed stream may stay silent until a pool changes. So kilnd back also forgets the
  // stream's errors (the next outage is logged again); a stream that fails while the reports go
  // through keeps them (its error is logged once, not at each retry).
  if (call != kReport || connected) return;
  connected = true;
  errors[kWatch].clear();
  LogInfo(ever_connected ? "connected to kilnd again" : "connected to kilnd",
          {{"kilnd", options.target}});
  ever_connected = true;
}

void KilndClient::Impl::WatchLoop() {
  std::string resume_id = options.kilnd_id;
  uint64_t resume_version = options.version;
  Duration backoff = options.backoff_first;
  std::unique_ptr<v1::Kiln::Stub> stub = MakeStub();
  for (;;) {
    grpc::ClientContext ctx;
    Prepare(ctx);
    {
      std::lock_guard lock(mu);
      if (stopping) return;
      calls[kWatch] = &ctx;  // TryCancel before the call starts cancels it when it does
    }
    v1::WatchEndpointsRequest request;
    request.set_kilnd_id(resume_id);
    request.set_after_version(resume_version);
    const auto opened = steady_clock::now();
    std::unique_ptr<grpc::ClientReader<v1::EndpointsSnapshot>> reader =
        stub->WatchEndpoints(&ctx, request);
    v1::EndpointsSnapshot snapshot;
    bool received = false;
    while (reader->Read(&snapshot)) {
      received = true;
      Succeeded(kWatch);
      resume_id = snapshot.kilnd_id();
      resume_version = snapshot.version();
      Received(snapshot);
    }
    grpc::Status status = reader->Finish();
    {
      std::lock_guard lock(mu);
      calls[kWatch] = nullptr;
      if (stopping) return;
    }
    // A stream that worked until now (kilnd restarted) is retried after the first back-off; one
    // that keeps failing backs off further.
    if (received || steady_clock::now() - opened >= options.backoff_max) {
      backoff = options.backoff_first;
    }
    Failed(kWatch, status);
    if (!Sleep(backoff)) return;
    stub = MakeStub();
    backoff = std::min(backoff * 2, options.backoff_max);
  }
}

void KilndClient::Impl::Received(const v1::EndpointsSnapshot& snapshot) {
  std::vector<std::string> skipped;
  std::vector<ServiceRoute> routes = RoutesFromSnapshot(snapshot, &skipped);
  for (const std::string& why : skipped) {
    LogWarn("endpoint left out of the snapshot",
            {{"kilnd_id", snapshot.kilnd_id()}, {"version", snapshot.version()}, {"why", why}});
  }
  int64_t endpoints = 0;
  for (const ServiceRoute& r : routes) endpoints += static_cast<int64_t>(r.endpoints.size());
  boost::asio::post(io, [self = shared_from_this(), routes = std::move(routes),
                         id = snapshot.kilnd_id(), version = snapshot.version(), endpoints] {
    if (self->stopped) return;
    self->proxy.Apply(routes);
    self->applied_kilnd_id = id;
    self->applied_version = version;
    LogInfo("endpoints applied", {{"kilnd_id", id},
                                  {"version", version},
                                  {"services", static_cast<int64_t>(routes.size())},
                                  {"endpoints", endpoints}});
    {
      std::lock_guard lock(self->mu);
      self->report_now = true;
    }
    self->cv.notify_all();
  });
  if (options.endpoints_file.empty()) return;
  // On this thread, not the io thread: the fsync may take a while.
  Status written = WriteEndpointsFile(options.endpoints_file, snapshot);
  std::lock_guard lock(mu);
  if (!written.ok() && written.message() != file_error) {
    LogError("cannot write the endpoints file; a restart would not know these pools",
             {{"file", options.endpoints_file.string()}, {"error", written.message()}});
  } else if (written.ok() && !file_error.empty()) {
    LogInfo("endpoints file written again", {{"file", options.endpoints_file.string()}});
  }
  file_error = written.ok() ? "" : written.message();
}

std::optional<KilndClient::Impl::Taken> KilndClient::Impl::Take() {
  auto taken = std::make_shared<std::optional<Taken>>();
  boost::asio::post(io, [self = shared_from_this(), taken] {
    if (self->stopped) return;
    Taken t{.stats = self->proxy.Snapshot(),
            .kilnd_id = self->applied_kilnd_id,
            .version = self->applied_version};
    {
      std::lock_guard lock(self->mu);
      *taken = std::move(t);
    }
    self->cv.notify_all();
  });
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return stopping || taken->has_value(); });
  if (stopping) return std::nullopt;
  return std::move(*taken);
}

void KilndClient::Impl::ReportLoop() {
  Duration interval = options.report_interval;
  Duration backoff = options.backoff_first;
  auto due = steady_clock::now();  // the first report at once: kilnd learns of the proxy
  std::unique_ptr<v1::Kiln::Stub> stub = MakeStub();
  for (;;) {
    {
      std::unique_lock lock(mu);
      cv.wait_until(lock, due, [this] { return stopping || report_now; });
      if (stopping) return;
      report_now = false;
    }
    std::optional<Taken> taken = Take();
    if (!taken) return;
    v1::ProxyReport report = ReportFromStats(taken->stats, options.proxy_id, taken->kilnd_id,
                                             taken->version, options.started_unix_ms);
    grpc::ClientContext ctx;
    Prepare(ctx);
    ctx.set_deadline(std::chrono::system_clock::now() + options.report_timeout);
    {
      std::lock_guard lock(mu);
      if (stopping) return;
      calls[kReport] = &ctx;
    }
    v1::ReportProxyResponse response;
    grpc::Status status = stub->ReportProxy(&ctx, report, &response);
    {
      std::lock_guard lock(mu);
      calls[kReport] = nullptr;
      if (stopping) return;
    }
    if (status.ok()) {
      Succeeded(kReport);
      // Bounded, so that a wrong answer neither floods kilnd nor silences the proxy for long
      // (and kilnd answers more often than the keepalive pings come). Sooner than asked is
      // within the contract: "after at most this long".
      if (response.report_interval_ms() > 0) {
        interval = std::clamp<Duration>(std::chrono::milliseconds(response.report_interval_ms()),
                                        std::chrono::milliseconds(10), kMaxReportInterval);
      }
      backoff = options.backoff_first;
      due = steady_clock::now() + interval;
    } else {
      Failed(kReport, status);
      stub = MakeStub();
      due = steady_clock::now() + backoff;
      backoff = std::min(backoff * 2, options.backoff_max);
    }
  }
}

KilndClient::KilndClient(boost::asio::io_context& io, Proxy& proxy, Options options)
    : impl_(std::make_shared<Impl>(io, proxy, std::move(options))) {}

KilndClient::~KilndClient() { Stop(); }

void KilndClient::Start() {
  Impl& d = *impl_;
  d.watch_thread = std::thread([&d] { d.WatchLoop(); });
  d.report_thread = std::thread([&d] { d.ReportLoop(); });
}

void KilndClient::RequestStop() {
  Impl& d = *impl_;
  d.stopped = true;
  {
    std::lock_guard lock(d.mu);
    d.stopping = true;
    for (grpc::ClientContext* ctx : d.calls) {
      if (ctx) ctx->TryCancel();
    }
  }
  d.cv.notify_all();
}

void KilndClient::Stop() {
  RequestStop();
  if (impl_->watch_thread.joinable()) impl_->watch_thread.join();
  if (impl_->report_thread.joinable()) impl_->report_thread.join();
}

}  // namespace kiln
