// blue-green: a full set of the new revision starts beside the old; once all of it is available,
// the old set goes at once.

#include <algorithm>
#include <string>

#include "controller/plan_strategy.h"

namespace kiln::plan_internal {

void PlanBlueGreen(const PlanInput& /*in*/, const Sorted& s, PlanOutput& out) {
  out.create = std::max(0, s.replicas - s.new_total);
  if (s.new_available >= s.replicas) {
    DestroyAllOlder(s, out);
    out.summary = "blue-green: new set available; stopping the old set";
  } else {
    out.summary = "blue-green: " + std::to_string(s.new_available) + " of " +
                  std::to_string(s.replicas) + " new instances available";
  }
}

}  // namespace kiln::plan_internal
