#pragma once

#include "common/metrics.h"

namespace kiln {

class EndpointsHub;

// kilnd's metrics, declared with their help texts (names and units per the Prometheus conventions).
void DeclareKilnMetrics(Metrics& m);

// The data plane's metrics, computed when scraped from the pools kilnd publishes and the last
// report of every live proxy (summed over proxies): connections, failures and bytes by service
// and revision, listeners, and each instance's pool state.
void CollectProxyMetrics(Metrics& m, const EndpointsHub& hub);

}  // namespace kiln
