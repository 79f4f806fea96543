#pragma once

// The decision of one reconciler pass, as a pure function (issue 10, "A pure decision"): from
// what a pass loaded (the service's desired spec and its records) and `now`, what it must commit
// and do. No clock, no store, no driver: Reconciler::Reconcile loads, calls Decide, commits the
// result in one transaction, then acts on the driver; Reconciler::Plan calls the same Decide on
// the same records, so plan and pass cannot disagree.
//
// It covers the whole pass: a new revision for a new template (and the pin it lifts), the
// manifest's error and a retirement cancelled or carried out, rollout bookkeeping, instances
// past their healthy deadline, the strategy's step (rollout_plan.h), the crash-loop back-off,
// rollout progress, promotion, completion, failure and automatic rollback, and conditions.

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/status.h"
#include "controller/rollout_plan.h"
#include "spec/manifest.h"
#include "storage/records.h"

namespace kiln {

// What of the reconciler's options the decision depends on (Reconciler::Options says more).
struct DecideOptions {
  Duration retire_after{600'000};
  Duration crash_backoff_initial{10'000};
  Duration crash_backoff_max{300'000};
  Duration crash_backoff_reset_after{60'000};
};

struct PassInput {
  // The service's record as stored (a fresh one, named, when `service_exists` is false).
  ServiceRecord service;
  bool service_exists = false;
  // Whether the manifests declare it. When not, only `service` and `instances` are loaded, and
  // the decision is its retirement: --retire-after later, every instance drained.
  bool declared = true;

  // What the manifest declares (the last good spec while its file has an error).
  ServiceSpec spec;
  std::string template_hash;     // of spec.tmpl
  std::string spec_json;         // the spec as recorded on the service
  std::string manifest_sha256;   // of the file, recorded on a revision written from it
  SourceCommit manifest_commit;  // the git commit that last changed the file, recorded likewise
  std::string manifest_error;    // the file's current error ("" when it loads)
  // A template no revision has yet had its artifact put into the store before the pass's
  // transaction; this is how that went (an error refuses the revision).
  Status artifact;

  std::string desired_hash;  // the template hash of service.desired_revision ("" when none)
  // Whether the manifest declares a template the service has no desired revision of yet.
  bool NewTemplate() const {
    return service.desired_revision == 0 || desired_hash != template_hash;
  }
  RevisionRecord target;  // the pinned revision, else the desired one, as stored (if any)
  std::map<int64_t, std::string> template_hashes;  // by revision, for every instance's
  std::vector<InstanceRecord> instances;           // the non-final ones
  std::optional<RolloutRecord> rollout;            // the latest
  // Needed only while a rollout can fail or a revision be written: the number the next
  // revision written gets, and for an automatic rollback the newest fully available revision
  // and the newest fully available one with another template than it (so whichever template
  // the target has, the newest available other one is among them).
  int64_t next_revision = 0;
  std::vector<RevisionRecord> last_available;
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
  ServiceRecord service;  // to write when it differs from what was loaded (or is new)
  // A revision to write first: the manifest's new template (then `service` converges to it).
  std::optional<RevisionRecord> revision;
  int64_t target_revision = 0;  // what the pass converges to: pinned, else desired
  // An unfinished rollout a new target supersedes (to write), and the current rollout: new (to
  // insert) when `rollout_is_new`, else to write when it differs from what was loaded.
  std::optional<RolloutRecord> superseded;
  RolloutRecord rollout;  // (untouched when the service is not declared)
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

// An error when the pass can do nothing: the first template of a service cannot become a
// revision (its artifact was refused). A later template refused is a manifest error instead,
// and the service keeps converging to what it has.
StatusOr<PassResult> Decide(const PassInput& in);

// Records a failure of one of the service's instances (exit, start error, missed deadline,
// failing health) on its record: one more in a row, when and why. `permanent`: a start error
// retrying cannot fix, for `revision`. What follows (the crash-loop back-off) is decided by
// Decide, from these fields.
void CountFailure(ServiceRecord& svc, const std::string& what, int64_t now_ms,
                  bool permanent = false, int64_t revision = 0);

// When the next instance of a crash-looping service may start (0: no back-off): the first
// failure is replaced at once, each further one waits crash_backoff_initial doubling up to
// crash_backoff_max after the last, and a start error retrying cannot fix waits the maximum.
int64_t NextStartMs(const ServiceRecord& svc, const DecideOptions& options);

// How a pin says why it holds: "automatic rollback: ..." or "rollback by bob: ...".
std::string PinReason(const std::string& actor, const std::string& reason);

}  // namespace kiln
