#pragma once

// Internal to the planner (rollout_plan.cc): the live instances of a service sorted into the
// target's and the rest, and one planner per update strategy (plan_rolling.cc, plan_recreate.cc,
// plan_blue_green.cc, plan_canary.cc). PlanStep sorts, handles a pause, then dispatches. Pure,
// like PlanStep: no clock, no I/O.

#include <vector>

#include "controller/rollout_plan.h"

namespace kiln::plan_internal {

// The live instances as a planner sees them. The counts are also in PlanOutput.
struct Sorted {
  int replicas = 0;
  std::vector<const PlanInstance*> newer;  // of the target, not flagged for replacement
  std::vector<const PlanInstance*> older;  // to replace, least useful first
  bool old_draining = false;               // an old instance is still being stopped
  int new_total = 0, new_available = 0, old_total = 0, old_available = 0;
};

// Every older instance goes.
void DestroyAllOlder(const Sorted& s, PlanOutput& out);

void PlanRecreate(const PlanInput& in, const Sorted& s, PlanOutput& out);
void PlanBlueGreen(const PlanInput& in, const Sorted& s, PlanOutput& out);
void PlanRolling(const PlanInput& in, const Sorted& s, PlanOutput& out);
// Before promotion: the canary steps. Returns false when the canaries are accepted (promoted,
// or available with auto_promote, which sets out.promote_now): the rollout goes on as rolling.
bool PlanCanary(const PlanInput& in, const Sorted& s, PlanOutput& out);

}  // namespace kiln::plan_internal
