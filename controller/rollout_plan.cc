#include "controller/rollout_plan.h"

#include <algorithm>

namespace kiln {

PlanOutput PlanStep(const PlanInput& in) {
  PlanOutput out;
  const int replicas = std::max(0, in.replicas);
  std::vector<const PlanInstance*> newer, older;
  bool old_draining = false;
  for (const PlanInstance& i : in.instances) {
    if (i.state == InstanceState::kDraining) {
      old_draining |= !i.is_target;
      continue;
    }
    if (!IsLive(i.state)) continue;
    (i.is_target && !i.replace ? newer : older).push_back(&i);
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
  std::sort(older.begin(), older.end(), least_useful_first);

  // More new instances than wanted (scaled down): drop the unavailable, then the newest.
  if (static_cast<int>(newer.size()) > replicas) {
    std::sort(newer.begin(), newer.end(), [](const PlanInstance* a, const PlanInstance* b) {
      if (a->available != b->available) return !a->available;
      return a->created_ms > b->created_ms;
    });
    while (static_cast<int>(newer.size()) > replicas) {
      out.destroy.push_back(newer.front()->name);
      newer.erase(newer.begin());
    }
  }
  auto count_available = [](const std::vector<const PlanInstance*>& v) {
    return static_cast<int>(
        std::count_if(v.begin(), v.end(), [](auto* i) { return i->available; }));
  };
  const int new_total = static_cast<int>(newer.size());
  const int old_total = static_cast<int>(older.size());
  const int new_avail = count_available(newer);
  const int old_avail = count_available(older);
  out.new_total = new_total;
  out.new_available = new_avail;
  out.old_total = old_total;
  out.old_available = old_avail;

  auto destroy_all_older = [&] {
    for (auto* o : older) out.destroy.push_back(o->name);
  };

  if (in.paused && out.template_rollout) {
    out.summary = "paused";
    return out;
  }
  // The strategy governs a change of template; replacing drifted instances and scaling are
  // always rolling, with at least one instance of surge.
  Strategy strategy = out.template_rollout ? in.policy.strategy : Strategy::kRolling;

  if (strategy == Strategy::kRecreate) {
    if (old_total > 0) {
      destroy_all_older();
      out.summary = "recreate: stopping " + std::to_string(old_total) + " old instance(s) first";
      return out;
    }
    if (old_draining) {
      out.summary = "recreate: waiting for old instances to stop";
      return out;
    }
    out.create = std::max(0, replicas - new_total);
    out.summary = "recreate: starting " + std::to_string(out.create) + " new instance(s)";
    return out;
  }

  if (strategy == Strategy::kBlueGreen) {
    out.create = std::max(0, replicas - new_total);
    if (new_avail >= replicas) {
      destroy_all_older();
      out.summary = "blue-green: new set available; stopping the old set";
    } else {
      out.summary = "blue-green: " + std::to_string(new_avail) + " of " + std::to_string(replicas) +
                    " new instances available";
    }
    return out;
  }

  if (strategy == Strategy::kCanary && !in.promoted) {
    const int canaries = std::min(std::max(1, in.policy.canary), replicas);
    if (new_total < canaries) {
      out.create = canaries - new_total;
      out.summary = "canary: starting " + std::to_string(out.create) + " canary instance(s)";
      return out;
    }
    if (new_avail < canaries) {
      out.summary = "canary: waiting for " + std::to_string(canaries) + " canary instance(s)";
      return out;
    }
    if (!in.policy.auto_promote) {
      out.waiting_promotion = true;
      out.summary = "canary: canaries available; waiting for promotion";
      return out;
    }
    out.promote_now = true;  // and go on as rolling, below
  }

  // Rolling.
  int surge = in.policy.max_surge.Resolve(replicas, /*round_up=*/true);
  int unavailable = in.policy.max_unavailable.Resolve(replicas, /*round_up=*/false);
  if (!out.template_rollout) surge = std::max(surge, 1);
  if (surge == 0 && unavailable == 0) surge = 1;
  out.create =
      std::max(0, std::min(replicas - new_total, replicas + surge - (new_total + old_total)));
  // Old instances that are not healthy serve nothing: they go at once. Healthy ones serve
  // traffic even before they count as available (min_healthy_time), so they go only while enough
  // instances stay available: never fewer than replicas - max_unavailable (Kubernetes bounds
  // this as maxScaledDown). Available implies healthy, so this also keeps that many healthy.
  int spare = new_avail + old_avail - (replicas - unavailable);
  for (auto* o : older) {
    if (o->state != InstanceState::kHealthy) {
      out.destroy.push_back(o->name);
    } else if (spare > 0) {
      out.destroy.push_back(o->name);
      --spare;
    }
  }
  out.summary = "rolling: " + std::to_string(new_avail) + " of " + std::to_string(replicas) +
                " available on the target, " + std::to_string(old_total) + " to replace";
  return out;
}

}  // namespace kiln
