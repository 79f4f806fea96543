// canary: `canary` instances of the new revision first; once they are available, wait for
// `kilnctl promote` (or promote at once with auto_promote), then go on as rolling.

#include <algorithm>
#include <string>

#include "controller/plan_strategy.h"

namespace kiln::plan_internal {

bool PlanCanary(const PlanInput& in, const Sorted& s, PlanOutput& out) {
  const int canaries = std::min(std::max(1, in.policy.canary), s.replicas);
  if (s.new_total < canaries) {
    out.create = canaries - s.new_total;
    out.summary = "canary: starting " + std::to_string(out.create) + " canary instance(s)";
    return true;
  }
  if (s.new_available < canaries) {
    out.summary = "canary: waiting for " + std::to_string(canaries) + " canary instance(s)";
    return true;
  }
  if (!in.policy.auto_promote) {
    out.waiting_promotion = true;
    out.summary = "canary: canaries available; waiting for promotion";
    return true;
  }
  out.promote_now = true;
  return false;
}

}  // namespace kiln::plan_internal
