#include "api/api_server.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/server_interceptor.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "api/io_call.h"
#include "api/log_stream.h"
#include "api/plan_api.h"
#include "api/tokens.h"
#include "common/duration.h"
#include "common/limits.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/utf8.h"
#include "controller/endpoints_hub.h"
#include "controller/reconciler.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "spec/manifest.h"

namespace kiln {
namespace {

namespace pb = ::kiln::v1;
using grpc::ServerContext;

grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), s.message());
}

pb::InstanceState ToProto(InstanceState s) {
  switch (s) {
    case InstanceState::kPending:
      return pb::INSTANCE_STATE_PENDING;
    case InstanceState::kStarting:
      return pb::INSTANCE_STATE_STARTING;
    case InstanceState::kHealthy:
      return pb::INSTANCE_STATE_HEALTHY;
    case InstanceState::kUnhealthy:
      return pb::INSTANCE_STATE_UNHEALTHY;
    case InstanceState::kDraining:
      return pb::INSTANCE_STATE_DRAINING;
    case InstanceState::kTerminated:
      return pb::INSTANCE_STATE_TERMINATED;
    case InstanceState::kFailed:
      return pb::INSTANCE_STATE_FAILED;
    case InstanceState::kLost:
      return pb::INSTANCE_STATE_LOST;
  }
  return pb::INSTANCE_STATE_UNSPECIFIED;
}

pb::Strategy ToProto(Strategy s) {
  switch (s) {
    case Strategy::kRolling:
      return pb::STRATEGY_ROLLING;
    case Strategy::kRecreate:
      return pb::STRATEGY_RECREATE;
    case Strategy::kBlueGreen:
      return pb::STRATEGY_BLUE_GREEN;
    case Strategy::kCanary:
      return pb::STRATEGY_CANARY;
  }
  return pb::STRATEGY_UNSPECIFIED;
}

pb::RolloutState ToProto(RolloutState s) {
  switch (s) {
    case RolloutState::kProgressing:
      return pb::ROLLOUT_STATE_PROGRESSING;
    case RolloutState::kPaused:
      return pb::ROLLOUT_STATE_PAUSED;
    case RolloutState::kWaitingPromotion:
      return pb::ROLLOUT_STATE_WAITING_PROMOTION;
    case RolloutState::kCompleted:
      return pb::ROLLOUT_STATE_COMPLETED;
    case RolloutState::kFailed:
      return pb::ROLLOUT_STATE_FAILED;
    case RolloutState::kSuperseded:
      return pb::ROLLOUT_STATE_SUPERSEDED;
  }
  return pb::ROLLOUT_STATE_UNSPECIFIED;
}

void FillTemplate(const Template& t, pb::Template* out) {
  out->set_version(t.version);
  out->set_artifact_sha256(t.artifact_sha256);
  out->set_image(t.image);
  for (const auto& c : t.command) out->add_command(c);
  for (const auto& [k, v] : t.env) (*out->mutable_env())[k] = v;
  out->set_port(t.port);
  pb::HealthCheck* h = out->mutable_health();
  switch (t.health.kind) {
    case ProbeKind::kHttp:
      h->mutable_http()->set_path(t.health.http_path);
      h->mutable_http()->set_port(t.health.port);
      break;
    case ProbeKind::kTcp:
      h->mutable_tcp()->set_port(t.health.port);
      break;
    case ProbeKind::kExec:
      for (const auto& c : t.health.exec) h->mutable_exec()->add_command(c);
      break;
    case ProbeKind::kNone:
      break;
  }
  h->set_interval_ms(t.health.interval.count());
  h->set_timeout_ms(t.health.timeout.count());
  h->set_failure_threshold(t.health.failure_threshold);
}

}  // namespace

void api_internal::FillRevision(const RevisionRecord& r, pb::Revision* out) {
  out->set_service(r.service);
  out->set_number(r.number);
  out->set_template_hash(r.template_hash);
  if (auto t = Template::FromCanonical(r.template_json); t.ok())
    FillTemplate(*t, out->mutable_template_());
  out->set_source(std::string(RevisionSourceName(r.source)));
  out->set_manifest_file(r.manifest_file);
  out->set_manifest_sha256(r.manifest_sha256);
  out->set_actor(r.actor);
  out->set_reason(r.reason);
  out->set_rolled_back_from(r.rolled_back_from);
  out->set_created_unix_ms(r.created_ms);
  out->set_available_unix_ms(r.available_ms);
  if (!r.commit.id.empty()) {
    pb::Commit* c = out->mutable_commit();
    c->set_id(r.commit.id);
    c->set_author(r.commit.author);
    c->set_time_unix_ms(r.commit.time_ms);
    c->set_subject(r.commit.subject);
  }
  out->set_manifest_dirty(r.commit.dirty);
}

namespace {

using api_internal::FillRevision;

void FillInstance(const InstanceRecord& i, int64_t now_ms, int64_t min_healthy_ms,
                  pb::Instance* out) {
  out->set_id(i.name);
  out->set_service(i.service);
  out->set_revision(i.revision);
  out->set_state(ToProto(i.state));
  out->set_reason(i.replace_reason.empty() ? i.reason : i.reason + " (" + i.replace_reason + ")");
  if (auto docker = ParseDockerHandle(i.handle)) {
    out->set_host(docker->first);  // the Docker host (--docker-host name)
    out->set_container_id(docker->second);
  } else {
    out->set_host(i.host.empty() ? "" : "local");
  }
  out->set_port(i.port);
  out->set_pid(i.pid);
  out->set_available(IsAvailable(i, now_ms, min_healthy_ms));
  out->set_last_probe(i.last_probe);
  out->set_last_probe_ok(i.last_probe_ok);
  out->set_last_probe_unix_ms(i.last_probe_ms);
  out->set_first_probe_failure(i.first_probe_failure);
  out->set_probe_failing_since_unix_ms(i.probe_failing_since_ms);
  out->set_created_unix_ms(i.created_ms);
  out->set_started_unix_ms(i.started_ms);
  out->set_healthy_since_unix_ms(i.healthy_since_ms);
  out->set_finished_unix_ms(i.finished_ms);
  if (i.exit_code) out->set_exit_code(*i.exit_code);
  out->set_exit_signal(i.exit_signal);
}

void FillEvent(const EventRecord& e, pb::Event* out) {
  out->set_seq(e.seq);
  out->set_time_unix_ms(e.time_ms);
  out->set_kind(std::string(EventKindName(e.kind)));
  out->set_service(e.service);
  out->set_revision(e.revision);
  out->set_instance(e.instance);
  out->set_actor(e.actor);
  out->set_message(e.message);
  out->set_count(e.count);
  out->set_first_time_unix_ms(e.first_ms);
}

void FillConditions(const std::vector<Condition>& conditions,
                    google::protobuf::RepeatedPtrField<pb::Condition>* out) {
  for (const Condition& c : conditions) {
    pb::Condition* p = out->Add();
    p->set_type(std::string(ConditionTypeName(c.type)));
    p->set_status(c.status);
    p->set_reason(c.reason);
    p->set_message(c.message);
    p->set_last_transition_unix_ms(c.last_transition_ms);
  }
}

int64_t NowMs(const Clock& clock) { return ToUnixMillis(clock.SystemNow()); }

// "in 40s" from a time in ms (rounded up to whole seconds).
std::string In(int64_t at_ms, int64_t now_ms) {
  const int64_t left = std::max<int64_t>(0, (at_ms - now_ms + 999) / 1000 * 1000);
  return "in " + FormatDuration(Duration(left));
}

// One line on what holds the service back: a permanent start error, a crash loop, retirement.
std::string BackoffLine(const ServiceRecord& s, int64_t now_ms) {
  std::vector<std::string> parts;
  const int64_t target = s.pinned_revision > 0 ? s.pinned_revision : s.desired_revision;
  if (!s.start_error.empty() && s.start_error_revision == target) {
    parts.push_back("cannot start: " + s.start_error +
                    (s.next_start_ms > now_ms ? "; next try " + In(s.next_start_ms, now_ms) : ""));
  } else if (s.crash_count >= 2) {
    parts.push_back(
        "crash-looping: " + s.crash_reason +
        (s.next_start_ms > now_ms ? "; next start " + In(s.next_start_ms, now_ms) : ""));
  }
  if (!s.retired && s.retire_at_ms > 0) {
    parts.push_back("retiring " + In(s.retire_at_ms, now_ms) + ": its manifest is gone");
  }
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : "; ") + p;
  return out;
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// An operator's reason is stored with the revision or event and shown in every status of the
// service: bounded, and text.
grpc::Status CheckReason(const std::string& reason) {
  if (reason.size() > kMaxReasonBytes) {
    return grpc::Status(grpc::INVALID_ARGUMENT, "reason: " + std::to_string(reason.size()) +
                                                    " bytes; at most " +
                                                    std::to_string(kMaxReasonBytes));
  }
  if (auto bad = FindInvalidUtf8(reason)) {
    return grpc::Status(grpc::INVALID_ARGUMENT,
                        "reason: not UTF-8 text (byte " + std::to_string(*bad) + ")");
  }
  return grpc::Status::OK;
}

bool IsLoopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "[::1]" || host == "::1" ||
         host.rfind("127.", 0) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Views of the store shared by the gRPC API and HTTP's /api/v1.

namespace {

// Parsed specs and revision facts are functions of text that never changes (a spec JSON string;
// an immutable revision), so views parse each once. Bounded: cleared when it grows large.
class ViewCache {
 public:
  std::shared_ptr<const ServiceSpec> Spec(const std::string& json) {
    std::lock_guard lock(mu_);
    auto it = specs_.find(json);
    if (it != specs_.end()) return it->second;
    StatusOr<ServiceSpec> spec = ServiceSpecFromJson(json);
    auto parsed = spec.ok() ? std::make_shared<const ServiceSpec>(*spec) : nullptr;
    if (specs_.size() > kMaxEntries) specs_.clear();
    specs_[json] = parsed;
    return parsed;
  }

  struct RevisionFacts {
    std::string hash, version;
  };
  std::optional<RevisionFacts> Revision(StateReader& r, const std::string& service,
                                        int64_t number) {
    auto key = std::make_pair(service, number);
    {
      std::lock_guard lock(mu_);
      auto it = revisions_.find(key);
      if (it != revisions_.end()) return it->second;
    }
    StatusOr<RevisionRecord> rev = r.GetRevision(service, number);
    if (!rev.ok()) return std::nullopt;
    RevisionFacts facts{rev->template_hash, ""};
    if (auto t = Template::FromCanonical(rev->template_json); t.ok()) facts.version = t->version;
    std::lock_guard lock(mu_);
    if (revisions_.size() > kMaxEntries) revisions_.clear();
    revisions_[key] = facts;
    return facts;
  }

 private:
  static constexpr size_t kMaxEntries = 50'000;
  std::mutex mu_;  // guards specs_ and revisions_
  std::map<std::string, std::shared_ptr<const ServiceSpec>> specs_;
  std::map<std::pair<std::string, int64_t>, RevisionFacts> revisions_;
};

ViewCache& Cache() {
  static ViewCache* cache = new ViewCache();  // lives for the process; never destroyed mid-call
  return *cache;
}

int64_t MinHealthyMs(const ServiceRecord& s) {
  auto spec = Cache().Spec(s.spec);
  return spec ? spec->update.min_healthy_time.count() : 0;
}

pb::EndpointState ToProto(PoolState s) {
  switch (s) {
    case PoolState::kReady:
      return pb::ENDPOINT_STATE_READY;
    case PoolState::kNotReady:
      return pb::ENDPOINT_STATE_NOT_READY;
    case PoolState::kDraining:
      return pb::ENDPOINT_STATE_DRAINING;
  }
  return pb::ENDPOINT_STATE_UNSPECIFIED;
}

pb::ProxyEndpointState ToProto(ProxyEndpointReport::State s) {
  switch (s) {
    case ProxyEndpointReport::State::kActive:
      return pb::PROXY_ENDPOINT_STATE_ACTIVE;
    case ProxyEndpointReport::State::kDraining:
      return pb::PROXY_ENDPOINT_STATE_DRAINING;
    case ProxyEndpointReport::State::kEjected:
      return pb::PROXY_ENDPOINT_STATE_EJECTED;
  }
  return pb::PROXY_ENDPOINT_STATE_UNSPECIFIED;
}

void FillExpose(const ExposeSpec& e, pb::Expose* out) {
  out->set_host(e.listen_host);
  out->set_port(e.port);
  out->set_drain_ms(e.drain.count());
}

void FillPool(const ServicePool& pool, pb::ServiceEndpoints* out) {
  out->set_service(pool.service);
  FillExpose(pool.expose, out->mutable_expose());
  for (const PoolEndpoint& p : pool.endpoints) {
    pb::Endpoint* e = out->add_endpoints();
    e->set_instance(p.instance);
    e->set_revision(p.revision);
    e->set_version(p.version);
    e->set_host(p.host);
    e->set_port(p.port);
    e->set_state(ToProto(p.state));
  }
}

void FillProxyRoute(const std::string& proxy, const ProxyRouteReport& r, pb::ProxyRoute* out) {
  out->set_proxy(proxy);
  out->set_service(r.service);
  out->set_listen_host(r.listen_host);
  out->set_listen_port(r.listen_port);
  out->set_bound_port(r.bound_port);
  out->set_bind_error(r.bind_error);
  out->set_rejected_connections(r.rejected_connections);
  for (const ProxyEndpointReport& e : r.endpoints) {
    pb::ProxyEndpoint* p = out->add_endpoints();
    p->set_instance(e.instance);
    p->set_revision(e.revision);
    p->set_host(e.host);
    p->set_port(e.port);
    p->set_state(ToProto(e.state));
    p->set_open_connections(e.open_connections);
    p->set_total_connections(e.total_connections);
    p->set_connect_failures(e.connect_failures);
    p->set_bytes_in(e.bytes_in);
    p->set_bytes_out(e.bytes_out);
  }
}

ProxyReportData FromProto(const pb::ProxyReport& in) {
  ProxyReportData out;
  out.proxy = in.proxy();
  out.kilnd_id = in.kilnd_id();
  out.version = in.version();
  out.started_ms = in.started_unix_ms();
  for (const pb::ProxyRoute& r : in.routes()) {
    ProxyRouteReport route;
    route.service = r.service();
    route.listen_host = r.listen_host();
    route.listen_port = r.listen_port();
    route.bound_port = r.bound_port();
    route.bind_error = r.bind_error();
    route.rejected_connections = r.rejected_connections();
    for (const pb::ProxyEndpoint& e : r.endpoints()) {
      ProxyEndpointReport p;
      p.instance = e.instance();
      p.revision = e.revision();
      p.host = e.host();
      p.port = e.port();
      p.state =
          e.state() == pb::PROXY_ENDPOINT_STATE_DRAINING  ? ProxyEndpointReport::State::kDraining
          : e.state() == pb::PROXY_ENDPOINT_STATE_EJECTED ? ProxyEndpointReport::State::kEjected
                                                          : ProxyEndpointReport::State::kActive;
      p.open_connections = e.open_connections();
      p.total_connections = e.total_connections();
      p.connect_failures = e.connect_failures();
      p.bytes_in = e.bytes_in();
      p.bytes_out = e.bytes_out();
      route.endpoints.push_back(std::move(p));
    }
    out.routes.push_back(std::move(route));
  }
  return out;
}

// "draining: 3 open connections, 6s left" for a draining instance of an exposed service.
std::string DrainLine(const EndpointsHub::DrainStatus& st, int64_t deadline_ms, int64_t now_ms) {
  std::string line = "draining: ";
  if (st.proxies == 0) {
    line += "no proxy reporting";
  } else {
    line += std::to_string(st.open_connections) + " open connection" +
            (st.open_connections == 1 ? "" : "s");
  }
  const int64_t left = std::max<int64_t>(0, (deadline_ms - now_ms + 999) / 1000 * 1000);
  return line + ", " + FormatDuration(Duration(left)) + " left";
}

// A proxy that cannot listen on the service's address makes the service Degraded
// (ExposeBindFailed), whatever the stored conditions say: it is the proxy's to report.
void OverlayBindErrors(const std::string& service, const std::vector<ProxyReportData>& reports,
                       int64_t now_ms, google::protobuf::RepeatedPtrField<pb::Condition>* out) {
  for (const ProxyReportData& r : reports) {
    for (const ProxyRouteReport& route : r.routes) {
      if (route.service != service || route.bind_error.empty()) continue;
      pb::Condition* degraded = nullptr;
      for (pb::Condition& c : *out) {
        if (c.type() == "Degraded") degraded = &c;
      }
      if (degraded == nullptr) {
        degraded = out->Add();
        degraded->set_type("Degraded");
        degraded->set_last_transition_unix_ms(now_ms);
      }
      degraded->set_status(true);
      degraded->set_reason("ExposeBindFailed");
      degraded->set_message(r.proxy + " cannot listen on " + route.listen_host + ":" +
                            std::to_string(route.listen_port) + ": " + route.bind_error +
                            "; retrying");
      return;
    }
  }
}

void FillCommit(const SourceCommit& c, pb::Commit* out) {
  out->set_id(c.id);
  out->set_author(c.author);
  out->set_time_unix_ms(c.time_ms);
  out->set_subject(c.subject);
}

void FillDockerHosts(const std::vector<DockerHostStatus>& hosts, pb::ListServicesResponse* out) {
  for (const DockerHostStatus& h : hosts) {
    pb::DockerHost* d = out->add_docker_hosts();
    d->set_name(h.name);
    d->set_endpoint(h.endpoint);
    d->set_configured(h.configured);
    d->set_up(h.up);
    d->set_last_error(h.last_error);
    d->set_since_unix_ms(h.since_ms);
    d->set_instances(h.instances);
    d->set_left_running(h.left_running);
    for (const auto& [service, n] : h.per_service)
      (*d->mutable_instances_by_service())[service] = n;
  }
}

void FillGitStatus(const git::SourceStatus& in, pb::GitSourceStatus* out) {
  out->set_url(in.url);
  out->set_branch(in.branch);
  if (in.seen) FillCommit(*in.seen, out->mutable_seen());
  if (in.deployed) FillCommit(*in.deployed, out->mutable_deployed());
  out->set_manifest_error(in.manifest_error);
  out->set_fetch_error(in.fetch_error);
  out->set_last_fetch_unix_ms(in.last_fetch_ms);
  out->set_last_success_unix_ms(in.last_success_ms);
  out->set_fetches_done(in.fetches_done);
  out->set_poll_interval_ms(in.poll_interval_ms);
}

// One line on a pin: "pinned to revision 6 (revision 4's template) by alice: bad deploy; the
// branch still declares revision 5's template (commit 1a2b3c4d5e6f)". A pin holds while the
// manifest declares the template it rolled away from, so the desired revision is what the
// manifest (the branch, when it came from a commit) still declares.
std::string PinStatus(StateReader& r, const ServiceRecord& s) {
  std::string line = "pinned to revision " + std::to_string(s.pinned_revision);
  if (auto pinned = r.GetRevision(s.name, s.pinned_revision); pinned.ok()) {
    if (pinned->rolled_back_from > 0)
      line += " (revision " + std::to_string(pinned->rolled_back_from) + "'s template)";
    if (!pinned->actor.empty())
      line += pinned->actor == "auto" ? " by automatic rollback" : " by " + pinned->actor;
    if (!pinned->reason.empty()) line += ": " + pinned->reason;
  } else if (!s.pin_reason.empty()) {
    line += " (" + s.pin_reason + ")";
  }
  if (s.desired_revision <= 0 || s.desired_revision == s.pinned_revision) return line;
  auto desired = r.GetRevision(s.name, s.desired_revision);
  const bool committed = desired.ok() && !desired->commit.id.empty() && !desired->commit.dirty;
  line += std::string("; the ") + (committed ? "branch" : "manifest") +
          " still declares revision " + std::to_string(s.desired_revision) + "'s template";
  if (committed) line += " (commit " + desired->commit.id.substr(0, 12) + ")";
  return line;
}

// Summary (and with `full`, everything of GetService) for one service.
// `prefetched`: the service's live instances when the caller already has them.
Status FillSummary(StateReader& r, const Clock& clock, const ServiceRecord& s,
                   pb::ServiceSummary* sum, pb::Service* full,
                   const std::vector<InstanceRecord>* prefetched, const EndpointsHub* hub) {
  std::shared_ptr<const ServiceSpec> spec = Cache().Spec(s.spec);
  sum->set_name(s.name);
  sum->set_desired_revision(s.desired_revision);
  sum->set_pinned_revision(s.pinned_revision);
  const int64_t target = s.pinned_revision > 0 ? s.pinned_revision : s.desired_revision;
  sum->set_target_revision(target);
  sum->set_paused(s.paused);
  sum->set_retired(s.retired);
  sum->set_manifest_error(s.manifest_error);
  FillConditions(s.conditions, sum->mutable_conditions());
  const int64_t now = NowMs(clock);
  const bool exposed = spec && spec->expose && !s.retired;
  if (exposed) FillExpose(*spec->expose, sum->mutable_expose());
  std::vector<ProxyReportData> reports;
  if (hub != nullptr && spec && spec->expose) reports = hub->LiveReports();
  if (exposed) OverlayBindErrors(s.name, reports, now, sum->mutable_conditions());
  sum->set_crash_count(s.crash_count);
  sum->set_crash_reason(s.crash_reason);
  sum->set_next_start_unix_ms(s.next_start_ms);
  sum->set_start_error(s.start_error_revision == target ? s.start_error : "");
  sum->set_retire_at_unix_ms(s.retired ? 0 : s.retire_at_ms);
  sum->set_backoff(BackoffLine(s, now));
  if (spec) sum->set_replicas(s.retired ? 0 : spec->replicas);
  std::string target_hash;
  if (target > 0) {
    if (auto facts = Cache().Revision(r, s.name, target)) {
      target_hash = facts->hash;
      sum->set_version(facts->version);
    }
  }
  std::vector<InstanceRecord> fetched;
  if (!prefetched) {
    ASSIGN_OR_RETURN(fetched, r.ListInstances(s.name, false));
  }
  const std::vector<InstanceRecord>& live = prefetched ? *prefetched : fetched;
  const int64_t min_healthy = spec ? spec->update.min_healthy_time.count() : 0;
  std::map<int64_t, pb::RevisionCount> counts;
  std::map<int64_t, std::string> hashes;
  int available = 0;
  hashes[target] = target_hash;
  for (const auto& i : live) {
    if (!hashes.count(i.revision)) {
      auto facts = Cache().Revision(r, s.name, i.revision);
      hashes[i.revision] = facts ? facts->hash : "";
    }
    const bool avail = IsAvailable(i, now, min_healthy);
    if (avail && hashes[i.revision] == target_hash) ++available;
    pb::RevisionCount& c = counts[i.revision];
    c.set_revision(i.revision);
    c.set_total(c.total() + 1);
    c.set_healthy(c.healthy() + (i.state == InstanceState::kHealthy));
    c.set_available(c.available() + avail);
    if (!full) continue;
    pb::Instance* out = full->add_instances();
    FillInstance(i, now, min_healthy, out);
    if (hub != nullptr && spec && spec->expose && i.state == InstanceState::kDraining) {
      EndpointsHub::DrainStatus st = hub->Drain(i.name);
      const int64_t deadline = i.state_changed_ms + spec->expose->drain.count();
      out->set_open_connections(st.open_connections);
      out->set_drain_deadline_unix_ms(deadline);
      out->set_drain(DrainLine(st, deadline, now));
    }
  }
  sum->set_available(available);
  sum->set_live(static_cast<int32_t>(live.size()));
  if (!full) return Status::Ok();
  full->set_manifest_file(s.manifest_file);
  for (const ProxyReportData& rep : reports) {
    for (const ProxyRouteReport& route : rep.routes) {
      if (route.service == s.name) FillProxyRoute(rep.proxy, route, full->add_proxy_routes());
    }
  }
  full->set_pin_reason(s.pin_reason);
  if (s.pinned_revision > 0) full->set_pin_status(PinStatus(r, s));
  for (auto& [rev, c] : counts) *full->add_revisions() = c;
  if (spec) {
    full->set_history_limit(spec->history_limit);
    pb::UpdatePolicy* u = full->mutable_update();
    u->set_strategy(ToProto(spec->update.strategy));
    u->mutable_max_surge()->set_value(spec->update.max_surge.value);
    u->mutable_max_surge()->set_percent(spec->update.max_surge.percent);
    u->mutable_max_unavailable()->set_value(spec->update.max_unavailable.value);
    u->mutable_max_unavailable()->set_percent(spec->update.max_unavailable.percent);
    u->set_min_healthy_time_ms(spec->update.min_healthy_time.count());
    u->set_healthy_deadline_ms(spec->update.healthy_deadline.count());
    u->set_progress_deadline_ms(spec->update.progress_deadline.count());
    u->set_auto_rollback(spec->update.auto_rollback);
    u->set_canary(spec->update.canary);
    u->set_auto_promote(spec->update.auto_promote);
  }
  StatusOr<RolloutRecord> ro = r.GetLatestRollout(s.name);
  if (ro.ok()) {
    pb::Rollout* p = full->mutable_rollout();
    p->set_id(ro->id);
    p->set_from_revision(ro->from_revision);
    p->set_to_revision(ro->to_revision);
    p->set_strategy(ToProto(ro->strategy));
    p->set_state(ToProto(ro->state));
    p->set_reason(ro->reason);
    p->set_started_unix_ms(ro->started_ms);
    p->set_last_progress_unix_ms(ro->last_progress_ms);
    p->set_finished_unix_ms(ro->finished_ms);
    p->set_paused_ms(ro->paused_ms);
  }
  return Status::Ok();
}

Status BuildListServices(StateReader& r, const Clock& clock, pb::ListServicesResponse* resp,
                         const EndpointsHub* hub) {
  return r.Snapshot([&]() -> Status {
    ASSIGN_OR_RETURN(auto services, r.ListServices());
    // One query for every live instance rather than one per service.
    ASSIGN_OR_RETURN(auto live, r.ListLiveInstances());
    std::map<std::string, std::vector<InstanceRecord>> by_service;
    for (auto& i : live) by_service[i.service].push_back(std::move(i));
    for (const auto& s : services) {
      RETURN_IF_ERROR(
          FillSummary(r, clock, s, resp->add_services(), nullptr, &by_service[s.name], hub));
    }
    return Status::Ok();
  });
}

Status BuildGetService(StateReader& r, const Clock& clock, const std::string& name,
                       pb::GetServiceResponse* resp, const EndpointsHub* hub) {
  return r.Snapshot([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord s, r.GetService(name));
    return FillSummary(r, clock, s, resp->mutable_service()->mutable_summary(),
                       resp->mutable_service(), nullptr, hub);
  });
}

// The address of every started instance of `service` (every service when empty), in a snapshot.
Status BuildEndpoints(StateReader& r, const Clock& clock, const std::string& service,
                      pb::GetEndpointsResponse* resp) {
  return r.Snapshot([&]() -> Status {
    std::vector<ServiceRecord> services;
    if (service.empty()) {
      ASSIGN_OR_RETURN(services, r.ListServices());
    } else {
      ASSIGN_OR_RETURN(ServiceRecord s, r.GetService(service));
      services.push_back(std::move(s));
    }
    ASSIGN_OR_RETURN(auto live, r.ListLiveInstances());
    std::map<std::string, std::vector<InstanceRecord>> by_service;
    for (auto& i : live) by_service[i.service].push_back(std::move(i));
    const int64_t now = NowMs(clock);
    for (const ServiceRecord& s : services) {
      std::shared_ptr<const ServiceSpec> spec = Cache().Spec(s.spec);
      const bool exposed = spec && spec->expose && !s.retired;
      // The same pool states the proxies are sent (a blue-green rollout holds its new set back).
      std::optional<RolloutRecord> rollout;
      if (exposed) {
        StatusOr<RolloutRecord> ro = r.GetLatestRollout(s.name);
        if (ro.ok()) rollout = *ro;
      }
      auto version_of = [&](int64_t revision) {
        auto facts = Cache().Revision(r, s.name, revision);
        return facts ? facts->version : std::string();
      };
      ServicePool pool = BuildPool(s.name, exposed ? *spec->expose : ExposeSpec{},
                                   by_service[s.name], rollout, now, MinHealthyMs(s), version_of);
      pb::ServiceEndpoints* se = resp->add_services();
      FillPool(pool, se);
      if (!exposed) se->clear_expose();
    }
    return Status::Ok();
  });
}

std::string MessageJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

}  // namespace

StatusOr<std::string> ServicesJson(StateReader& r, const Clock& clock, const EndpointsHub* hub,
                                   const git::SourceStatus* git_status,
                                   const std::vector<DockerHostStatus>* docker_hosts) {
  pb::ListServicesResponse resp;
  RETURN_IF_ERROR(BuildListServices(r, clock, &resp, hub));
  if (git_status != nullptr) FillGitStatus(*git_status, resp.mutable_git());
  if (docker_hosts != nullptr) FillDockerHosts(*docker_hosts, &resp);
  return MessageJson(resp);
}

StatusOr<std::string> ServiceJson(StateReader& r, const std::string& name, const Clock& clock,
                                  const EndpointsHub* hub, const git::SourceStatus* git_status) {
  pb::GetServiceResponse resp;
  RETURN_IF_ERROR(BuildGetService(r, clock, name, &resp, hub));
  if (git_status != nullptr) FillGitStatus(*git_status, resp.mutable_git());
  return MessageJson(resp);
}

StatusOr<std::string> EndpointsJson(StateReader& r, const std::string& service,
                                    const Clock& clock) {
  pb::GetEndpointsResponse resp;
  RETURN_IF_ERROR(BuildEndpoints(r, clock, service, &resp));
  return MessageJson(resp);
}

StatusOr<std::string> PrometheusSdJson(StateReader& r) {
  pb::GetEndpointsResponse resp;
  RETURN_IF_ERROR(BuildEndpoints(r, RealClockInstance(), "", &resp));
  nlohmann::json groups = nlohmann::json::array();
  for (const pb::ServiceEndpoints& s : resp.services()) {
    for (const pb::Endpoint& e : s.endpoints()) {
      groups.push_back({{"targets", {e.host() + ":" + std::to_string(e.port())}},
                        {"labels",
                         {{"service", s.service()},
                          {"revision", std::to_string(e.revision())},
                          {"version", e.version()},
                          {"instance", e.instance()}}}});
    }
  }
  return groups.dump(2) + "\n";
}

StatusOr<std::string> HistoryJson(StateReader& r, const std::string& service) {
  pb::GetHistoryResponse resp;
  RETURN_IF_ERROR(r.Snapshot([&]() -> Status {
    RETURN_IF_ERROR(r.GetService(service).status());
    ASSIGN_OR_RETURN(auto revisions, r.ListRevisions(service));
    for (const auto& rev : revisions) FillRevision(rev, resp.add_revisions());
    return Status::Ok();
  }));
  return MessageJson(resp);
}

StatusOr<std::string> EventsJson(StateReader& r, int64_t after_seq, const std::string& service,
                                 int limit) {
  ASSIGN_OR_RETURN(int64_t oldest, r.OldestEventSeq());
  if (after_seq > 0 && oldest > after_seq + 1) {
    return Status(StatusCode::kOutOfRange, "events after " + std::to_string(after_seq) +
                                               " were pruned; the oldest available is " +
                                               std::to_string(oldest));
  }
  ASSIGN_OR_RETURN(auto events,
                   r.ReadEvents({.after_seq = after_seq, .service = service, .limit = limit}));
  std::string out = "{\"events\":[";
  for (size_t i = 0; i < events.size(); ++i) {
    pb::Event e;
    FillEvent(events[i], &e);
    if (i) out += ",";
    out += MessageJson(e);
  }
  return out + "]}";
}

// Returns from an RPC handler when the caller may not make this call.
#define RETURN_GRPC_IF_DENIED(ctx, mutating)         \
  do {                                               \
    grpc::Status denied_ = Authorize(ctx, mutating); \
    if (!denied_.ok()) return denied_;               \
  } while (false)

class KilnApi final : public pb::Kiln::Service {
 public:
  KilnApi(boost::asio::io_context& io, Reconciler& reconciler,
          std::vector<std::unique_ptr<StateReader>> readers,
          std::optional<std::map<std::string, Caller>> tokens, int max_streams,
          Duration command_timeout, const Clock& clock, EndpointsHub* hub)
      : io_(io),
        reconciler_(reconciler),
        clock_(clock),
        hub_(hub),
        tokens_(std::move(tokens)),
        max_streams_(max_streams),
        command_timeout_(command_timeout) {
    for (auto& r : readers) readers_.push_back({std::move(r), std::make_unique<std::mutex>()});
  }

  void Stop() { stopping_ = true; }

  grpc::Status ListServices(ServerContext* ctx, const pb::ListServicesRequest*,
                            pb::ListServicesResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    grpc::Status st = ToGrpc(
        WithReader([&](StateReader& r) { return BuildListServices(r, clock_, resp, hub_); }));
    if (st.ok() && git_status_) FillGitStatus(git_status_(), resp->mutable_git());
    if (st.ok() && docker_hosts_) FillDockerHosts(docker_hosts_(), resp);
    return st;
  }

  grpc::Status GetService(ServerContext* ctx, const pb::GetServiceRequest* req,
                          pb::GetServiceResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (req->name().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "name is required");
    grpc::Status st = ToGrpc(WithReader(
        [&](StateReader& r) { return BuildGetService(r, clock_, req->name(), resp, hub_); }));
    if (st.ok() && git_status_) FillGitStatus(git_status_(), resp->mutable_git());
    return st;
  }

  grpc::Status GetEndpoints(ServerContext* ctx, const pb::GetEndpointsRequest* req,
                            pb::GetEndpointsResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    return ToGrpc(WithReader(
        [&](StateReader& r) { return BuildEndpoints(r, clock_, req->service(), resp); }));
  }

  grpc::Status WatchEndpoints(ServerContext* ctx, const pb::WatchEndpointsRequest* req,
                              grpc::ServerWriter<pb::EndpointsSnapshot>* writer) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (hub_ == nullptr)
      return grpc::Status(grpc::UNIMPLEMENTED, "this kilnd has no endpoints hub");
    StreamSlot slot(streams_, max_streams_);
    if (!slot) return TooManyStreams("streams");
    std::string kilnd_id = req->kilnd_id();
    uint64_t version = req->after_version();
    // Whole snapshots, each only after the previous one was written: a slow proxy skips
    // versions, never falls behind.
    while (!ctx->IsCancelled() && !stopping_) {
      if (!hub_->WaitForChange(kilnd_id, version, std::chrono::milliseconds(500))) continue;
      EndpointsHub::Snapshot snap = hub_->Current();
      pb::EndpointsSnapshot out;
      out.set_kilnd_id(snap.kilnd_id);
      out.set_version(snap.version);
      for (const ServicePool& pool : snap.services) FillPool(pool, out.add_services());
      if (!writer->Write(out)) return grpc::Status::OK;  // the client went away
      kilnd_id = snap.kilnd_id;
      version = snap.version;
    }
    return grpc::Status::OK;
  }

  grpc::Status ReportProxy(ServerContext* ctx, const pb::ProxyReport* req,
                           pb::ReportProxyResponse* resp) override {
    if (tokens_) {
      StatusOr<Caller> caller = CallerOf(ctx);
      if (!caller.ok()) return ToGrpc(caller.status());
      if (caller->role != Role::kOperator && caller->role != Role::kProxy) {
        return grpc::Status(grpc::PERMISSION_DENIED,
                            caller->name + " is a viewer; ReportProxy needs the proxy role");
      }
    }
    if (hub_ == nullptr)
      return grpc::Status(grpc::UNIMPLEMENTED, "this kilnd has no endpoints hub");
    if (req->proxy().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "proxy is required");
    hub_->Report(FromProto(*req));
    resp->set_report_interval_ms(hub_->report_interval().count());
    return grpc::Status::OK;
  }

  grpc::Status ListInstances(ServerContext* ctx, const pb::ListInstancesRequest* req,
                             pb::ListInstancesResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    return ToGrpc(WithReader([&](StateReader& r) -> Status {
      return r.Snapshot([&]() -> Status {
        ASSIGN_OR_RETURN(ServiceRecord s, r.GetService(req->service()));
        const int64_t min_healthy = MinHealthyMs(s);
        ASSIGN_OR_RETURN(auto instances, r.ListInstances(req->service(), req->include_finished()));
        const int64_t now = NowMs(clock_);
        for (const auto& i : instances) FillInstance(i, now, min_healthy, resp->add_instances());
        return Status::Ok();
      });
    }));
  }

  grpc::Status GetHistory(ServerContext* ctx, const pb::GetHistoryRequest* req,
                          pb::GetHistoryResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    return ToGrpc(WithReader([&](StateReader& r) -> Status {
      return r.Snapshot([&]() -> Status {
        RETURN_IF_ERROR(r.GetService(req->service()).status());
        ASSIGN_OR_RETURN(auto revisions, r.ListRevisions(req->service()));
        for (const auto& rev : revisions) FillRevision(rev, resp->add_revisions());
        return Status::Ok();
      });
    }));
  }

  grpc::Status Plan(ServerContext* ctx, const pb::PlanRequest* req,
                    pb::PlanResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    std::vector<std::string> names;
    if (!req->service().empty()) {
      names.push_back(req->service());
    } else {
      auto all = OnIo(
          [this]() -> StatusOr<std::vector<std::string>> { return reconciler_.ServiceNames(); });
      if (!all.ok()) return ToGrpc(all.status());
      names = *all;
    }
    for (const auto& name : names) {
      auto next =
          OnIo([this, name]() -> StatusOr<Reconciler::NextStep> { return reconciler_.Plan(name); });
      if (!next.ok()) {
        if (!req->service().empty()) return ToGrpc(next.status());
        pb::PlanStep* step = resp->add_steps();  // e.g. retired: nothing declared to plan for
        step->set_service(name);
        step->set_action("none");
        step->set_reason(next.status().message());
        continue;
      }
      api_internal::AppendPlanSteps(name, *next, resp->mutable_steps());
    }
    return grpc::Status::OK;
  }

  grpc::Status Rollback(ServerContext* ctx, const pb::RollbackRequest* req,
                        pb::RollbackResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    if (req->to_revision() < 0)
      return grpc::Status(grpc::INVALID_ARGUMENT, "to_revision must be 0 or more");
    if (grpc::Status bad = CheckReason(req->reason()); !bad.ok()) return bad;
    const std::string actor = Actor(ctx);
    auto rev =
        OnIo([this, service = req->service(), to = req->to_revision(), reason = req->reason(),
              actor] { return reconciler_.Rollback(service, to, reason, actor); });
    if (!rev.ok()) return ToGrpc(rev.status());
    FillRevision(*rev, resp->mutable_revision());
    return grpc::Status::OK;
  }

  grpc::Status Unpin(ServerContext* ctx, const pb::UnpinRequest* req,
                     pb::UnpinResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    const std::string actor = Actor(ctx);
    auto target = OnIo([this, service = req->service(), actor]() -> StatusOr<int64_t> {
      return reconciler_.Unpin(service, actor);
    });
    if (!target.ok()) return ToGrpc(target.status());
    resp->set_target_revision(*target);
    return grpc::Status::OK;
  }

  grpc::Status Pause(ServerContext* ctx, const pb::PauseRequest* req, pb::PauseResponse*) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    if (grpc::Status bad = CheckReason(req->reason()); !bad.ok()) return bad;
    const std::string actor = Actor(ctx);
    return Command([this, service = req->service(), reason = req->reason(), actor] {
      return reconciler_.Pause(service, reason, actor);
    });
  }

  grpc::Status Resume(ServerContext* ctx, const pb::ResumeRequest* req,
                      pb::ResumeResponse*) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    const std::string actor = Actor(ctx);
    return Command(
        [this, service = req->service(), actor] { return reconciler_.Resume(service, actor); });
  }

  grpc::Status Promote(ServerContext* ctx, const pb::PromoteRequest* req,
                       pb::PromoteResponse*) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->service().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "service is required");
    const std::string actor = Actor(ctx);
    return Command(
        [this, service = req->service(), actor] { return reconciler_.Promote(service, actor); });
  }

  grpc::Status ReplaceInstance(ServerContext* ctx, const pb::ReplaceInstanceRequest* req,
                               pb::ReplaceInstanceResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (req->instance().empty())
      return grpc::Status(grpc::INVALID_ARGUMENT, "instance is required");
    if (grpc::Status bad = CheckReason(req->reason()); !bad.ok()) return bad;
    const std::string actor = Actor(ctx);
    resp->set_instance(req->instance());
    return Command([this, instance = req->instance(), reason = req->reason(), actor] {
      return reconciler_.ReplaceInstance(instance, reason, actor);
    });
  }

  grpc::Status WatchEvents(ServerContext* ctx, const pb::WatchEventsRequest* req,
                           grpc::ServerWriter<pb::Event>* writer) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (req->after_seq() < 0)
      return grpc::Status(grpc::INVALID_ARGUMENT, "after_seq must be 0 or more");
    StreamSlot slot(streams_, max_streams_);
    if (!slot) return TooManyStreams("event streams");

    int64_t cursor = req->after_seq();
    Status first = WithReader([&](StateReader& r) -> Status {
      ASSIGN_OR_RETURN(int64_t oldest, r.OldestEventSeq());
      ASSIGN_OR_RETURN(int64_t latest, r.LatestEventSeq());
      if (cursor > 0 && oldest > cursor + 1) {
        return Status(StatusCode::kOutOfRange, "events after " + std::to_string(cursor) +
                                                   " were pruned; the oldest available is " +
                                                   std::to_string(oldest));
      }
      if (cursor > latest) {
        return Status(StatusCode::kOutOfRange, "no event " + std::to_string(cursor) +
                                                   " yet; the latest is " + std::to_string(latest));
      }
      return Status::Ok();
    });
    if (!first.ok()) return ToGrpc(first);
    // Batches are read only after the previous one was written: a slow reader holds back the
    // stream (gRPC flow control), never our memory.
    while (!ctx->IsCancelled() && !stopping_) {
      std::vector<EventRecord> batch;
      Status s = WithReader([&](StateReader& r) -> Status {
        ASSIGN_OR_RETURN(
            batch, r.ReadEvents({.after_seq = cursor, .service = req->service(), .limit = 256}));
        return Status::Ok();
      });
      if (!s.ok()) return ToGrpc(s);
      for (const auto& e : batch) {
        pb::Event ev;
        FillEvent(e, &ev);
        if (!writer->Write(ev)) return grpc::Status::OK;  // the client went away
        cursor = e.seq;
      }
      if (batch.size() == 256) continue;
      if (!req->follow()) return grpc::Status::OK;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return grpc::Status::OK;
  }

  grpc::Status DiffRevisions(ServerContext* ctx, const pb::DiffRevisionsRequest* req,
                             pb::DiffRevisionsResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    return ToGrpc(WithReader(
        [&](StateReader& r) { return api_internal::BuildDiffRevisions(r, *req, resp); }));
  }

  grpc::Status PlanManifests(ServerContext* ctx, const pb::PlanManifestsRequest* req,
                             pb::PlanManifestsResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    StatusOr<ManifestSet> parsed = api_internal::ParsePlanRequest(*req, manifest_rules_);
    if (!parsed.ok()) return ToGrpc(parsed.status());
    auto set = std::make_shared<const ManifestSet>(*std::move(parsed));
    auto verdicts =
        OnIo([this, set, whole = req->whole_directory()]() -> StatusOr<api_internal::PlanVerdicts> {
          return api_internal::PlanOnReconciler(reconciler_, *set, whole);
        });
    if (!verdicts.ok()) return ToGrpc(verdicts.status());
    return ToGrpc(WithReader(
        [&](StateReader& r) { return api_internal::BuildPlanResponse(r, *set, *verdicts, resp); }));
  }

  // kilnd's own manifest rules beyond the file format (the ports of --port-range).
  void SetManifestRules(std::function<void(ManifestSet&)> rules) {
    manifest_rules_ = std::move(rules);
  }

  void SetLogDir(std::filesystem::path dir) { log_dir_ = std::move(dir); }

  grpc::Status StreamLogs(ServerContext* ctx, const pb::StreamLogsRequest* req,
                          grpc::ServerWriter<pb::LogLines>* writer) override {
    RETURN_GRPC_IF_DENIED(ctx, false);
    if (req->name().empty()) return grpc::Status(grpc::INVALID_ARGUMENT, "name is required");
    if (req->tail() < 0 || req->since_unix_ms() < 0 || req->revision() < 0)
      return grpc::Status(grpc::INVALID_ARGUMENT,
                          "tail, since_unix_ms and revision must be 0 or more");
    if (log_dir_.empty())
      return grpc::Status(grpc::UNIMPLEMENTED, "this kilnd keeps no instance logs");
    StreamSlot slot(streams_, max_streams_);
    if (!slot) return TooManyStreams("streams");
    LogFanIn logs(log_dir_, *req);
    if (Status s = WithReader([&](StateReader& r) { return logs.Refresh(r); }); !s.ok())
      return ToGrpc(s);
    // What is kept: one instance after another. A batch is read only after the previous one was
    // written, so a slow client holds the stream back (flow control), never our memory.
    for (size_t i = 0; i < logs.size(); ++i) {
      for (;;) {
        if (ctx->IsCancelled() || stopping_) return grpc::Status::OK;
        pb::LogLines out;
        if (!logs.Read(i, /*to_end=*/!req->follow(), &out)) break;
        if (!writer->Write(out)) return grpc::Status::OK;  // the client went away
      }
    }
    if (!req->follow()) return grpc::Status::OK;
    // Then whatever comes, from every instance in turn, and instances that start later.
    auto refreshed = std::chrono::steady_clock::now();
    while (!ctx->IsCancelled() && !stopping_) {
      if (std::chrono::steady_clock::now() - refreshed >= std::chrono::seconds(1)) {
        // A store error here is passing (busy): the instances known keep being followed.
        (void)WithReader([&](StateReader& r) { return logs.Refresh(r); });
        refreshed = std::chrono::steady_clock::now();
      }
      pb::LogLines out;
      for (size_t i = 0; i < logs.size(); ++i) {
        if (out.ByteSizeLong() >= LogFanIn::kMaxBatchBytes) break;
        logs.Read(i, /*to_end=*/false, &out);
      }
      if (out.lines_size() > 0) {
        if (!writer->Write(out)) return grpc::Status::OK;
        continue;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return grpc::Status::OK;
  }

  grpc::Status Sync(ServerContext* ctx, const pb::SyncRequest*, pb::SyncResponse* resp) override {
    RETURN_GRPC_IF_DENIED(ctx, true);
    if (!sync_) {
      return grpc::Status(grpc::FAILED_PRECONDITION,
                          "the manifests are a directory, not a git source: nothing to sync");
    }
    resp->set_fetch(sync_());
    LogInfo("fetch of the manifests' branch asked for",
            {{"actor", Actor(ctx)}, {"fetch", resp->fetch()}});
    return grpc::Status::OK;
  }

  void SetDockerHosts(std::function<std::vector<DockerHostStatus>()> hosts) {
    docker_hosts_ = std::move(hosts);
  }

  // With --manifests git+...: status of the source and a fetch now (see ApiServer::Options).
  void SetGitSource(std::function<git::SourceStatus()> status, std::function<int64_t()> sync) {
    git_status_ = std::move(status);
    sync_ = std::move(sync);
  }

 private:
  // One of the max_streams_ slots the streaming calls share, held for the call's life; empty
  // (false) when they are all taken.
  class StreamSlot {
   public:
    StreamSlot(std::atomic<int>& open, int max) : open_(open), held_(++open <= max) {
      if (!held_) --open_;
    }
    ~StreamSlot() {
      if (held_) --open_;
    }
    StreamSlot(const StreamSlot&) = delete;
    StreamSlot& operator=(const StreamSlot&) = delete;
    explicit operator bool() const { return held_; }

   private:
    std::atomic<int>& open_;
    const bool held_;
  };
  grpc::Status TooManyStreams(const std::string& what) const {
    return grpc::Status(grpc::RESOURCE_EXHAUSTED,
                        "too many " + what + " (" + std::to_string(max_streams_) + "); try later");
  }

  // Authorization for one call: UNAUTHENTICATED without a known token, PERMISSION_DENIED for a
  // viewer calling a mutating RPC.
  StatusOr<Caller> CallerOf(ServerContext* ctx) {
    auto md = ctx->client_metadata();
    auto it = md.find("authorization");
    std::string_view value = it == md.end()
                                 ? std::string_view()
                                 : std::string_view(it->second.data(), it->second.size());
    return AuthenticateBearer(*tokens_, value);
  }

  grpc::Status Authorize(ServerContext* ctx, bool mutating) {
    if (!tokens_) return grpc::Status::OK;
    StatusOr<Caller> caller = CallerOf(ctx);
    if (!caller.ok()) return ToGrpc(caller.status());
    if (mutating && caller->role != Role::kOperator) {
      return grpc::Status(grpc::PERMISSION_DENIED,
                          caller->name + " is a " +
                              (caller->role == Role::kProxy ? "proxy" : "viewer") +
                              "; this call needs the operator role");
    }
    return grpc::Status::OK;
  }

  // Who made a call: the token's name, else the peer.
  std::string Actor(ServerContext* ctx) {
    if (tokens_) {
      auto md = ctx->client_metadata();
      auto it = md.find("authorization");
      if (it != md.end()) {
        auto c =
            AuthenticateBearer(*tokens_, std::string_view(it->second.data(), it->second.size()));
        if (c.ok()) return c->name;
      }
    }
    std::string peer = ctx->peer();
    return peer.rfind("unix:", 0) == 0 ? "local" : peer;
  }

  // Runs `fn` on the reconciler's thread and waits for it (RunOnIo: a call still queued after
  // command_timeout_ is cancelled and never runs, so a client may retry it).
  // REQUIRES: `fn` captures by value; it may run after the handler has returned. `this` is
  // safe: the io_context stops before the API is destroyed.
  template <typename F>
  auto OnIo(F fn) -> decltype(fn()) {
    using R = decltype(fn());
    using T = typename std::decay_t<decltype(std::declval<R>().value())>;
    return RunOnIo<T>(io_, std::function<R()>(std::move(fn)), command_timeout_,
                      [this] { return stopping_.load(); });
  }
  grpc::Status Command(std::function<Status()> fn) {
    auto r = OnIo([fn = std::move(fn)]() -> StatusOr<bool> {
      RETURN_IF_ERROR(fn());
      return true;
    });
    return ToGrpc(r.status());
  }

  Status WithReader(const std::function<Status(StateReader&)>& fn) {
    // Any free reader; else wait for the first.
    for (auto& r : readers_) {
      std::unique_lock lock(*r.mu, std::try_to_lock);
      if (lock.owns_lock()) return fn(*r.reader);
    }
    std::lock_guard lock(*readers_[next_++ % readers_.size()].mu);
    return fn(*readers_[(next_ - 1) % readers_.size()].reader);
  }

  struct ReaderSlot {
    std::unique_ptr<StateReader> reader;
    std::unique_ptr<std::mutex> mu;  // guards reader
  };

  boost::asio::io_context& io_;
  Reconciler& reconciler_;
  const Clock& clock_;
  EndpointsHub* hub_;  // null: no stable addresses
  std::vector<ReaderSlot> readers_;
  std::atomic<size_t> next_{0};
  std::optional<std::map<std::string, Caller>> tokens_;
  const int max_streams_;
  const Duration command_timeout_;
  std::atomic<int> streams_{0};
  std::atomic<bool> stopping_{false};
  std::function<void(ManifestSet&)> manifest_rules_;
  std::filesystem::path log_dir_;                  // STATE/logs; empty: StreamLogs is UNIMPLEMENTED
  std::function<git::SourceStatus()> git_status_;  // set before the server starts
  std::function<std::vector<DockerHostStatus>()> docker_hosts_;  // set before the server starts
  std::function<int64_t()> sync_;
};

// Counts every call by method and final status code.
class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(grpc::experimental::ServerRpcInfo* info, Metrics* metrics)
      : method_(info->method()), metrics_(metrics) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const auto code = static_cast<StatusCode>(methods->GetSendStatus().error_code());
      metrics_->Add("kiln_grpc_requests_total",
                    {{"method", method_}, {"code", std::string(StatusCodeName(code))}});
    }
    methods->Proceed();
  }

 private:
  std::string method_;
  Metrics* metrics_;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(Metrics* m) : metrics_(m) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(info, metrics_);
  }

 private:
  Metrics* metrics_;
};

struct ApiServer::Impl {
  std::unique_ptr<KilnApi> api;
  std::unique_ptr<grpc::Server> server;
  int tcp_port = 0;
};

ApiServer::ApiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ApiServer::~ApiServer() { Shutdown(); }

int ApiServer::tcp_port() const { return impl_->tcp_port; }

void ApiServer::Shutdown() {
  if (!impl_->server) return;
  impl_->api->Stop();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server.reset();
}

Status ApiServer::CheckOptions(const Options& o) {
  const bool tls = !o.tls_cert.empty() || !o.tls_key.empty();
  if (tls && (o.tls_cert.empty() || o.tls_key.empty())) {
    return InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!o.client_ca.empty() && !tls)
    return InvalidArgumentError("--client-ca needs --tls-cert and --tls-key");
  if (!o.tcp_listen.empty()) {
    size_t colon = o.tcp_listen.rfind(':');
    if (colon == std::string::npos) {
      return InvalidArgumentError("--grpc-listen: expected HOST:PORT, got \"" + o.tcp_listen +
                                  "\"");
    }
    std::string host = o.tcp_listen.substr(0, colon);
    if (!IsLoopback(host) && !(tls && o.tokens)) {
      return FailedPreconditionError(
          "refusing to serve the API on " + o.tcp_listen +
          " without TLS and tokens: anyone who can reach it could roll back your services. "
          "Give --tls-cert, --tls-key and --tokens, or listen on 127.0.0.1");
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<ApiServer>> ApiServer::Start(const Options& o, boost::asio::io_context& io,
                                                      Reconciler& reconciler,
                                                      const ReaderFactory& open_reader) {
  RETURN_IF_ERROR(CheckOptions(o));
  const bool tls = !o.tls_cert.empty() || !o.tls_key.empty();

  std::vector<std::unique_ptr<StateReader>> readers;
  for (int i = 0; i < std::max(1, o.readers); ++i) {
    ASSIGN_OR_RETURN(auto r, open_reader());
    readers.push_back(std::move(r));
  }
  auto impl = std::make_unique<Impl>();
  impl->api = std::make_unique<KilnApi>(io, reconciler, std::move(readers), o.tokens, o.max_streams,
                                        o.command_timeout, o.clock ? *o.clock : RealClockInstance(),
                                        o.endpoints);
  impl->api->SetManifestRules(o.manifest_rules);
  impl->api->SetLogDir(o.log_dir);
  if (o.git_status) impl->api->SetGitSource(o.git_status, o.sync);
  if (o.docker_hosts) impl->api->SetDockerHosts(o.docker_hosts);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(o.max_message_bytes);
  builder.SetMaxSendMessageSize(o.max_message_bytes);
  // Bounded connections (gRPC 1.51 has no cap on their number): a connection must finish its
  // handshake (TLS and the HTTP/2 preface) quickly, and one that carries no call for
  // idle_timeout is closed. Calls run on at most max_threads threads, so a flood of them queues
  // rather than spawning a thread each.
  builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
                             static_cast<int>(o.handshake_timeout.count()));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             static_cast<int>(o.idle_timeout.count()));
  grpc::ResourceQuota quota("kilnd");
  quota.SetMaxThreads(o.max_threads);
  builder.SetResourceQuota(quota);
  if (!o.unix_socket.empty()) {
    ::unlink(o.unix_socket.c_str());  // a stale socket of an earlier kilnd
    builder.AddListeningPort("unix:" + o.unix_socket, grpc::InsecureServerCredentials());
  }
  if (!o.tcp_listen.empty()) {
    std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
    if (tls) {
      grpc::SslServerCredentialsOptions ssl;
      ssl.pem_key_cert_pairs.push_back({ReadFileOrEmpty(o.tls_key), ReadFileOrEmpty(o.tls_cert)});
      if (ssl.pem_key_cert_pairs[0].private_key.empty() ||
          ssl.pem_key_cert_pairs[0].cert_chain.empty()) {
        return InvalidArgumentError("cannot read --tls-cert " + o.tls_cert + " or --tls-key " +
                                    o.tls_key);
      }
      if (!o.client_ca.empty()) {
        ssl.pem_root_certs = ReadFileOrEmpty(o.client_ca);
        if (ssl.pem_root_certs.empty())
          return InvalidArgumentError("cannot read --client-ca " + o.client_ca);
        ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
      }
      creds = grpc::SslServerCredentials(ssl);
    }
    builder.AddListeningPort(o.tcp_listen, creds, &impl->tcp_port);
  }
  builder.RegisterService(impl->api.get());
  if (o.metrics) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
    creators.push_back(std::make_unique<MetricsInterceptorFactory>(o.metrics));
    builder.experimental().SetInterceptorCreators(std::move(creators));
  }
  impl->server = builder.BuildAndStart();
  if (!impl->server) {
    return UnavailableError("cannot start the gRPC server on " +
                            (o.tcp_listen.empty() ? "unix:" + o.unix_socket : o.tcp_listen) +
                            " (address in use?)");
  }
  if (!o.tcp_listen.empty() && impl->tcp_port == 0) {
    return UnavailableError("cannot listen on " + o.tcp_listen);
  }
  if (!o.unix_socket.empty()) ::chmod(o.unix_socket.c_str(), 0660);
  LogInfo("gRPC API listening", {{"unix", o.unix_socket},
                                 {"tcp", o.tcp_listen},
                                 {"tcp_port", impl->tcp_port},
                                 {"tls", tls},
                                 {"mtls", !o.client_ca.empty()},
                                 {"tokens", o.tokens.has_value()}});
  return std::unique_ptr<ApiServer>(new ApiServer(std::move(impl)));
}

}  // namespace kiln
