#pragma once

// The pools behind services' stable addresses (`expose:`), shared between the reconciler, which
// publishes them, the API, which streams them to proxies (WatchEndpoints) and takes their
// reports (ReportProxy), and the reconciler again, which stops a draining instance only once
// no proxy has a connection open to it.
//
// Which instance is in a pool is decided by PoolStateOf, from the records alone: available
// (healthy for min_healthy_time), not draining, and during a blue-green rollout not of the new
// set while any instance of the old set is available (the switch then happens in the one pass
// that drains the old set: the snapshot after it has only the new set).
//
// Threading: every method may be called from any thread (the reconciler's, gRPC's).

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"
#include "spec/manifest.h"
#include "storage/records.h"

namespace kiln {

enum class PoolState {
  kReady,     // takes new connections
  kNotReady,  // running but not (or not yet) in the pool: starting, unhealthy, held back
  kDraining,  // being stopped: no new connections, open ones finish
};

// The pool state of `inst`, one of `live` (the service's non-final instances).
PoolState PoolStateOf(const InstanceRecord& inst, const std::vector<InstanceRecord>& live,
                      const std::optional<RolloutRecord>& rollout, int64_t now_ms,
                      int64_t min_healthy_ms);

// When the clock alone next changes a pool state (a healthy instance becomes available), or 0.
int64_t NextPoolChangeMs(const std::vector<InstanceRecord>& live, int64_t now_ms,
                         int64_t min_healthy_ms);

struct PoolEndpoint {
  std::string instance;
  int64_t revision = 0;
  std::string version;  // the revision's `version`
  std::string host;
  int port = 0;
  PoolState state = PoolState::kNotReady;
  friend bool operator==(const PoolEndpoint&, const PoolEndpoint&) = default;
};

struct ServicePool {
  std::string service;
  ExposeSpec expose;
  std::vector<PoolEndpoint> endpoints;  // every started live instance, in id order
  friend bool operator==(const ServicePool&, const ServicePool&) = default;
};

// A service's pool from its records: every live instance with an address.
ServicePool BuildPool(const std::string& service, const ExposeSpec& expose,
                      const std::vector<InstanceRecord>& live,
                      const std::optional<RolloutRecord>& rollout, int64_t now_ms,
                      int64_t min_healthy_ms,
                      const std::function<std::string(int64_t revision)>& version_of);

// What one proxy said it does (ProxyReport, without the proto).
struct ProxyEndpointReport {
  enum class State { kActive, kDraining, kEjected };
  std::string instance;
  int64_t revision = 0;
  std::string host;
  int port = 0;
  State state = State::kActive;
  int64_t open_connections = 0;
  uint64_t total_connections = 0;
  uint64_t connect_failures = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
};
struct ProxyRouteReport {
  std::string service;
  std::string listen_host;
  int listen_port = 0;
  int bound_port = 0;
  std::string bind_error;
  uint64_t rejected_connections = 0;
  std::vector<ProxyEndpointReport> endpoints;
};
struct ProxyReportData {
  std::string proxy;
  std::string kilnd_id;
  uint64_t version = 0;
  int64_t started_ms = 0;
  std::vector<ProxyRouteReport> routes;
  int64_t received_ms = 0;  // set by the hub
};

class EndpointsHub {
 public:
  struct Snapshot {
    std::string kilnd_id;
    uint64_t version = 0;
    std::vector<ServicePool> services;  // by name
  };

  // `kilnd_id` names this run of kilnd (versions count up within it). A proxy that has not
  // reported for 3 × `report_interval` no longer counts.
  EndpointsHub(const Clock& clock, std::string kilnd_id, Duration report_interval);

  // The reconciler's side. Publish replaces one service's pool (nullopt: it has no stable
  // address any more); a change makes a new version. Nothing is served before MarkReady: a
  // proxy must never apply a partial view of kilnd's services (it would close listeners).
  void Publish(const std::string& service, std::optional<ServicePool> pool);
  void MarkReady();
  bool ready() const;
  // Wakes every WaitForChange for good (kilnd is stopping).
  void Stop();

  Snapshot Current() const;
  // Waits up to `timeout` for a snapshot other than (kilnd_id, version); true when there is one.
  bool WaitForChange(const std::string& kilnd_id, uint64_t version, Duration timeout) const;
  const std::string& kilnd_id() const { return kilnd_id_; }
  Duration report_interval() const { return report_interval_; }

  // The proxies' side: one report replaces the proxy's last one; `on_report` (set once, before
  // any report) is called after each, on the caller's thread.
  void Report(ProxyReportData report);
  void SetOnReport(std::function<void()> on_report);
  // The last report of every proxy heard from within 3 report intervals.
  std::vector<ProxyReportData> LiveReports() const;

  struct TrafficCounts {
    uint64_t connections = 0;
    uint64_t connect_failures = 0;
    uint64_t bytes_in = 0;
    uint64_t bytes_out = 0;
  };
  struct TrafficTotals {
    std::map<std::pair<std::string, int64_t>, TrafficCounts> by_revision;  // (service, revision)
    std::map<std::string, uint64_t> rejected_by_service;
  };
  // The proxies' counters over this run of kilnd: every proxy heard from, live or not, plus what
  // proxies counted for endpoints and services they have since forgotten or lost in a restart.
  // They only grow, as Prometheus counters must: a drained endpoint leaving a proxy's report does
  // not take its connections out of the total.
  TrafficTotals Totals() const;

  struct DrainStatus {
    bool drained = false;          // no live proxy routes to it or has a connection open to it
    int64_t open_connections = 0;  // summed over the live proxies
    int proxies = 0;               // live proxies
  };
  // For an instance that left its pool. Not drained while no proxy is live (then only the
  // drain timeout stops it), or while a live proxy has not yet applied a snapshot without it.
  DrainStatus Drain(const std::string& instance) const;
  // The instance is gone: forget when it left the pool.
  void Forget(const std::string& instance);

 private:
  std::vector<const ProxyReportData*> LiveLocked(int64_t now) const;
  // Adds to retired_ what `before` counted that `after` (the same proxy's next report) no
  // longer holds: endpoints and routes it forgot, and everything when it restarted.
  void RetireCountsLocked(const ProxyReportData& before, const ProxyReportData& after);

  const Clock& clock_;
  const std::string kilnd_id_;
  const Duration report_interval_;
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  bool ready_ = false;
  bool stopped_ = false;
  uint64_t version_ = 0;
  std::map<std::string, ServicePool> pools_;
  // The version from which each instance that was ready in this run of kilnd no longer is.
  std::map<std::string, uint64_t> left_at_;
  std::map<std::string, ProxyReportData> reports_;
  TrafficTotals retired_;  // counted by proxies, no longer in their reports
  std::function<void()> on_report_;
};

}  // namespace kiln
