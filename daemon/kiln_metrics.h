#pragma once

#include "common/metrics.h"

namespace kiln {

// kilnd's metrics, declared with their help texts (names and units per the Prometheus conventions).
void DeclareKilnMetrics(Metrics& m);

}  // namespace kiln
