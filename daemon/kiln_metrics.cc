#include "daemon/kiln_metrics.h"

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/logging.h"
#include "controller/endpoints_hub.h"
#include "kiln/version.h"
#include "spec/manifest.h"
#include "spec/template.h"
#include "storage/state_store.h"

namespace kiln {

void DeclareKilnMetrics(Metrics& m) {
  const std::vector<double> seconds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,   0.25,   0.5,   1,    2.5};
  m.Declare("kiln_build_info", "gauge", "Build of this kilnd (always 1).");
  m.Set("kiln_build_info", {{"version", kVersion}}, 1);
  m.Declare("kiln_reconcile_passes_total", "counter", "Reconcile passes by result (ok or error).");
  m.Declare("kiln_reconcile_duration_seconds", "histogram",
            "Duration of one reconcile pass of one service.", seconds);
  m.Declare("kiln_workqueue_depth", "gauge", "Services waiting for a pass.");
  m.Declare("kiln_workqueue_retries_total", "counter",
            "Passes requeued with backoff after an error.");
  m.Declare("kiln_instances", "gauge",
            "Instances by service, revision and state (final ones still retained included).");
  m.Declare("kiln_docker_host_up", "gauge",
            "1 while a Docker host's engine answers, 0 while it is down or not configured.");
  m.Declare("kiln_docker_host_instances", "gauge",
            "Containers kiln tracks on a Docker host, by host and service.");
  m.Declare("kiln_workqueue_wait_seconds", "histogram",
            "How long a service waited in the work queue before its pass.", seconds);
  m.Declare("kiln_rollouts_started_total", "counter", "Rollouts started, by service.");
  m.Declare("kiln_rollouts_total", "counter",
            "Rollouts that ended, by service and result (completed, failed).");
  m.Declare("kiln_rollbacks_total", "counter",
            "Rollbacks by service and trigger (manual, automatic).");
  m.Declare("kiln_manifest_errors_total", "counter", "Manifest errors found by loads.");
  m.Declare("kiln_manifest_errors", "gauge",
            "Errors in the manifests as last loaded (their services keep their last good state).");
  m.Declare("kiln_store_writable", "gauge",
            "Whether the state store took its last write and start-up recovery is recorded (1), "
            "or not (0: kilnd acts on nothing it cannot record).");
  m.Declare("kiln_probes_total", "counter",
            "Health probe results by service and result (ok, failed), and instances not healthy "
            "within healthy_deadline (result deadline).");
  m.Declare("kiln_instance_starts_total", "counter", "Instances the driver started, by service.");
  m.Declare("kiln_instance_start_failures_total", "counter",
            "Instance starts that failed, by service and reason (permanent: retrying cannot "
            "help, such as a missing executable; transient: anything else).");
  m.Declare("kiln_service_desired_replicas", "gauge", "Replicas the service declares.");
  m.Declare("kiln_service_available_replicas", "gauge",
            "Instances of the service's target revision that are available (healthy for "
            "min_healthy_time).");
  m.Declare("kiln_service_live_instances", "gauge",
            "Live instances of the service by state (pending, starting, healthy, unhealthy, "
            "draining).");
  m.Declare("kiln_service_paused", "gauge", "Whether the service's rollouts are paused (1).");
  m.Declare("kiln_service_pinned", "gauge",
            "Whether the service is pinned to a revision by a rollback (1); the revision and who "
            "pinned it are labels of kiln_service_info.");
  m.Declare("kiln_service_info", "gauge",
            "The service's revisions (always 1): desired (what the manifest declares), pinned "
            "(0 = none), target (what runs), version, pinned_by (manual, automatic or empty).");
  m.Declare(
      "kiln_service_rollout_state", "gauge",
      "The state of the service's latest rollout: 1 for the current state, 0 for the others.");
  m.Declare("kiln_service_rollout_seconds_since_progress", "gauge",
            "Seconds since the service's active rollout last made progress (paused time "
            "excluded); 0 when no rollout is active.");
  m.Declare("kiln_service_condition", "gauge",
            "The service's conditions (Available, Progressing, Degraded): 1 when true.");
  m.Declare("kiln_git_fetches_total", "counter",
            "Fetches of the --manifests git+ branch, by result (ok, error).");
  m.Declare("kiln_git_fetch_failing", "gauge",
            "1 while the last fetch of the --manifests git+ branch failed (the last good state "
            "runs).");
  m.Declare("kiln_probe_failures_total", "counter",
            "Failed health probes, by service (each failing probe, also below the threshold).");
  m.Declare("kiln_probe_local_errors_total", "counter",
            "Health probes kilnd could not run for a reason of its own (descriptors, memory); no "
            "instance is blamed.");
  m.Declare("kiln_instance_failures_total", "counter",
            "Instances that failed, by service and how (exited, start_failed, deadline, unhealthy, "
            "failed).");
  m.Declare("kiln_service_crash_loop_failures", "gauge",
            "Failures in a row of a service's instances (0 when it runs well).");
  m.Declare("kiln_service_start_backoff_seconds", "gauge",
            "Seconds until a crash-looping service may start its next instance.");
  m.Declare("kiln_artifact_verifications_total", "counter",
            "Periodic artifact verifications, by result (ok, mismatch, missing).");
  m.Declare("kiln_artifact_drift_total", "counter",
            "Artifacts found with bytes that no longer match their digest.");
  m.Declare("kiln_driver_errors_total", "counter", "Instance starts the driver refused.");
  m.Declare("kiln_grpc_requests_total", "counter", "gRPC requests by method and status code.");
  m.Declare("kiln_store_commit_duration_seconds", "histogram",
            "Duration of state store write transactions.", seconds);
  m.Declare("kiln_proxy_process_up", "gauge",
            "Whether the kiln-proxy kilnd manages runs (1) or not (0; only with --proxy managed).");
  m.Declare("kiln_proxy_process_restarts", "gauge",
            "Times this kilnd restarted kiln-proxy after it exited or failed to start.");
  m.Declare("kiln_proxies", "gauge", "Proxies that reported within the last 3 report intervals.");
  m.Declare("kiln_proxy_listening", "gauge",
            "Whether the proxies listen on a service's stable address (1), or cannot bind it (0).");
  m.Declare("kiln_proxy_connections_active", "gauge",
            "Connections open through the proxies, by service and revision.");
  m.Declare("kiln_proxy_connections_total", "counter",
            "Connections the proxies made to instances, by service and revision.");
  m.Declare("kiln_proxy_connect_failures_total", "counter",
            "Connects to instances that failed (refused, unreachable, timed out); the client was "
            "sent to another instance when one was left.");
  m.Declare("kiln_proxy_rejected_connections_total", "counter",
            "Client connections closed because no instance of the service took them.");
  m.Declare("kiln_proxy_bytes_total", "counter",
            "Bytes the proxies moved, by service, revision and direction (in: client to "
            "instance, out: instance to client).");
  m.Declare("kiln_pool_endpoints", "gauge",
            "Each started instance of an exposed service by pool state (ready, not_ready, "
            "draining); 1 per instance.");
}

void CountEvent(Metrics& m, const EventRecord& e) {
  const std::string& svc = e.service;
  switch (e.kind) {
    case EventKind::kRolloutStarted:
      m.Add("kiln_rollouts_started_total", {{"service", svc}});
      // The service's outcome counters exist from 0 before the first outcome, so that
      // increase() and rate() see that first one.
      for (const char* result : {"completed", "failed"}) {
        m.Add("kiln_rollouts_total", {{"service", svc}, {"result", result}}, 0);
      }
      for (const char* trigger : {"manual", "automatic"}) {
        m.Add("kiln_rollbacks_total", {{"service", svc}, {"trigger", trigger}}, 0);
      }
      break;
    case EventKind::kRolloutCompleted:
      m.Add("kiln_rollouts_total", {{"service", svc}, {"result", "completed"}});
      break;
    case EventKind::kRolloutFailed:
      m.Add("kiln_rollouts_total", {{"service", svc}, {"result", "failed"}});
      break;
    case EventKind::kRolledBack:
      m.Add("kiln_rollbacks_total",
            {{"service", svc}, {"trigger", e.actor == "auto" ? "automatic" : "manual"}});
      break;
    case EventKind::kInstanceStarted:
      m.Add("kiln_instance_starts_total", {{"service", svc}});
      break;
    case EventKind::kInstanceStartFailed: {
      const bool permanent = e.message.find("retrying cannot help") != std::string::npos;
      m.Add("kiln_instance_start_failures_total",
            {{"service", svc}, {"reason", permanent ? "permanent" : "transient"}});
      m.Add("kiln_driver_errors_total", {{"service", svc}});
      m.Add("kiln_instance_failures_total", {{"service", svc}, {"how", "start_failed"}});
      break;
    }
    case EventKind::kInstanceExited:
      m.Add("kiln_instance_failures_total", {{"service", svc}, {"how", "exited"}});
      break;
    case EventKind::kInstanceFailed: {
      const bool deadline =
          e.message.find("not healthy within healthy_deadline") != std::string::npos;
      m.Add("kiln_instance_failures_total",
            {{"service", svc}, {"how", deadline ? "deadline" : "failed"}});
      if (deadline) m.Add("kiln_probes_total", {{"service", svc}, {"result", "deadline"}});
      break;
    }
    case EventKind::kInstanceUnhealthy:
      m.Add("kiln_instance_failures_total", {{"service", svc}, {"how", "unhealthy"}});
      break;
    case EventKind::kArtifactDrift:
      m.Add("kiln_artifact_drift_total");
      break;
    default:
      break;
  }
}

std::map<std::string, Series> ServiceMetrics(StateReader& reader, int64_t now_ms) {
  std::map<std::string, Series> out;
  auto add = [&out](const char* name, Labels labels, double v) {
    out[name].push_back({std::move(labels), v});
  };
  // Every family present even with no service, so a scrape always shows what exists.
  for (const char* name :
       {"kiln_service_desired_replicas", "kiln_service_available_replicas",
        "kiln_service_live_instances", "kiln_service_paused", "kiln_service_pinned",
        "kiln_service_info", "kiln_service_rollout_state",
        "kiln_service_rollout_seconds_since_progress", "kiln_service_condition"}) {
    out[name];
  }
  const Status read = reader.Snapshot([&]() -> Status {
    ASSIGN_OR_RETURN(std::vector<ServiceRecord> services, reader.ListServices());
    for (const ServiceRecord& s : services) {
      if (s.retired) continue;
      const Labels svc = {{"service", s.name}};
      StatusOr<ServiceSpec> spec = ServiceSpecFromJson(s.spec);
      const int64_t min_healthy = spec.ok() ? spec->update.min_healthy_time.count() : 0;
      add("kiln_service_desired_replicas", svc, spec.ok() ? spec->replicas : 0);
      const int64_t target = s.pinned_revision > 0 ? s.pinned_revision : s.desired_revision;
      std::string version;
      std::string target_hash;
      if (auto rev = reader.GetRevision(s.name, target); rev.ok()) {
        if (auto t = Template::FromCanonical(rev->template_json); t.ok()) version = t->version;
        target_hash = rev->template_hash;
      }
      std::map<int64_t, std::string> hashes = {{target, target_hash}};
      ASSIGN_OR_RETURN(std::vector<InstanceRecord> live, reader.ListInstances(s.name, false));
      std::map<std::string, int> by_state;
      for (const auto& [state, name] : kInstanceStateNames) {
        if (IsLive(state)) by_state[std::string(name)] = 0;
      }
      int available = 0;
      for (const InstanceRecord& i : live) {
        ++by_state[std::string(InstanceStateName(i.state))];
        if (!hashes.count(i.revision)) {
          auto rev = reader.GetRevision(s.name, i.revision);
          hashes[i.revision] = rev.ok() ? rev->template_hash : "";
        }
        if (IsAvailable(i, now_ms, min_healthy) && hashes[i.revision] == target_hash) ++available;
      }
      add("kiln_service_available_replicas", svc, available);
      for (const auto& [state, n] : by_state) {
        add("kiln_service_live_instances", {{"service", s.name}, {"state", state}}, n);
      }
      add("kiln_service_paused", svc, s.paused ? 1 : 0);
      add("kiln_service_pinned", svc, s.pinned_revision > 0 ? 1 : 0);
      std::string pinned_by;
      if (s.pinned_revision > 0) {
        auto pinned = reader.GetRevision(s.name, s.pinned_revision);
        pinned_by = pinned.ok() && pinned->actor == "auto" ? "automatic" : "manual";
      }
      add("kiln_service_info",
          {{"service", s.name},
           {"desired_revision", std::to_string(s.desired_revision)},
           {"pinned_revision", std::to_string(s.pinned_revision)},
           {"target_revision", std::to_string(target)},
           {"version", version},
           {"pinned_by", pinned_by}},
          1);
      auto rollout = reader.GetLatestRollout(s.name);
      if (rollout.ok()) {
        for (const auto& [state, name] : kRolloutStateNames) {
          add("kiln_service_rollout_state", {{"service", s.name}, {"state", std::string(name)}},
              rollout->state == state ? 1 : 0);
        }
      }
      double since = 0;
      if (rollout.ok() && IsActive(rollout->state)) {
        const int64_t paused_now = rollout->paused_at_ms > 0 ? now_ms - rollout->paused_at_ms : 0;
        const int64_t last = std::max(rollout->last_progress_ms, rollout->started_ms);
        since = std::max<int64_t>(0, now_ms - last - paused_now) / 1000.0;
      }
      add("kiln_service_rollout_seconds_since_progress", svc, since);
      for (const auto& [type, name] : kConditionTypeNames) {
        const Condition* c = FindCondition(s.conditions, type);
        add("kiln_service_condition", {{"service", s.name}, {"condition", std::string(name)}},
            c != nullptr && c->status ? 1 : 0);
      }
    }
    return Status::Ok();
  });
  if (!read.ok()) {
    LogWarn("cannot read services for /metrics", {{"error", read.ToString()}});
  }
  return out;
}

void CollectProxyMetrics(Metrics& m, const EndpointsHub& hub) {
  using Series = std::vector<std::pair<Labels, double>>;
  auto by_revision = [&hub](auto value) {
    std::map<std::pair<std::string, int64_t>, double> sums;
    for (const ProxyReportData& r : hub.LiveReports()) {
      for (const ProxyRouteReport& route : r.routes) {
        for (const ProxyEndpointReport& e : route.endpoints) {
          sums[{route.service, e.revision}] += value(e);
        }
      }
    }
    Series out;
    for (const auto& [key, v] : sums) {
      out.push_back({{{"service", key.first}, {"revision", std::to_string(key.second)}}, v});
    }
    return out;
  };
  m.SetCollector("kiln_proxies", [&hub] {
    return Series{{{}, static_cast<double>(hub.LiveReports().size())}};
  });
  m.SetCollector("kiln_proxy_listening", [&hub] {
    std::map<std::string, bool> listening;
    for (const ProxyReportData& r : hub.LiveReports()) {
      for (const ProxyRouteReport& route : r.routes) {
        auto [it, fresh] = listening.emplace(route.service, true);
        it->second = it->second && route.bound_port > 0;
      }
    }
    Series out;
    for (const auto& [service, up] : listening)
      out.push_back({{{"service", service}}, up ? 1.0 : 0.0});
    return out;
  });
  m.SetCollector("kiln_proxy_connections_active", [by_revision] {
    return by_revision(
        [](const ProxyEndpointReport& e) { return static_cast<double>(e.open_connections); });
  });
  // Counters from the hub's totals, which only grow (a drained endpoint, a restarted or gone
  // proxy keeps what it counted), never from the live reports' sums.
  auto totals = [&hub](auto field) {
    Series out;
    for (const auto& [key, t] : hub.Totals().by_revision) {
      out.push_back({{{"service", key.first}, {"revision", std::to_string(key.second)}},
                     static_cast<double>(t.*field)});
    }
    return out;
  };
  m.SetCollector("kiln_proxy_connections_total",
                 [totals] { return totals(&EndpointsHub::TrafficCounts::connections); });
  m.SetCollector("kiln_proxy_connect_failures_total",
                 [totals] { return totals(&EndpointsHub::TrafficCounts::connect_failures); });
  m.SetCollector("kiln_proxy_rejected_connections_total", [&hub] {
    // Every exposed service has a series, 0 until a client is rejected.
    std::map<std::string, double> rejected;
    for (const ServicePool& pool : hub.Current().services) rejected[pool.service] = 0;
    for (const auto& [service, v] : hub.Totals().rejected_by_service) {
      rejected[service] = static_cast<double>(v);
    }
    Series out;
    for (const auto& [service, v] : rejected) out.push_back({{{"service", service}}, v});
    return out;
  });
  m.SetCollector("kiln_proxy_bytes_total", [totals] {
    Series out;
    for (auto [direction, field] : {std::pair{"in", &EndpointsHub::TrafficCounts::bytes_in},
                                    {"out", &EndpointsHub::TrafficCounts::bytes_out}}) {
      for (auto& [labels, v] : totals(field)) {
        labels.push_back({"direction", direction});
        out.push_back({labels, v});
      }
    }
    return out;
  });
  m.SetCollector("kiln_pool_endpoints", [&hub] {
    Series out;
    for (const ServicePool& pool : hub.Current().services) {
      for (const PoolEndpoint& e : pool.endpoints) {
        const char* state = e.state == PoolState::kReady      ? "ready"
                            : e.state == PoolState::kDraining ? "draining"
                                                              : "not_ready";
        out.push_back({{{"service", pool.service},
                        {"revision", std::to_string(e.revision)},
                        {"instance", e.instance},
                        {"state", state}},
                       1});
      }
    }
    return out;
  });
}

}  // namespace kiln
