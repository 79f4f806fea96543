// rolling: new instances replace old ones within max_surge above and max_unavailable below
// `replicas` (Kubernetes' maxSurge / maxUnavailable). Also what scaling and replacing drifted
// instances use, whatever the strategy.

#include <algorithm>
#include <string>

#include "controller/plan_strategy.h"

namespace kiln::plan_internal {

void PlanRolling(const PlanInput& in, const Sorted& s, PlanOutput& out) {
  const int replicas = s.replicas;
  int surge = in.policy.max_surge.Resolve(replicas, /*round_up=*/true);
  int unavailable = in.policy.max_unavailable.Resolve(replicas, /*round_up=*/false);
  if (!out.template_rollout) surge = std::max(surge, 1);
  if (surge == 0 && unavailable == 0) surge = 1;
  out.create =
      std::max(0, std::min(replicas - s.new_total, replicas + surge - (s.new_total + s.old_total)));
  // Old instances that are not healthy serve nothing: they go at once. Healthy ones serve
  // traffic even before they count as available (min_healthy_time), so they go only while enough
  // instances stay available: never fewer than replicas - max_unavailable (Kubernetes bounds
  // this as maxScaledDown). Available implies healthy, so this also keeps that many healthy.
  int spare = s.new_available + s.old_available - (replicas - unavailable);
  for (const PlanInstance* o : s.older) {
    if (o->state != InstanceState::kHealthy) {
      out.destroy.push_back(o->name);
    } else if (spare > 0) {
      out.destroy.push_back(o->name);
      --spare;
    }
  }
  out.summary = "rolling: " + std::to_string(s.new_available) + " of " + std::to_string(replicas) +
                " available on the target, " + std::to_string(s.old_total) + " to replace";
}

}  // namespace kiln::plan_internal
