#pragma once

// What callers may rely on from kiln's state: services, immutable revisions, instances and
// their lifecycle, rollouts, and the append-only event log. The reconciler is the one writer
// (StateStore); the API and HTTP servers read through their own StateReader connections.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kiln {

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

std::string_view InstanceStateName(InstanceState s);
std::optional<InstanceState> ParseInstanceState(std::string_view s);
bool IsFinal(InstanceState s);
// Live = not final: the instance may be running or about to.
inline bool IsLive(InstanceState s) { return !IsFinal(s); }
bool IsLegalTransition(InstanceState from, InstanceState to);

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
  std::string conditions;      // JSON array of {type,status,reason,message,last_transition_ms}
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

struct RevisionRecord {
  std::string service;
  int64_t number = 0;
  std::string template_hash;
  std::string template_json;  // canonical serialisation; its SHA-256 is template_hash
  std::string source;         // "manifest" or "rollback"
  std::string manifest_file;
  std::string manifest_sha256;
  std::string actor;
  std::string reason;
  int64_t rolled_back_from = 0;
  int64_t created_ms = 0;
  int64_t available_ms = 0;  // set once, the first time the revision is fully available
};

struct InstanceRecord {
  int64_t id = 0;
  std::string name;  // "<service>-<id>"; ids are never reused
  std::string service;
  int64_t revision = 0;
  InstanceState state = InstanceState::kPending;
  std::string reason;
  std::string handle;  // the driver's handle, opaque here
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
  std::optional<std::string> host;
  std::optional<int> port;
  std::optional<int> exit_code;
  std::optional<std::string> exit_signal;
};

struct RolloutRecord {
  int64_t id = 0;
  std::string service;
  int64_t from_revision = 0;
  int64_t to_revision = 0;
  std::string strategy;  // rolling, recreate, blue-green, canary
  std::string state;     // progressing, paused, waiting_promotion, completed, failed, superseded
  std::string reason;
  int64_t started_ms = 0;
  int64_t last_progress_ms = 0;
  int64_t paused_ms = 0;     // total time paused so far
  int64_t paused_at_ms = 0;  // when the current pause began; 0 when not paused
  int64_t finished_ms = 0;
  bool promoted = false;  // canary: the rest of the rollout may proceed

  friend bool operator==(const RolloutRecord&, const RolloutRecord&) = default;
};

struct EventRecord {
  int64_t seq = 0;  // assigned by AppendEvent, strictly increasing, never reused
  int64_t time_ms = 0;
  std::string kind;
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

class StateReader {
 public:
  virtual ~StateReader() = default;

  // Runs `fn` inside one read transaction: every read in it sees the same committed state, even
  // while the writer commits.
  virtual Status Snapshot(const std::function<Status()>& fn) = 0;

  virtual StatusOr<std::vector<ServiceRecord>> ListServices() = 0;
  // NOT_FOUND when there is no such service.
  virtual StatusOr<ServiceRecord> GetService(std::string_view name) = 0;

  // Newest first.
  virtual StatusOr<std::vector<RevisionRecord>> ListRevisions(std::string_view service) = 0;
  virtual StatusOr<RevisionRecord> GetRevision(std::string_view service, int64_t number) = 0;

  // Instances of one service ordered by id; live ones only unless `include_final`.
  virtual StatusOr<std::vector<InstanceRecord>> ListInstances(std::string_view service,
                                                              bool include_final) = 0;
  // Live instances of every service, ordered by id (start-up adoption, resync).
  virtual StatusOr<std::vector<InstanceRecord>> ListLiveInstances() = 0;
  // By name ("web-42"); NOT_FOUND when unknown.
  virtual StatusOr<InstanceRecord> GetInstance(std::string_view name) = 0;

  // The newest rollout of a service; NOT_FOUND when it never had one.
  virtual StatusOr<RolloutRecord> GetLatestRollout(std::string_view service) = 0;

  // Events with seq > after_seq in order, at most `limit`.
  virtual StatusOr<std::vector<EventRecord>> ReadEvents(const EventQuery& q) = 0;
  // The smallest seq a reader can resume from without a gap made by retention pruning (1 when
  // nothing was ever pruned); the next seq to be assigned is > any seen.
  virtual StatusOr<int64_t> OldestEventSeq() = 0;
  virtual StatusOr<int64_t> LatestEventSeq() = 0;
  // Instance rows grouped by service, revision and state.
  virtual StatusOr<std::vector<InstanceCount>> CountInstances() = 0;
};

class StateStore : public StateReader {
 public:
  // Runs `fn` in one write transaction: commits when it returns OK, rolls back otherwise (also
  // when the commit itself fails, e.g. on a full disk). Nested calls join the outer transaction.
  virtual Status Transaction(const std::function<Status()>& fn) = 0;

  // Inserts or replaces the mutable fields of a service row.
  virtual Status PutService(const ServiceRecord& s) = 0;

  // Writes a new revision. A revision once written is never changed: writing an existing
  // (service, number) again is FAILED_PRECONDITION, whatever the content.
  virtual Status WriteRevision(const RevisionRecord& r) = 0;
  // The next free revision number of a service (1 for a new one).
  virtual StatusOr<int64_t> NextRevisionNumber(std::string_view service) = 0;
  // Records the first time a revision was fully available; later calls keep the first time.
  virtual Status MarkRevisionAvailable(std::string_view service, int64_t number,
                                       int64_t time_ms) = 0;
  // Deletes an old revision (history_limit). FAILED_PRECONDITION while instances reference it.
  virtual Status DeleteRevision(std::string_view service, int64_t number) = 0;

  // Commits the intent to run one instance of a revision: a new row in state pending.
  virtual StatusOr<InstanceRecord> CreateInstance(std::string_view service, int64_t revision) = 0;
  // Moves an instance to `to`. Only the lifecycle's legal transitions are accepted; any other is
  // FAILED_PRECONDITION naming the instance and both states.
  virtual StatusOr<InstanceRecord> TransitionInstance(std::string_view name, InstanceState to,
                                                      const InstanceUpdate& update) = 0;
  // Marks a live instance to be replaced by a new one of the same revision (never restarted in
  // place). FAILED_PRECONDITION when it is no longer live.
  virtual Status RequestReplacement(std::string_view name, std::string_view reason) = 0;
  // Deletes the final (terminated, failed, lost) instances of one revision. Returns how many.
  virtual StatusOr<int64_t> DeleteFinalInstancesOf(std::string_view service, int64_t revision) = 0;
  // Deletes final instances of a service beyond the newest `keep`. Returns how many.
  virtual StatusOr<int64_t> PruneFinalInstances(std::string_view service, int keep) = 0;

  // Records a new rollout (id assigned) or updates an existing one by id.
  virtual StatusOr<int64_t> PutRollout(const RolloutRecord& r) = 0;

  // Appends an event (time set from the store's clock when 0); returns its seq.
  virtual StatusOr<int64_t> AppendEvent(const EventRecord& e) = 0;
  // Deletes the oldest events so that at most `keep` remain. Returns how many were deleted.
  virtual StatusOr<int64_t> PruneEvents(int64_t keep) = 0;

  // Records a health probe result on a live or final instance, whatever its state. Callers write
  // it only when the result changed, so a steady probe costs no commit.
  virtual Status RecordProbe(std::string_view name, bool ok, std::string_view result,
                             int64_t time_ms) = 0;
};

}  // namespace kiln
