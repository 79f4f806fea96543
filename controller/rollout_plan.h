#pragma once

// The next step of a service, as a pure function of its policy and live instances: how many new
// instances to create and which to destroy. The reconciler records that step as intent and acts;
// `kilnctl plan` shows it. No clock, no I/O.

#include <string>
#include <vector>

#include "spec/manifest.h"
#include "storage/state_store.h"

namespace kiln {

struct PlanInstance {
  std::string name;
  InstanceState state = InstanceState::kPending;
  bool is_target = false;  // its template hash is the target revision's
  bool replace = false;    // flagged for replacement (unhealthy, operator request)
  bool available = false;  // healthy for at least min_healthy_time
  int64_t created_ms = 0;
};

struct PlanInput {
  UpdatePolicy policy;
  int replicas = 0;
  bool paused = false;                  // hold a template rollout where it is
  bool promoted = false;                // canary: canaries accepted
  std::vector<PlanInstance> instances;  // live ones (draining included)
};

struct PlanOutput {
  int create = 0;                    // new instances of the target revision
  std::vector<std::string> destroy;  // instances to drain and stop
  bool template_rollout = false;     // live instances of another template remain
  bool waiting_promotion = false;    // canaries available; waiting for Promote
  bool promote_now = false;          // canaries available and auto_promote
  int new_total = 0, new_available = 0, old_total = 0, old_available = 0;
  std::string summary;  // one line: what and why
};

PlanOutput PlanStep(const PlanInput& in);

}  // namespace kiln
