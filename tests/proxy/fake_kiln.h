#pragma once

// A stand-in for kilnd's side of the proxy contract, served over real gRPC on 127.0.0.1: only
// WatchEndpoints and ReportProxy of kiln.v1.Kiln. The test sets the pools (Publish), ends the
// streams or stops the server, and reads what the proxy asked for and reported.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kiln/v1/kiln.grpc.pb.h"

namespace kiln::testing {

class FakeKiln final : public v1::Kiln::Service {
 public:
  // One WatchEndpoints call as the server saw it.
  struct Watch {
    v1::WatchEndpointsRequest request;
    std::string authorization;  // the metadata sent with it
    int sent = 0;               // snapshots written on it
  };

  // Serves on 127.0.0.1:port (0: any free port) with `kilnd_id` and an empty snapshot, version 1.
  explicit FakeKiln(std::string kilnd_id, int port = 0);
  // Serves on 127.0.0.1:port with TLS (grpc::SslServerCredentials).
  FakeKiln(std::string kilnd_id, int port, std::shared_ptr<grpc::ServerCredentials> credentials);
  // Serves on a unix socket, as kilnd does on STATE/kiln.sock.
  FakeKiln(std::string kilnd_id, const std::filesystem::path& unix_socket);
  // Stop()
  ~FakeKiln() override;
  FakeKiln(const FakeKiln&) = delete;
  FakeKiln& operator=(const FakeKiln&) = delete;

  int port() const { return port_; }  // 0 on a unix socket
  // What a client dials: "127.0.0.1:PORT" or "unix:PATH".
  const std::string& target() const { return target_; }

  // Replaces the pools with `services` as the next version (sent to every open stream); returns
  // the version.
  uint64_t Publish(std::vector<v1::ServiceEndpoints> services);
  // Ends every open stream with UNAVAILABLE, as a network cut would; the server keeps serving.
  void EndStreams();
  // Ends the streams and shuts the server down (kilnd gone). Idempotent.
  void Stop();
  // While hung, kilnd accepts calls but answers none (a stopped or overloaded process): reports
  // wait until the proxy gives up on them, streams send nothing.
  void SetHung(bool hung);
  // What the next ReportProxyResponse says.
  void SetReportInterval(std::chrono::milliseconds interval);

  std::vector<Watch> Watches();
  std::vector<v1::ProxyReport> Reports();
  // Waits for a report for which `match` holds (counting those already received); the first such.
  std::optional<v1::ProxyReport> WaitForReport(
      const std::function<bool(const v1::ProxyReport&)>& match,
      std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // Waits until `n` WatchEndpoints calls have been made.
  bool WaitForWatches(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // kiln.v1.Kiln
  grpc::Status WatchEndpoints(grpc::ServerContext* ctx, const v1::WatchEndpointsRequest* request,
                              grpc::ServerWriter<v1::EndpointsSnapshot>* writer) override;
  grpc::Status ReportProxy(grpc::ServerContext* ctx, const v1::ProxyReport* report,
                           v1::ReportProxyResponse* response) override;

 private:
  std::mutex mu_;  // guards every member below
  std::condition_variable cv_;
  v1::EndpointsSnapshot snapshot_;
  uint64_t streams_ended_ = 0;  // EndStreams calls: a stream opened before one ends
  bool stopping_ = false;
  bool hung_ = false;
  std::chrono::milliseconds report_interval_{100};
  std::vector<Watch> watches_;
  std::vector<v1::ProxyReport> reports_;

  void Serve(const std::string& address, std::shared_ptr<grpc::ServerCredentials> credentials =
                                             grpc::InsecureServerCredentials());

  int port_ = 0;
  std::string target_;
  std::unique_ptr<grpc::Server> server_;
};

// Builders for snapshots.
v1::Endpoint EndpointAt(const std::string& instance, int port,
                        v1::EndpointState state = v1::ENDPOINT_STATE_READY, int64_t revision = 1);
v1::ServiceEndpoints Exposed(const std::string& service, int port,
                             std::vector<v1::Endpoint> endpoints);

// The endpoint `instance` of route `service` in `report`, if listed.
std::optional<v1::ProxyEndpoint> ReportedEndpoint(const v1::ProxyReport& report,
                                                  const std::string& service,
                                                  const std::string& instance);
std::optional<v1::ProxyRoute> ReportedRoute(const v1::ProxyReport& report,
                                            const std::string& service);

}  // namespace kiln::testing
