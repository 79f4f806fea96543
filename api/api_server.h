#pragma once

// The gRPC API of kilnd (proto/kiln/v1/kiln.proto): reads on reader connections of the store,
// never blocking the reconciler; commands run on the reconciler's io_context thread. Listens on a
// unix socket and optionally TCP (TLS, mutual TLS), with bearer tokens. gRPC stays out of this
// header.

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "api/tokens.h"
#include "common/clock.h"
#include "common/status.h"
#include "deploy/docker_hosts.h"
#include "git/git_source.h"
#include "spec/manifest.h"
#include "storage/state_store.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class EndpointsHub;
class Metrics;
class Reconciler;

// The JSON that HTTP's /api/v1 serves: the same messages as the gRPC API (ListServices,
// GetService, GetEndpoints, WatchEvents), with proto field names. `clock` says what is available
// now; `hub` (when there is one) what proxies report: drains, listeners, connections.
// `git`: with --manifests git+..., what the responses' `git` field shows.
// `docker_hosts`: with --docker-host, the hosts ListServices shows.
StatusOr<std::string> ServicesJson(StateReader& r, const Clock& clock = RealClockInstance(),
                                   const EndpointsHub* hub = nullptr,
                                   const git::SourceStatus* git_status = nullptr,
                                   const std::vector<DockerHostStatus>* docker_hosts = nullptr);
StatusOr<std::string> ServiceJson(StateReader& r, const std::string& name,
                                  const Clock& clock = RealClockInstance(),
                                  const EndpointsHub* hub = nullptr,
                                  const git::SourceStatus* git_status = nullptr);
// GetEndpoints of one service (every service when `service` is empty).
StatusOr<std::string> EndpointsJson(StateReader& r, const std::string& service,
                                    const Clock& clock = RealClockInstance());
// Every running instance as Prometheus file_sd JSON: one target group per instance, with labels
// service, revision, version and instance.
StatusOr<std::string> PrometheusSdJson(StateReader& r);
// GetHistory of one service: its revisions, newest first, with their source and commit.
StatusOr<std::string> HistoryJson(StateReader& r, const std::string& service);
// OUT_OF_RANGE when events after `after_seq` were already pruned.
StatusOr<std::string> EventsJson(StateReader& r, int64_t after_seq, const std::string& service,
                                 int limit);

class ApiServer {
 public:
  struct Options {
    std::string unix_socket;                   // STATE/kiln.sock; made mode 0660
    std::string tcp_listen;                    // HOST:PORT, "" for none; port 0 picks one
    std::string tls_cert, tls_key, client_ca;  // PEM files; client_ca asks for client certs
    std::optional<Tokens> tokens;              // nullopt: every caller may do everything
    int max_streams = 64;                      // concurrent WatchEvents streams
    int readers = 4;                           // reader connections
    int max_message_bytes = 4 << 20;
    // A mutating call waits this long for the reconciler's thread; if it has not started by
    // then it is cancelled (never runs) and the client gets UNAVAILABLE, safe to retry.
    Duration command_timeout{30'000};
    Duration handshake_timeout{5'000};  // TLS and HTTP/2 preface of a new connection
    Duration idle_timeout{300'000};     // a connection with no call for this long is closed
    int max_threads = 128;              // threads running calls (WatchEvents streams included)
    Metrics* metrics = nullptr;         // counts requests by method and code
    const Clock* clock = nullptr;       // availability and back-off figures; null = the system's
    // Pools streamed by WatchEndpoints and proxies' reports (ReportProxy); null: both are
    // UNIMPLEMENTED.
    EndpointsHub* endpoints = nullptr;
    // kilnd's manifest rules beyond the file format (RejectExposedPortsIn its --port-range),
    // applied to the manifests PlanManifests is given; null: none.
    std::function<void(ManifestSet&)> manifest_rules;
    // Where the process driver writes instances' logs (STATE/logs), served by StreamLogs;
    // empty: StreamLogs is UNIMPLEMENTED.
    std::filesystem::path log_dir;
    // With --manifests git+...: what status shows of the source, and a fetch asked for now
    // (returns its number, see Sync). Null: the manifests are a directory; Sync is then
    // FAILED_PRECONDITION.
    std::function<git::SourceStatus()> git_status;
    // The Docker hosts and their health, for ListServices. Null: no --docker-host. Any thread.
    std::function<std::vector<DockerHostStatus>()> docker_hosts;
    std::function<int64_t()> sync;
  };
  using ReaderFactory = std::function<StatusOr<std::unique_ptr<StateReader>>()>;

  // Start's checks of `options` (no file read, nothing bound), for start-up to refuse bad
  // configuration before it acts: FAILED_PRECONDITION for a TCP listener off loopback without
  // both TLS and tokens; INVALID_ARGUMENT otherwise.
  static Status CheckOptions(const Options& options);
  // Refuses (with the reason) a TCP listener off loopback without both TLS and tokens: kilnd
  // has decided that already (CheckDaemonConfig), but Start is the one place every caller
  // passes through before a socket is bound.
  static StatusOr<std::unique_ptr<ApiServer>> Start(const Options& options,
                                                    boost::asio::io_context& io,
                                                    Reconciler& reconciler,
                                                    const ReaderFactory& open_reader);
  ~ApiServer();

  int tcp_port() const;  // the bound TCP port, 0 without TCP
  // Stops accepting calls; in-flight ones end.
  void Shutdown();

 private:
  struct Impl;
  explicit ApiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln
