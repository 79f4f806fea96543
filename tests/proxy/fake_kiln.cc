#include "tests/proxy/fake_kiln.h"

#include <stdexcept>
#include <utility>

namespace kiln::testing {

using namespace std::chrono_literals;

FakeKiln::FakeKiln(std::string kilnd_id, int port) {
  snapshot_.set_kilnd_id(std::move(kilnd_id));
  snapshot_.set_version(1);
  Serve("127.0.0.1:" + std::to_string(port));
  target_ = "127.0.0.1:" + std::to_string(port_);
}

FakeKiln::FakeKiln(std::string kilnd_id, int port,
                   std::shared_ptr<grpc::ServerCredentials> credentials) {
  snapshot_.set_kilnd_id(std::move(kilnd_id));
  snapshot_.set_version(1);
  Serve("127.0.0.1:" + std::to_string(port), std::move(credentials));
  target_ = "127.0.0.1:" + std::to_string(port_);
}

FakeKiln::FakeKiln(std::string kilnd_id, const std::filesystem::path& unix_socket) {
  snapshot_.set_kilnd_id(std::move(kilnd_id));
  snapshot_.set_version(1);
  target_ = "unix:" + unix_socket.string();
  Serve(target_);
}

void FakeKiln::Serve(const std::string& address,
                     std::shared_ptr<grpc::ServerCredentials> credentials) {
  grpc::ServerBuilder builder;
  int bound = 0;
  builder.AddListeningPort(address, std::move(credentials), &bound);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (!server_ || bound == 0) throw std::runtime_error("fake kiln: cannot listen on " + address);
  if (address.starts_with("127.0.0.1:")) port_ = bound;
}

FakeKiln::~FakeKiln() { Stop(); }

uint64_t FakeKiln::Publish(std::vector<v1::ServiceEndpoints> services) {
  std::lock_guard lock(mu_);
  snapshot_.clear_services();
  for (v1::ServiceEndpoints& s : services) *snapshot_.add_services() = std::move(s);
  snapshot_.set_version(snapshot_.version() + 1);
  cv_.notify_all();
  return snapshot_.version();
}

void FakeKiln::EndStreams() {
  std::lock_guard lock(mu_);
  ++streams_ended_;
  cv_.notify_all();
}

void FakeKiln::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    cv_.notify_all();
  }
  server_->Shutdown(std::chrono::system_clock::now() + 2s);
  server_->Wait();
}

void FakeKiln::SetHung(bool hung) {
  std::lock_guard lock(mu_);
  hung_ = hung;
  cv_.notify_all();
}

void FakeKiln::SetReportInterval(std::chrono::milliseconds interval) {
  std::lock_guard lock(mu_);
  report_interval_ = interval;
}

std::vector<FakeKiln::Watch> FakeKiln::Watches() {
  std::lock_guard lock(mu_);
  return watches_;
}

std::vector<v1::ProxyReport> FakeKiln::Reports() {
  std::lock_guard lock(mu_);
  return reports_;
}

std::optional<v1::ProxyReport> FakeKiln::WaitForReport(
    const std::function<bool(const v1::ProxyReport&)>& match, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  size_t checked = 0;
  std::optional<v1::ProxyReport> found;
  cv_.wait_for(lock, timeout, [&] {
    for (; checked < reports_.size(); ++checked) {
      if (match(reports_[checked])) {
        found = reports_[checked];
        return true;
      }
    }
    return false;
  });
  return found;
}

bool FakeKiln::WaitForWatches(size_t n, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return watches_.size() >= n; });
}

grpc::Status FakeKiln::WatchEndpoints(grpc::ServerContext* ctx,
                                      const v1::WatchEndpointsRequest* request,
                                      grpc::ServerWriter<v1::EndpointsSnapshot>* writer) {
  std::unique_lock lock(mu_);
  Watch watch{.request = *request};
  auto auth = ctx->client_metadata().find("authorization");
  if (auth != ctx->client_metadata().end()) {
    watch.authorization.assign(auth->second.data(), auth->second.size());
  }
  const size_t index = watches_.size();
  watches_.push_back(std::move(watch));
  cv_.notify_all();
  const uint64_t ended = streams_ended_;
  // Resumable as kilnd is: a client that has this kilnd's current version waits for a change.
  uint64_t sent_version =
      request->kilnd_id() == snapshot_.kilnd_id() ? request->after_version() : 0;
  for (;;) {
    cv_.wait_for(lock, 20ms, [&] {
      return stopping_ || streams_ended_ != ended ||
             (!hung_ && snapshot_.version() != sent_version);
    });
    if (stopping_ || streams_ended_ != ended) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream ended by the test");
    }
    if (ctx->IsCancelled()) return grpc::Status::CANCELLED;
    if (hung_ || snapshot_.version() == sent_version) continue;
    v1::EndpointsSnapshot copy = snapshot_;
    lock.unlock();
    const bool written = writer->Write(copy);
    lock.lock();
    if (!written) return grpc::Status::CANCELLED;
    sent_version = copy.version();
    ++watches_[index].sent;
    cv_.notify_all();
  }
}

grpc::Status FakeKiln::ReportProxy(grpc::ServerContext* ctx, const v1::ProxyReport* report,
                                   v1::ReportProxyResponse* response) {
  std::unique_lock lock(mu_);
  while (hung_ && !stopping_) {
    if (ctx->IsCancelled()) return grpc::Status::CANCELLED;
    cv_.wait_for(lock, 20ms);
  }
  if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "stopping");
  reports_.push_back(*report);
  response->set_report_interval_ms(report_interval_.count());
  cv_.notify_all();
  return grpc::Status::OK;
}

v1::Endpoint EndpointAt(const std::string& instance, int port, v1::EndpointState state,
                        int64_t revision) {
  v1::Endpoint e;
  e.set_instance(instance);
  e.set_revision(revision);
  e.set_version("1.0." + std::to_string(revision));
  e.set_host("127.0.0.1");
  e.set_port(port);
  e.set_state(state);
  return e;
}

v1::ServiceEndpoints Exposed(const std::string& service, int port,
                             std::vector<v1::Endpoint> endpoints) {
  v1::ServiceEndpoints s;
  s.set_service(service);
  s.mutable_expose()->set_host("127.0.0.1");
  s.mutable_expose()->set_port(port);
  s.mutable_expose()->set_drain_ms(10'000);
  for (v1::Endpoint& e : endpoints) *s.add_endpoints() = std::move(e);
  return s;
}

std::optional<v1::ProxyRoute> ReportedRoute(const v1::ProxyReport& report,
                                            const std::string& service) {
  for (const v1::ProxyRoute& r : report.routes()) {
    if (r.service() == service) return r;
  }
  return std::nullopt;
}

std::optional<v1::ProxyEndpoint> ReportedEndpoint(const v1::ProxyReport& report,
                                                  const std::string& service,
                                                  const std::string& instance) {
  std::optional<v1::ProxyRoute> route = ReportedRoute(report, service);
  if (!route) return std::nullopt;
  for (const v1::ProxyEndpoint& e : route->endpoints()) {
    if (e.instance() == instance) return e;
  }
  return std::nullopt;
}

}  // namespace kiln::testing
