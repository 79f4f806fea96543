#include "controller/rollout_plan.h"

#include <algorithm>

#include "controller/plan_strategy.h"

namespace kiln {

using plan_internal::Sorted;

PlanOutput PlanStep(const PlanInput& in) {
  PlanOutput out;
  Sorted s;
  s.replicas = std::max(0, in.replicas);
  for (const PlanInstance& i : in.instances) {
    if (i.state == InstanceState::kDraining) {
      s.old_draining |= !i.is_target;
      continue;
    }
    if (!IsLive(i.state)) continue;
    (i.is_target && !i.replace ? s.newer : s.older).push_back(&i);
    out.template_rollout |= !i.is_target;
  }
  // Least useful first: not serving (not healthy) before healthy but not yet available, before
  // available; then the oldest.
  auto usefulness = [](const PlanInstance* i) {
    return i->available ? 2 : i->state == InstanceState::kHealthy ? 1 : 0;
  };
  auto least_useful_first = [&](const PlanInstance* a, const PlanInstance* b) {
    if (usefulness(a) != usefulness(b)) return usefulness(a) < usefulness(b);
    return a->created_ms < b->created_ms;
  };
  std::sort(s.older.begin(), s.older.end(), least_useful_first);

  // More new instances than wanted (scaled down): drop the unavailable, then the newest.
  if (static_cast<int>(s.newer.size()) > s.replicas) {
    std::sort(s.newer.begin(), s.newer.end(), [](const PlanInstance* a, const PlanInstance* b) {
      if (a->available != b->available) return !a->available;
      return a->created_ms > b->created_ms;
    });
    while (static_cast<int>(s.newer.size()) > s.replicas) {
      out.destroy.push_back(s.newer.front()->name);
      s.newer.erase(s.newer.begin());
    }
  }
  auto count_available = [](const std::vector<const PlanInstance*>& v) {
    return static_cast<int>(
        std::count_if(v.begin(), v.end(), [](auto* i) { return i->available; }));
  };
  s.new_total = static_cast<int>(s.newer.size());
  s.old_total = static_cast<int>(s.older.size());
  s.new_available = count_available(s.newer);
  s.old_available = count_available(s.older);
  out.new_total = s.new_total;
  out.new_available = s.new_available;
  out.old_total = s.old_total;
  out.old_available = s.old_available;

  if (in.paused && out.template_rollout) {
    out.summary = "paused";
    return out;
  }
  // The strategy governs a change of template; replacing drifted instances and scaling are
  // always rolling, with at least one instance of surge.
  const Strategy strategy = out.template_rollout ? in.policy.strategy : Strategy::kRolling;
  switch (strategy) {
    case Strategy::kRecreate:
      plan_internal::PlanRecreate(in, s, out);
      return out;
    case Strategy::kBlueGreen:
      plan_internal::PlanBlueGreen(in, s, out);
      return out;
    case Strategy::kCanary:
      if (!in.promoted && plan_internal::PlanCanary(in, s, out)) return out;
      break;  // accepted: on as rolling
    case Strategy::kRolling:
      break;
  }
  plan_internal::PlanRolling(in, s, out);
  if (!out.template_rollout && out.create == 0 && out.destroy.empty() &&
      s.new_available == s.replicas) {
    // Nothing to replace, scale or wait for: say so, not the rolling mechanics it would use.
    out.summary = "up to date: " + std::to_string(s.new_available) + " of " +
                  std::to_string(s.replicas) + " available";
  }
  return out;
}

namespace plan_internal {

void DestroyAllOlder(const Sorted& s, PlanOutput& out) {
  for (const PlanInstance* o : s.older) out.destroy.push_back(o->name);
}

}  // namespace plan_internal
}  // namespace kiln
