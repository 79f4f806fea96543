#pragma once

// The heart of kilnd (DESIGN.md "Flow"): level-triggered, one step per pass, intent recorded in
// the store before the driver acts. Every pass for a service reads its desired spec and its live
// instances, computes the next allowed step (controller/rollout_plan.h), commits it in one
// transaction with its events, then starts and stops instances. Events from outside (manifest
// loads, exits, probe results, timers, commands) only enqueue the service's name.
//
// REQUIRES: every method is called on the io_context's thread (kilnd runs one), so the
// reconciler's state needs no lock.

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"
#include "controller/desired_set.h"
#include "controller/work_queue.h"
#include "deploy/artifact_store.h"
#include "deploy/driver.h"
#include "deploy/prober.h"
#include "storage/state_store.h"

namespace kiln {

class Reconciler {
 public:
  struct Options {
    Duration stop_grace{10'000};     // SIGTERM to SIGKILL
    int final_instances_kept = 50;   // terminated/failed/lost rows kept per service
    std::function<void(const EventRecord&)> on_event;  // every event recorded (metrics)
  };

  Reconciler(StateStore& store, Driver& driver, HealthWatcher& prober, ArtifactStore& artifacts,
             const Clock& clock, PassScheduler& scheduler, Options options);

  // Start-up, before the first pass: loads the last good desired state from the store, then
  // reconciles every non-final instance row with what the driver sees: adopts what runs, marks
  // lost what does not, stops what runs with kiln's identity but is unknown to the store.
  Status Recover();

  // A new load of the manifest directory; enqueues the services it changes.
  void ApplyManifests(const ManifestSet& set);

  // One pass for one service.
  Status Reconcile(const std::string& service);

  // Every service with desired state or live instances (what a resync enqueues).
  std::vector<std::string> ServiceNames() const;

  // Commands, for the API. `actor` is who asked; each is recorded as an event.
  StatusOr<RevisionRecord> Rollback(const std::string& service, int64_t to_revision,
                                    const std::string& reason, const std::string& actor);
  Status Unpin(const std::string& service, const std::string& actor);
  Status Pause(const std::string& service, const std::string& reason, const std::string& actor);
  Status Resume(const std::string& service, const std::string& actor);
  Status Promote(const std::string& service, const std::string& actor);
  Status ReplaceInstance(const std::string& instance, const std::string& reason,
                         const std::string& actor);

  // What the next pass would do for a service, without doing it.
  struct NextStep {
    std::string summary;               // "rolling: 1 of 3 available on the target, 2 to replace"
    int64_t new_revision = 0;          // a revision the next pass writes for a new template, or 0
    int64_t target_revision = 0;
    int create = 0;                    // new instances of target_revision
    std::vector<std::string> destroy;  // instances to stop
  };
  StatusOr<NextStep> Plan(const std::string& service);

  const DesiredSet& desired() const { return desired_; }
  bool manifests_loaded() const { return manifests_loaded_; }

 private:

  int64_t NowMs() const { return ToUnixMillis(clock_.SystemNow()); }
  Status Event(const std::string& kind, const std::string& service, int64_t revision,
               const std::string& instance, const std::string& actor, const std::string& message);
  StatusOr<std::string> HashOf(const std::string& service, int64_t revision);
  StatusOr<int64_t> EnsureDesiredRevision(const DesiredService& d, ServiceRecord& svc);
  Status RetireStep(const std::string& name);
  Status WriteRollbackRevision(ServiceRecord& svc, const RevisionRecord& from,
                               const std::string& reason, const std::string& actor,
                               RevisionRecord* written);
  // history_limit: deletes revisions beyond the newest `limit`, never the target, desired,
  // pinned or last available one, nor one a live instance runs.
  // Returns how many revisions it deleted.
  StatusOr<int> PruneHistory(const ServiceRecord& svc, int64_t target_rev, int limit);
  // Removes artifacts no retained revision of any service references.
  void CollectArtifacts();
  StatusOr<int64_t> LastAvailableRevision(const std::string& service, const std::string& except_hash);
  void StartInstance(const InstanceRecord& inst);
  void StopInstance(const InstanceRecord& inst, bool mark_terminated);
  void WatchHealth(const InstanceRecord& inst, const Template& tmpl);
  void OnExit(const ExitInfo& info);
  // Records an exit; false when the store refused (it is retried on the next pass).
  bool RecordExit(const ExitInfo& info);
  // Drift of the artifact in the store (its bytes no longer match its digest): restores it from
  // the manifest's source when that still has those bytes and flags the instances running it
  // for replacement. Checked at most once a minute per digest. An error means: do not start
  // instances from it now.
  Status CheckArtifact(const std::string& service, const std::string& digest);
  void OnProbe(const ProbeResult& r);
  void RetryUnrecordedStarts(const std::string& service);
  static std::string ServiceOf(const std::string& instance);

  StateStore& store_;
  Driver& driver_;
  HealthWatcher& prober_;
  ArtifactStore& artifacts_;
  const Clock& clock_;
  PassScheduler& scheduler_;
  Options options_;
  DesiredSet desired_;
  bool manifests_loaded_ = false;

  // Starts whose "starting" state could not be committed (store unwritable): the process runs,
  // its row is still pending. Committed on the next pass; never started twice meanwhile.
  std::map<std::string, InstanceHandle> unrecorded_starts_;
  // Template hash by (service, revision): revisions never change.
  std::map<std::pair<std::string, int64_t>, std::string> hash_cache_;
  // Instances handed to the driver whose start has not called back yet.
  std::set<std::string> start_in_flight_;
  // Exits the store did not take (unwritable): recorded on the next pass of their service.
  std::map<std::string, ExitInfo> unrecorded_exits_;
  // When each artifact digest was last verified.
  std::map<std::string, int64_t> artifact_verified_ms_;
  // Rollout progress as last seen (new available, old total), to move last_progress_ms.
  std::map<std::string, std::pair<int, int>> progress_seen_;
};

}  // namespace kiln
