#include "daemon/kiln_metrics.h"

#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "controller/endpoints_hub.h"
#include "kiln/version.h"

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
  m.Declare("kiln_rollouts_total", "counter",
            "Rollouts that ended, by result (completed, failed).");
  m.Declare("kiln_rollbacks_total", "counter", "Rollbacks by trigger (manual, automatic).");
  m.Declare("kiln_manifest_errors_total", "counter", "Manifest errors found by loads.");
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
            "Instances that failed, by service and how (exited, start_failed, deadline).");
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
    Series out;
    for (const auto& [service, v] : hub.Totals().rejected_by_service) {
      out.push_back({{{"service", service}}, static_cast<double>(v)});
    }
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
