#pragma once

// What callers may rely on from kiln's state: services, immutable revisions, instances and
// their lifecycle, rollouts, and the append-only event log. The reconciler is the one writer
// (StateStore); the API and HTTP servers read through their own StateReader connections. The
// records and their rules are in storage/records.h; every implementation applies those rules.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "storage/records.h"

namespace kiln {

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
  // Runs `fn` once what was written so far is durable: inside a transaction, after its outermost
  // commit succeeds (never, when it rolls back); outside any transaction, at once. For what must
  // not be seen before the write it reports is (metrics, webhooks): the writer's thread runs it.
  virtual void AfterCommit(std::function<void()> fn) = 0;

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
