#pragma once

// The decision of one reconciler pass, as a pure function (issue 10, "A pure decision"): from
// what a pass loaded (the service's desired spec and its records) and `now`, what it must commit
// and do. No clock, no store, no driver: Reconciler::Reconcile loads, calls Decide, commits the
// result in its transaction, then acts on the driver; Reconciler::Plan calls the same Decide on
// the same records, so plan and pass cannot disagree.
//
// It covers what follows the desired revision being ensured: rollout bookkeeping, instances past
// their healthy deadline, the strategy's step (rollout_plan.h), the crash-loop back-off, rollout
// progress, promotion, completion, failure and automatic rollback, and conditions.

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "controller/rollout_plan.h"
#include "spec/manifest.h"
#include "storage/records.h"

namespace kiln {

// What of the reconciler's options the decision depends on (Reconciler::Options says more).
struct DecideOptions {
  Duration crash_backoff_initial{10'000};
  Duration crash_backoff_max{300'000};
  Duration crash_backoff_reset_after{60'000};
};

struct PassInput {
  ServiceSpec spec;       // what the manifest declares
  ServiceRecord service;  // with the desired revision ensured (a pin lifted by a new template)
  RevisionRecord target;  // the pinned revision, else the desired one
  std::map<int64_t, std::string> template_hashes;  // by revision, for every instance's
  std::vector<InstanceRecord> instances;           // the non-final ones
  std::optional<RolloutRecord> rollout;            // the latest
  // For an automatic rollback; needed only while a rollout can fail (active, or starting): the
  // newest fully available revision with another template than the target (none: nothing to
  // go back to), and the number the next revision written gets.
  std::optional<RevisionRecord> rollback_candidate;
  int64_t next_revision = 0;
  int64_t now_ms = 0;
  DecideOptions options;
};

// One event to record, for the pass's service.
struct PassEvent {
  EventKind kind = EventKind::kRevisionCreated;
  int64_t revision = 0;
  std::string instance;
  std::string actor;
  std::string message;
};

// An instance to move to another state, and why.
struct InstanceTransition {
  std::string instance;
  int64_t revision = 0;
  InstanceState to = InstanceState::kDraining;
  std::string reason;
};

// A rollback to write: a new revision (number `number`) with the template of `from`.
struct RollbackDecision {
  RevisionRecord from;
  int64_t number = 0;
  std::string reason;
};

struct PassResult {
  ServiceRecord service;  // to write when it differs from what was loaded
  // An unfinished rollout a new target supersedes (to write), and the current rollout: new (to
  // insert) when `rollout_is_new`, else to write when it differs from what was loaded.
  std::optional<RolloutRecord> superseded;
  RolloutRecord rollout;
  bool rollout_is_new = false;
  std::vector<PassEvent> events;             // in order, before the step's own
  std::vector<InstanceTransition> failed;    // missed their healthy deadline
  bool mark_available = false;               // the target became fully available
  std::optional<RollbackDecision> rollback;  // automatic, after a failed rollout
  std::string no_rollback;  // why a failed rollout could not roll back ("" = it did, or no need)
  // The step: instances to drain and how many to create of the target (none when rolling back:
  // the next pass steps towards the rollback's revision).
  std::vector<InstanceTransition> drain;
  int create = 0;
  int64_t create_revision = 0;
  PlanOutput plan;               // the strategy's step as planned (summary, counts)
  std::string backoff_reset_by;  // an instance that ran well long enough to reset the back-off
  int64_t wake_at_ms = 0;        // the next deadline to wake for (0 = none)
  bool requeue_now = false;      // a rollback was written: pass again at once
};

PassResult Decide(const PassInput& in);

// A failure of one of the service's instances (exit, start error, missed deadline, failing
// health) counts toward its crash-loop back-off. `permanent`: a start error retrying cannot fix,
// for `revision`.
void NoteFailure(ServiceRecord& svc, const std::string& what, int64_t now_ms,
                 const DecideOptions& options, bool permanent = false, int64_t revision = 0);

// How a pin says why it holds: "automatic rollback: ..." or "rollback by bob: ...".
std::string PinReason(const std::string& actor, const std::string& reason);

}  // namespace kiln
