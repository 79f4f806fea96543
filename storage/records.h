#pragma once

// The records kiln keeps (services, revisions, instances, rollouts, events) and their rules, as
// typed values: every closed set is an enum with exactly one name table, and text exists only at
// the edges (the SQLite store, the API, JSON views, logs). The names are the text the database,
// the API, metrics and logs have always used: never rename one.
//
// The lifecycle rules live here, not in the SQLite store, so that any StateStore (a fake one in
// tests, too) applies the same rules.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "spec/manifest.h"  // Strategy, StrategyName, ParseStrategy

namespace kiln {

// One entry of a name table. Tables list every value once, in the enum's order (records.cc
// checks the order at compile time), so a value's name is found by its index.
template <typename E>
struct NamedValue {
  E value;
  std::string_view name;
};

// ---------------------------------------------------------------------------------------------
// Instances

// The instance lifecycle (DESIGN.md "Instance lifecycle"). Terminated, failed and lost are final.
enum class InstanceState {
  kPending,
  kStarting,
  kHealthy,
  kUnhealthy,
  kDraining,
  kTerminated,
  kFailed,
  kLost
};

inline constexpr std::array<NamedValue<InstanceState>, 8> kInstanceStateNames = {{
    {InstanceState::kPending, "pending"},
    {InstanceState::kStarting, "starting"},
    {InstanceState::kHealthy, "healthy"},
    {InstanceState::kUnhealthy, "unhealthy"},
    {InstanceState::kDraining, "draining"},
    {InstanceState::kTerminated, "terminated"},
    {InstanceState::kFailed, "failed"},
    {InstanceState::kLost, "lost"},
}};

std::string_view InstanceStateName(InstanceState s);
std::optional<InstanceState> ParseInstanceState(std::string_view s);
bool IsFinal(InstanceState s);
// Live = not final: the instance may be running or about to.
inline bool IsLive(InstanceState s) { return !IsFinal(s); }
bool IsLegalTransition(InstanceState from, InstanceState to);

struct InstanceRecord {
  int64_t id = 0;
  std::string name;  // "<service>-<id>"; ids are never reused
  std::string service;
  int64_t revision = 0;
  InstanceState state = InstanceState::kPending;
  std::string reason;
  std::string handle;  // the driver's handle, opaque here
  int64_t pid = 0;     // the leader's process id, for a driver that runs processes; 0 = none
  std::string host;
  int port = 0;
  int64_t created_ms = 0;
  int64_t started_ms = 0;
  int64_t healthy_since_ms = 0;
  int64_t state_changed_ms = 0;
  int64_t finished_ms = 0;
  std::optional<int> exit_code;
  std::string exit_signal;
  std::string replace_reason;  // set when it must be replaced (operator request, drift)
  // The last health probe result, in every state ("http 503 from 127.0.0.1:20001/healthz"), and
  // the first failure of the current failing streak (cleared by a passing probe).
  std::string last_probe;
  bool last_probe_ok = false;
  int64_t last_probe_ms = 0;
  std::string first_probe_failure;
  int64_t probe_failing_since_ms = 0;
};

// Available is derived, never stored: healthy for at least min_healthy_time.
inline bool IsAvailable(const InstanceRecord& i, int64_t now_ms, int64_t min_healthy_ms) {
  return i.state == InstanceState::kHealthy && now_ms - i.healthy_since_ms >= min_healthy_ms;
}

// Fields that a transition may set alongside the new state; unset ones are kept.
struct InstanceUpdate {
  std::string reason;
  std::optional<std::string> handle;
  std::optional<int64_t> pid;
  std::optional<std::string> host;
  std::optional<int> port;
  std::optional<int> exit_code;
  std::optional<std::string> exit_signal;
};

// Moves `r` to `to` at `now_ms` with `u`: the only legal way an instance record changes state.
// FAILED_PRECONDITION naming the instance and both states when the lifecycle does not allow it;
// `r` is then unchanged. Sets what each state implies (started, healthy since, finished).
Status ApplyTransition(InstanceRecord& r, InstanceState to, const InstanceUpdate& u,
                       int64_t now_ms);

// Whether an instance may be flagged for replacement: only a live one. FAILED_PRECONDITION
// otherwise, naming it and its state.
Status CheckReplaceable(const InstanceRecord& r);

// ---------------------------------------------------------------------------------------------
// Services and their conditions

enum class ConditionType { kAvailable, kProgressing, kDegraded };

inline constexpr std::array<NamedValue<ConditionType>, 3> kConditionTypeNames = {{
    {ConditionType::kAvailable, "Available"},
    {ConditionType::kProgressing, "Progressing"},
    {ConditionType::kDegraded, "Degraded"},
}};

std::string_view ConditionTypeName(ConditionType t);
std::optional<ConditionType> ParseConditionType(std::string_view s);

// One condition of a service (DESIGN.md "gRPC API"), as Kubernetes reports them.
struct Condition {
  ConditionType type = ConditionType::kAvailable;
  bool status = false;
  std::string reason;   // one CamelCase word: "MinimumReplicasAvailable", "CrashLoopBackOff"
  std::string message;  // for people
  int64_t last_transition_ms = 0;  // since when `status` holds

  friend bool operator==(const Condition&, const Condition&) = default;
};

// The condition of that type, or nullptr.
const Condition* FindCondition(const std::vector<Condition>& conditions, ConditionType type);

struct ServiceRecord {
  std::string name;
  std::string manifest_file;     // where it is declared
  std::string spec;              // last good desired spec (JSON), kept while its file is broken
  int64_t desired_revision = 0;  // what the manifest declares; 0 = none yet
  int64_t pinned_revision = 0;   // 0 = not pinned
  std::string pin_reason;
  bool paused = false;
  bool retired = false;        // no longer declared: scaled to zero, then forgotten
  std::string manifest_error;  // current error of its manifest file, "" when fine
  std::vector<Condition> conditions;
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  // Crash-loop back-off: failures of its instances (exits, start errors, missed health
  // deadlines, failing health) since it last ran well, and when the next start may happen.
  int crash_count = 0;
  int64_t last_crash_ms = 0;
  std::string crash_reason;   // the last failure: "web-7 exited with code 3"
  int64_t next_start_ms = 0;  // 0 = no back-off
  // A start error that cannot succeed on retry (executable missing, wrong driver), for the
  // revision it happened to; cleared when an instance of that revision starts or the target moves.
  std::string start_error;
  int64_t start_error_revision = 0;
  // Its manifest document is gone: retired at this time unless it comes back. 0 = declared.
  int64_t retire_at_ms = 0;

  friend bool operator==(const ServiceRecord&, const ServiceRecord&) = default;
};

// ---------------------------------------------------------------------------------------------
// Revisions

// Where a revision's template came from.
enum class RevisionSource { kManifest, kRollback };

inline constexpr std::array<NamedValue<RevisionSource>, 2> kRevisionSourceNames = {{
    {RevisionSource::kManifest, "manifest"},
    {RevisionSource::kRollback, "rollback"},
}};

std::string_view RevisionSourceName(RevisionSource s);
std::optional<RevisionSource> ParseRevisionSource(std::string_view s);

struct RevisionRecord {
  std::string service;
  int64_t number = 0;
  std::string template_hash;
  std::string template_json;  // canonical serialisation; its SHA-256 is template_hash
  RevisionSource source = RevisionSource::kManifest;
  std::string manifest_file;
  std::string manifest_sha256;
  // Source manifest in a git work tree: the commit that last changed it ("" id: none found) and
  // whether the file had uncommitted changes.
  SourceCommit commit;
  std::string actor;
  std::string reason;
  int64_t rolled_back_from = 0;
  int64_t created_ms = 0;
  int64_t available_ms = 0;  // set once, the first time the revision is fully available
};

// A revision is never changed once written. FAILED_PRECONDITION when (service, number) is
// `already_written`, whatever the content; INVALID_ARGUMENT when it lacks a template or hash.
Status CheckNewRevision(const RevisionRecord& r, bool already_written);

// A revision that instances still reference is kept: FAILED_PRECONDITION when
// `referencing_instances` > 0.
Status CheckRevisionDeletable(std::string_view service, int64_t number,
                              int64_t referencing_instances);

// ---------------------------------------------------------------------------------------------
// Rollouts

enum class RolloutState {
  kProgressing,
  kPaused,
  kWaitingPromotion,  // canary: canaries available, waiting for Promote
  kCompleted,
  kFailed,
  kSuperseded,  // a newer target started a new rollout before this one finished
};

inline constexpr std::array<NamedValue<RolloutState>, 6> kRolloutStateNames = {{
    {RolloutState::kProgressing, "progressing"},
    {RolloutState::kPaused, "paused"},
    {RolloutState::kWaitingPromotion, "waiting_promotion"},
    {RolloutState::kCompleted, "completed"},
    {RolloutState::kFailed, "failed"},
    {RolloutState::kSuperseded, "superseded"},
}};

std::string_view RolloutStateName(RolloutState s);
std::optional<RolloutState> ParseRolloutState(std::string_view s);
// Completed, failed and superseded rollouts are over; the others are active.
bool IsFinal(RolloutState s);
inline bool IsActive(RolloutState s) { return !IsFinal(s); }

struct RolloutRecord {
  int64_t id = 0;
  std::string service;
  int64_t from_revision = 0;
  int64_t to_revision = 0;
  Strategy strategy = Strategy::kRolling;
  RolloutState state = RolloutState::kProgressing;
  std::string reason;
  int64_t started_ms = 0;
  int64_t last_progress_ms = 0;
  int64_t paused_ms = 0;     // total time paused so far
  int64_t paused_at_ms = 0;  // when the current pause began; 0 when not paused
  int64_t finished_ms = 0;
  bool promoted = false;  // canary: the rest of the rollout may proceed
  // What the last pass saw of its progress (instances of the target available, instances of
  // other revisions left); -1 before the first. A change is progress: last_progress_ms moves.
  // Stored, so that a pass after a restart decides as one without it would.
  int seen_new_available = -1;
  int seen_old_total = -1;

  friend bool operator==(const RolloutRecord&, const RolloutRecord&) = default;
};

// ---------------------------------------------------------------------------------------------
// Events

// Every kind of event kiln records (DESIGN.md "Words": event).
enum class EventKind {
  // Instances
  kInstanceCreated,
  kInstanceStarted,
  kInstanceStartFailed,
  kInstanceHealthy,
  kInstanceUnhealthy,
  kInstanceDraining,
  kInstanceDrained,  // out of every proxy's pool with no connection open (or `drain` passed)
  kInstanceTerminated,
  kInstanceExited,
  kInstanceFailed,
  kInstanceLost,
  kInstanceAdopted,
  kUnknownInstanceStopped,
  kReplaceRequested,
  kArtifactDrift,
  // Revisions, pins and rollouts
  kRevisionCreated,
  kRolloutStarted,
  kRolloutCompleted,
  kRolloutFailed,
  kWaitingPromotion,
  kPromoted,
  kRolledBack,
  kPinLifted,
  kUnpinned,
  kPaused,
  kResumed,
  // Services and manifests
  kManifestError,
  kServiceMissing,
  kServiceRetired,
  kRetirementCancelled,
  // Docker hosts (service "")
  kHostDown,
  kHostUp,
};

inline constexpr std::array<NamedValue<EventKind>, 32> kEventKindNames = {{
    {EventKind::kInstanceCreated, "instance_created"},
    {EventKind::kInstanceStarted, "instance_started"},
    {EventKind::kInstanceStartFailed, "instance_start_failed"},
    {EventKind::kInstanceHealthy, "instance_healthy"},
    {EventKind::kInstanceUnhealthy, "instance_unhealthy"},
    {EventKind::kInstanceDraining, "instance_draining"},
    {EventKind::kInstanceDrained, "instance_drained"},
    {EventKind::kInstanceTerminated, "instance_terminated"},
    {EventKind::kInstanceExited, "instance_exited"},
    {EventKind::kInstanceFailed, "instance_failed"},
    {EventKind::kInstanceLost, "instance_lost"},
    {EventKind::kInstanceAdopted, "instance_adopted"},
    {EventKind::kUnknownInstanceStopped, "unknown_instance_stopped"},
    {EventKind::kReplaceRequested, "replace_requested"},
    {EventKind::kArtifactDrift, "artifact_drift"},
    {EventKind::kRevisionCreated, "revision_created"},
    {EventKind::kRolloutStarted, "rollout_started"},
    {EventKind::kRolloutCompleted, "rollout_completed"},
    {EventKind::kRolloutFailed, "rollout_failed"},
    {EventKind::kWaitingPromotion, "waiting_promotion"},
    {EventKind::kPromoted, "promoted"},
    {EventKind::kRolledBack, "rolled_back"},
    {EventKind::kPinLifted, "pin_lifted"},
    {EventKind::kUnpinned, "unpinned"},
    {EventKind::kPaused, "paused"},
    {EventKind::kResumed, "resumed"},
    {EventKind::kManifestError, "manifest_error"},
    {EventKind::kServiceMissing, "service_missing"},
    {EventKind::kServiceRetired, "service_retired"},
    {EventKind::kRetirementCancelled, "retirement_cancelled"},
    {EventKind::kHostDown, "host_down"},
    {EventKind::kHostUp, "host_up"},
}};

std::string_view EventKindName(EventKind k);
std::optional<EventKind> ParseEventKind(std::string_view s);

struct EventRecord {
  int64_t seq = 0;  // assigned by AppendEvent, strictly increasing, never reused
  int64_t time_ms = 0;
  EventKind kind = EventKind::kInstanceCreated;
  std::string service;
  int64_t revision = 0;
  std::string instance;
  std::string actor;
  std::string message;
  // Repeats: events of a service with the same non-empty aggregate key within the store's
  // window are kept as one row, the latest, counting them since first_ms.
  std::string aggregate_key;
  int64_t count = 1;
  int64_t first_ms = 0;
};

// Whether `next` repeats `previous` (the service's last event with the same non-empty aggregate
// key), `window_ms` (> 0) being the store's aggregation window. If so, sets next's count and
// first_ms to cover both, and the store keeps `next` in place of `previous`.
bool AggregateRepeat(const EventRecord& previous, int64_t window_ms, EventRecord& next);

struct EventQuery {
  int64_t after_seq = 0;
  std::string service;  // "" = all
  int limit = 1000;
};

struct InstanceCount {
  std::string service;
  int64_t revision = 0;
  InstanceState state = InstanceState::kPending;
  int64_t count = 0;
};

}  // namespace kiln
