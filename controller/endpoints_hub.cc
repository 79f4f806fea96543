#include "controller/endpoints_hub.h"

#include <algorithm>
#include <utility>

namespace kiln {

PoolState PoolStateOf(const InstanceRecord& inst, const std::vector<InstanceRecord>& live,
                      const std::optional<RolloutRecord>& rollout, int64_t now_ms,
                      int64_t min_healthy_ms) {
  if (inst.state == InstanceState::kDraining) return PoolState::kDraining;
  if (!IsAvailable(inst, now_ms, min_healthy_ms)) return PoolState::kNotReady;
  // Blue-green holds the new set back while the old set serves: the one pass that stops the old
  // set switches the pool.
  if (rollout && IsActive(rollout->state) && rollout->strategy == Strategy::kBlueGreen &&
      inst.revision == rollout->to_revision) {
    const bool old_serves = std::any_of(live.begin(), live.end(), [&](const InstanceRecord& o) {
      return o.revision != rollout->to_revision && IsAvailable(o, now_ms, min_healthy_ms);
    });
    if (old_serves) return PoolState::kNotReady;
  }
  return PoolState::kReady;
}

int64_t NextPoolChangeMs(const std::vector<InstanceRecord>& live, int64_t now_ms,
                         int64_t min_healthy_ms) {
  int64_t next = 0;
  for (const InstanceRecord& i : live) {
    if (i.state != InstanceState::kHealthy) continue;
    const int64_t at = i.healthy_since_ms + min_healthy_ms;
    if (at > now_ms && (next == 0 || at < next)) next = at;
  }
  return next;
}

ServicePool BuildPool(const std::string& service, const ExposeSpec& expose,
                      const std::vector<InstanceRecord>& live,
                      const std::optional<RolloutRecord>& rollout, int64_t now_ms,
                      int64_t min_healthy_ms,
                      const std::function<std::string(int64_t revision)>& version_of) {
  ServicePool pool{.service = service, .expose = expose, .endpoints = {}};
  for (const InstanceRecord& i : live) {
    if (i.port <= 0 || !IsLive(i.state)) continue;  // not started: no address yet
    pool.endpoints.push_back(PoolEndpoint{
        .instance = i.name,
        .revision = i.revision,
        .version = version_of(i.revision),
        .host = i.host.empty() ? "127.0.0.1" : i.host,
        .port = i.port,
        .state = PoolStateOf(i, live, rollout, now_ms, min_healthy_ms),
    });
  }
  return pool;
}

EndpointsHub::EndpointsHub(const Clock& clock, std::string kilnd_id, Duration report_interval)
    : clock_(clock), kilnd_id_(std::move(kilnd_id)), report_interval_(report_interval) {}

void EndpointsHub::Publish(const std::string& service, std::optional<ServicePool> pool) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pools_.find(service);
  if (!pool) {
    if (it == pools_.end()) return;
  } else if (it != pools_.end() && it->second == *pool) {
    return;
  }
  ++version_;
  // Instances ready before and not now left the pool at this version.
  if (it != pools_.end()) {
    for (const PoolEndpoint& e : it->second.endpoints) {
      if (e.state != PoolState::kReady) continue;
      bool still = false;
      if (pool) {
        for (const PoolEndpoint& n : pool->endpoints) {
          still = still || (n.instance == e.instance && n.state == PoolState::kReady);
        }
      }
      if (!still) left_at_[e.instance] = version_;
    }
  }
  if (pool) {
    pools_[service] = *std::move(pool);
  } else {
    pools_.erase(it);
  }
  changed_.notify_all();
}

void EndpointsHub::MarkReady() {
  std::lock_guard<std::mutex> lock(mu_);
  if (ready_) return;
  ready_ = true;
  ++version_;
  changed_.notify_all();
}

bool EndpointsHub::ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_;
}

void EndpointsHub::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
  changed_.notify_all();
}

EndpointsHub::Snapshot EndpointsHub::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot s{.kilnd_id = kilnd_id_, .version = version_, .services = {}};
  s.services.reserve(pools_.size());
  for (const auto& [name, pool] : pools_) s.services.push_back(pool);
  return s;
}

bool EndpointsHub::WaitForChange(const std::string& kilnd_id, uint64_t version,
                                 Duration timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  auto newer = [&] { return ready_ && (kilnd_id != kilnd_id_ || version != version_); };
  changed_.wait_for(lock, timeout, [&] { return stopped_ || newer(); });
  return !stopped_ && newer();
}

void EndpointsHub::Report(ProxyReportData report) {
  std::function<void()> notify;
  {
    std::lock_guard<std::mutex> lock(mu_);
    report.received_ms = ToUnixMillis(clock_.SystemNow());
    std::string name = report.proxy;
    ProxyReportData& last = reports_[name];
    RetireCountsLocked(last, report);
    last = std::move(report);
    notify = on_report_;
  }
  if (notify) notify();
}

void EndpointsHub::SetOnReport(std::function<void()> on_report) {
  std::lock_guard<std::mutex> lock(mu_);
  on_report_ = std::move(on_report);
}

std::vector<const ProxyReportData*> EndpointsHub::LiveLocked(int64_t now) const {
  std::vector<const ProxyReportData*> live;
  const int64_t horizon = 3 * report_interval_.count();
  for (const auto& [name, r] : reports_) {
    if (now - r.received_ms <= horizon) live.push_back(&r);
  }
  return live;
}

void EndpointsHub::RetireCountsLocked(const ProxyReportData& before, const ProxyReportData& after) {
  // A proxy that restarted counts from zero again: all it had counted is retired.
  const bool restarted = before.started_ms != after.started_ms;
  for (const ProxyRouteReport& old_route : before.routes) {
    const ProxyRouteReport* now = nullptr;
    if (!restarted) {
      for (const ProxyRouteReport& r : after.routes) {
        if (r.service == old_route.service) now = &r;
      }
    }
    if (now == nullptr || now->rejected_connections < old_route.rejected_connections) {
      retired_.rejected_by_service[old_route.service] += old_route.rejected_connections;
    }
    for (const ProxyEndpointReport& e : old_route.endpoints) {
      const ProxyEndpointReport* still = nullptr;
      if (now != nullptr) {
        for (const ProxyEndpointReport& n : now->endpoints) {
          if (n.instance == e.instance && n.host == e.host && n.port == e.port) still = &n;
        }
      }
      // Kept, and its counters did not go back: they are still in the proxy's report.
      if (still != nullptr && still->total_connections >= e.total_connections &&
          still->connect_failures >= e.connect_failures && still->bytes_in >= e.bytes_in &&
          still->bytes_out >= e.bytes_out) {
        continue;
      }
      TrafficCounts& t = retired_.by_revision[{old_route.service, e.revision}];
      t.connections += e.total_connections;
      t.connect_failures += e.connect_failures;
      t.bytes_in += e.bytes_in;
      t.bytes_out += e.bytes_out;
    }
  }
}

EndpointsHub::TrafficTotals EndpointsHub::Totals() const {
  std::lock_guard<std::mutex> lock(mu_);
  TrafficTotals out = retired_;
  for (const auto& [name, r] : reports_) {
    for (const ProxyRouteReport& route : r.routes) {
      out.rejected_by_service[route.service] += route.rejected_connections;
      for (const ProxyEndpointReport& e : route.endpoints) {
        TrafficCounts& t = out.by_revision[{route.service, e.revision}];
        t.connections += e.total_connections;
        t.connect_failures += e.connect_failures;
        t.bytes_in += e.bytes_in;
        t.bytes_out += e.bytes_out;
      }
    }
  }
  return out;
}

std::vector<ProxyReportData> EndpointsHub::LiveReports() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ProxyReportData> out;
  for (const ProxyReportData* r : LiveLocked(ToUnixMillis(clock_.SystemNow()))) {
    out.push_back(*r);
  }
  return out;
}

EndpointsHub::DrainStatus EndpointsHub::Drain(const std::string& instance) const {
  std::lock_guard<std::mutex> lock(mu_);
  DrainStatus st;
  bool ready_now = false;
  for (const auto& [name, pool] : pools_) {
    for (const PoolEndpoint& e : pool.endpoints) {
      ready_now = ready_now || (e.instance == instance && e.state == PoolState::kReady);
    }
  }
  auto left = left_at_.find(instance);
  // Never ready in this run: any snapshot of this run has it out of the pool.
  const uint64_t needed = left == left_at_.end() ? 0 : left->second;
  bool all_applied = true;
  for (const ProxyReportData* r : LiveLocked(ToUnixMillis(clock_.SystemNow()))) {
    ++st.proxies;
    all_applied = all_applied && r->kilnd_id == kilnd_id_ && r->version >= needed;
    for (const ProxyRouteReport& route : r->routes) {
      for (const ProxyEndpointReport& e : route.endpoints) {
        if (e.instance == instance) st.open_connections += e.open_connections;
      }
    }
  }
  st.drained = ready_ && !ready_now && st.proxies > 0 && all_applied && st.open_connections == 0;
  return st;
}

void EndpointsHub::Forget(const std::string& instance) {
  std::lock_guard<std::mutex> lock(mu_);
  left_at_.erase(instance);
}

}  // namespace kiln
