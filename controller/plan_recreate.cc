// recreate: every old instance is stopped, and gone, before the first new one starts.

#include <algorithm>
#include <string>

#include "controller/plan_strategy.h"

namespace kiln::plan_internal {

void PlanRecreate(const PlanInput& /*in*/, const Sorted& s, PlanOutput& out) {
  if (s.old_total > 0) {
    DestroyAllOlder(s, out);
    out.summary = "recreate: stopping " + std::to_string(s.old_total) + " old instance(s) first";
    return;
  }
  if (s.old_draining) {
    out.summary = "recreate: waiting for old instances to stop";
    return;
  }
  out.create = std::max(0, s.replicas - s.new_total);
  out.summary = "recreate: starting " + std::to_string(out.create) + " new instance(s)";
}

}  // namespace kiln::plan_internal
