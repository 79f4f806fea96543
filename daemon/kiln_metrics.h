#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "common/metrics.h"

namespace kiln {

class EndpointsHub;
class StateReader;
struct EventRecord;

// kilnd's metrics, declared with their help texts (names and units per the Prometheus conventions).
void DeclareKilnMetrics(Metrics& m);

// Counts what an event says happened (rollouts, rollbacks, instance starts and failures).
void CountEvent(Metrics& m, const EventRecord& e);

// Per-service gauges (replicas, availability, pause, pin, rollout, conditions), computed when
// scraped from one read snapshot of `reader` at `now_ms`. Retired services are left out.
std::map<std::string, Series> ServiceMetrics(StateReader& reader, int64_t now_ms);

// The data plane's metrics, computed when scraped from the pools kilnd publishes and the last
// report of every live proxy (summed over proxies): connections, failures and bytes by service
// and revision, listeners, and each instance's pool state.
void CollectProxyMetrics(Metrics& m, const EndpointsHub& hub);

}  // namespace kiln
