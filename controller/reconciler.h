#pragma once

// The heart of kilnd (DESIGN.md "Flow"): level-triggered, one step per pass, intent recorded in
// the store before the driver acts. Every pass for a service reads its desired spec and its live
// instances, decides the next allowed step (controller/decide.h), commits it in one transaction
// with its events, then starts and stops instances. Events from outside (manifest
// loads, exits, probe results, timers, commands) only enqueue the service's name.
//
// REQUIRES: every method is called on the io_context's thread (kilnd runs one), so the
// reconciler's state needs no lock.

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"
#include "controller/decide.h"
#include "controller/endpoints_hub.h"
#include "controller/work_queue.h"
#include "deploy/artifact_store.h"
#include "deploy/driver.h"
#include "deploy/prober.h"
#include "spec/desired_set.h"
#include "storage/state_store.h"

namespace kiln {

class Reconciler {
 public:
  struct Options {
    Duration stop_grace{10'000};    // SIGTERM to SIGKILL
    int final_instances_kept = 50;  // terminated/failed/lost rows kept per service
    // A service whose manifest document is gone is retired only after this long; restoring the
    // document cancels it.
    Duration retire_after{60'000};
    // Crash-loop back-off (like Kubernetes' CrashLoopBackOff), per service: the first failure
    // of an instance is replaced at once; each further one waits `crash_backoff_initial`
    // doubling up to `crash_backoff_max`. It resets when an instance started after the last
    // failure has been available for `crash_backoff_reset_after`, and on a new target revision.
    Duration crash_backoff_initial{10'000};
    Duration crash_backoff_max{300'000};
    Duration crash_backoff_reset_after{60'000};
    // Every event recorded, once its transaction committed (metrics, webhooks).
    std::function<void(const EventRecord&)> on_event;
    // Every probe result (metrics): `service` is the instance's.
    std::function<void(const std::string& service, const ProbeResult&)> on_probe;
    // Where the pools of services with `expose:` are published and proxies report; null: no
    // stable addresses (a draining instance is stopped at once).
    EndpointsHub* endpoints = nullptr;
  };

  Reconciler(StateStore& store, Driver& driver, HealthWatcher& prober, ArtifactStore& artifacts,
             const Clock& clock, PassScheduler& scheduler, Options options);

  // Start-up, before the first pass: loads the last good desired state from the store, then
  // reconciles every non-final instance row with what the driver sees: adopts what runs, marks
  // lost what does not, stops what runs with kiln's identity but is unknown to the store.
  Status Recover();

  // A Docker host went down or answered again (DockerHostsDriver's host callback): an event
  // with no service. Its instances' ends arrive through the driver's exit callback.
  Status RecordHostEvent(const std::string& host, bool up, const std::string& message);

  // A new load of the manifest directory; enqueues the services it changes.
  void ApplyManifests(const ManifestSet& set);

  // One pass for one service.
  Status Reconcile(const std::string& service);
  // A proxy reported (EndpointsHub::Report): services waiting for a drain look again.
  void OnProxyReport();

  // Every service with desired state or live instances (what a resync enqueues).
  std::vector<std::string> ServiceNames() const;

  // Commands, for the API. `actor` is who asked; each is recorded as an event.
  StatusOr<RevisionRecord> Rollback(const std::string& service, int64_t to_revision,
                                    const std::string& reason, const std::string& actor);
  // Returns the revision the service now converges to: its manifest's (0 when none yet).
  StatusOr<int64_t> Unpin(const std::string& service, const std::string& actor);
  Status Pause(const std::string& service, const std::string& reason, const std::string& actor);
  Status Resume(const std::string& service, const std::string& actor);
  Status Promote(const std::string& service, const std::string& actor);
  Status ReplaceInstance(const std::string& instance, const std::string& reason,
                         const std::string& actor);

  // What the next pass would do for a service, without doing it.
  struct NextStep {
    std::string summary;            // "rolling: 1 of 3 available on the target, 2 to replace"
    int64_t new_revision = 0;       // a revision the next pass writes for a new template, or 0
    int64_t rollback_revision = 0;  // a revision the next pass writes to roll back, or 0
    int64_t target_revision = 0;
    int create = 0;                    // new instances of target_revision
    std::vector<std::string> destroy;  // instances to stop
  };
  StatusOr<NextStep> Plan(const std::string& service);
  // The same for a desired state the manifests do not declare (yet): what the next pass would do
  // if `desired` (null: not declared) were the service's, with the same Decide. Changes nothing.
  StatusOr<NextStep> PlanAs(const std::string& service, const DesiredService* desired);

  const DesiredSet& desired() const { return desired_; }
  bool manifests_loaded() const { return manifests_loaded_; }

  // Probes that failed for a reason of kilnd's own (out of descriptors, memory): not the
  // instances' fault, so no instance changes state; readiness reports it.
  struct LocalProbeError {
    std::string message;  // "" when there was none
    int64_t time_ms = 0;
    int64_t count = 0;
  };
  const LocalProbeError& local_probe_error() const { return local_probe_error_; }

  // What an artifact file is (inode, size, ctime): any write to it or replacement of it changes
  // this, so bytes verified under one identity are still those bytes while it holds.
  struct FileIdentity {
    uint64_t inode = 0;
    int64_t size = 0;
    int64_t ctime_ns = 0;
    friend bool operator==(const FileIdentity&, const FileIdentity&) = default;
  };
  static std::optional<FileIdentity> IdentityOf(const std::filesystem::path& path);

  // Artifact digests the live instances run (what a periodic verification checks).
  std::vector<std::string> ArtifactsInUse();
  // The result of verifying one artifact's bytes off the event thread, with the file's identity
  // taken before hashing: a mismatch is drift (restored from its source when it still has those
  // bytes; the instances running it are replaced).
  void OnArtifactVerified(const std::string& digest, const Status& verified,
                          std::optional<FileIdentity> identity);

 private:
  int64_t NowMs() const { return ToUnixMillis(clock_.SystemNow()); }
  Status Event(EventKind kind, const std::string& service, int64_t revision,
               const std::string& instance, const std::string& actor, const std::string& message);
  StatusOr<std::string> HashOf(const std::string& service, int64_t revision);
  // The artifact digest a revision runs ("" for an image).
  StatusOr<std::string> ArtifactOf(const std::string& service, int64_t revision);
  // Whether the manifest declares a template the service has no revision of yet (its artifact
  // then goes into the store before the pass).
  StatusOr<bool> DeclaresNewTemplate(const DesiredService& desired);
  // What Decide needs for one pass of service `name` (`desired` null: not declared), with how
  // putting a new template's artifact went. A steady pass (its rollout finished) reads no more
  // than the service, its target and its live instances.
  StatusOr<PassInput> LoadPassInput(const std::string& name, const DesiredService* desired,
                                    Status artifact, int64_t now);
  Status WriteRollbackRevision(ServiceRecord& svc, const RevisionRecord& from,
                               const std::string& reason, const std::string& actor,
                               RevisionRecord* written);
  // history_limit: deletes revisions beyond the newest `limit`, never the target, desired,
  // pinned or last available one, nor one a live instance runs.
  // Returns how many revisions it deleted.
  StatusOr<int> PruneHistory(const ServiceRecord& svc, int64_t target_rev, int limit);
  // Removes artifacts no retained revision of any service references.
  void CollectArtifacts();
  StatusOr<int64_t> LastAvailableRevision(const std::string& service,
                                          const std::string& except_hash);
  void StartInstance(const InstanceRecord& inst);
  void StopInstance(const InstanceRecord& inst, bool mark_terminated);
  // Stops a draining instance, once: StopInstance(inst, true) unless a stop is already under way.
  void IssueStop(const InstanceRecord& inst);
  // The service's stable address as its manifest declares it, else as last recorded (a service
  // no longer declared keeps its address until it is retired); nullopt when it has none.
  std::optional<ExposeSpec> ExposeOf(const std::string& name, const DesiredService* desired,
                                     const std::string& stored_spec);
  // Publishes the pool of an exposed service (`listening`), or that it has none; then stops each
  // draining instance no proxy has a connection open to, or whose `drain` has passed, and wakes
  // the service for the rest. `now` is the pass's time.
  Status PublishAndDrain(const std::string& name, const std::optional<ExposeSpec>& expose,
                         bool listening, int64_t min_healthy_ms, int64_t now);
  // Whether a draining instance may be stopped now, and why ("" = not yet).
  std::string DrainDone(const InstanceRecord& inst, const ExposeSpec& expose, int64_t now,
                        int64_t* deadline);
  StatusOr<std::string> VersionOf(const std::string& service, int64_t revision);
  void WatchHealth(const InstanceRecord& inst, const Template& tmpl);
  void OnExit(const ExitInfo& info);
  // Records an exit; false when the store refused (it is retried on the next pass).
  bool RecordExit(const ExitInfo& info);
  // Drift of the artifact in the store (its bytes no longer match its digest): restores it from
  // the manifest's source when that still has those bytes and flags the instances running it
  // for replacement. Hashed again only when the file changed since it was last verified (see
  // FileIdentity); periodic verification hashes everything (OnArtifactVerified). An error
  // means: do not start instances from it now.
  Status CheckArtifact(const std::string& service, const std::string& digest);
  void OnProbe(const ProbeResult& r);
  // After a failure was counted: a service at two or more failures in a row is crash-looping
  // (its starts are delayed); says so in the log, once per failure or pass.
  void WarnIfCrashLooping(const ServiceRecord& svc, int64_t now);
  // Records a failure of one of the service's instances (exit, start error, failing health) on
  // its record (CountFailure); the next pass decides the back-off that follows.
  Status RecordFailure(const std::string& service, const std::string& what, bool permanent = false,
                       int64_t revision = 0);
  // Whether an artifact still has the bytes last verified (same inode, size and ctime: any
  // write or replacement changes ctime); false when it was never verified by this kilnd.
  bool ArtifactUnchanged(const std::string& digest) const;
  void RememberVerified(const std::string& digest, std::optional<FileIdentity> identity);
  // Handles bytes that no longer match their digest (`mismatch` says how); see CheckArtifact.
  Status HandleArtifactDrift(const std::string& digest, const Status& mismatch);
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
  // What each artifact file was when its bytes were last verified.
  std::map<std::string, FileIdentity> artifact_verified_;
  // The last probe result written for each instance, so a steady probe writes nothing.
  std::map<std::string, std::pair<bool, std::string>> probe_written_;
  LocalProbeError local_probe_error_;
  // Services in a crash loop: their instances' repeated lifecycle events are aggregated.
  std::set<std::string> crash_looping_;
  // The manifest errors last logged, so an unchanged broken state is not logged on every load.
  std::vector<std::string> logged_manifest_errors_;
  // A cache of the store: the template hash of each service's desired revision as last
  // committed (only a pass changes it), so that a steady pass need not read the service twice
  // to know whether its manifest declares a new template.
  std::map<std::string, std::string> desired_hash_;
  // Draining instances whose stop was handed to the driver (a pass never stops one twice).
  std::set<std::string> stop_issued_;
  // Services with a draining instance waiting for proxies: a proxy's report wakes them.
  std::set<std::string> draining_services_;
  // Services whose pool is published (so that one losing its address is unpublished).
  std::set<std::string> published_;
  // The `version` of each (service, revision) a pool names: revisions never change.
  std::map<std::pair<std::string, int64_t>, std::string> version_cache_;
};

}  // namespace kiln
