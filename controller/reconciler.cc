#include "controller/reconciler.h"

#include <sys/stat.h>

#include <algorithm>
#include <set>
#include <utility>

#include "common/duration.h"
#include "common/logging.h"
#include "common/unique_fd.h"
#include "controller/decide.h"

namespace kiln {
namespace {

InstanceSpec SpecFor(const InstanceRecord& inst, const Template& t) {
  InstanceSpec s;
  s.instance = inst.name;
  s.service = inst.service;
  s.revision = inst.revision;
  s.artifact_sha256 = t.artifact_sha256;
  s.image = t.image;
  s.command = t.command;
  s.env = t.env;
  s.container_port = t.port;
  s.hosts = t.hosts;
  return s;
}

// Failure kinds are aggregated always; the rest of an instance's lifecycle only while its
// service crash-loops (a normal rollout's events stay one by one).
bool IsFailureEvent(EventKind kind) {
  return kind == EventKind::kInstanceExited || kind == EventKind::kInstanceStartFailed ||
         kind == EventKind::kInstanceFailed || kind == EventKind::kInstanceUnhealthy ||
         kind == EventKind::kArtifactDrift;
}
bool IsLifecycleEvent(EventKind kind) {
  return kind == EventKind::kInstanceCreated || kind == EventKind::kInstanceStarted ||
         kind == EventKind::kInstanceDraining || kind == EventKind::kInstanceDrained ||
         kind == EventKind::kInstanceTerminated || kind == EventKind::kInstanceHealthy;
}

// What makes two events "the same thing again": kind, revision and message, with the instance
// name and port numbers (which change with every new instance) left out.
std::string AggregateKey(EventKind kind, int64_t revision, const std::string& instance,
                         std::string message) {
  if (!instance.empty()) {
    for (size_t at = message.find(instance); at != std::string::npos;
         at = message.find(instance, at + 1)) {
      message.replace(at, instance.size(), "*");
    }
  }
  std::string key = std::string(EventKindName(kind)) + "|" + std::to_string(revision) + "|";
  for (size_t i = 0; i < message.size(); ++i) {
    // "port 20001" and "127.0.0.1:20001": ports are not what makes a failure different.
    const bool after_port =
        (i >= 5 && message.compare(i - 5, 5, "port ") == 0) || (i >= 1 && message[i - 1] == ':');
    if (after_port && std::isdigit(static_cast<unsigned char>(message[i]))) {
      while (i < message.size() && std::isdigit(static_cast<unsigned char>(message[i]))) ++i;
      key += '#';
      if (i < message.size()) key += message[i];
      continue;
    }
    key += message[i];
  }
  return key;
}

DecideOptions DecideOptionsOf(const Reconciler::Options& o) {
  return {o.retire_after, o.crash_backoff_initial, o.crash_backoff_max,
          o.crash_backoff_reset_after};
}

// A driver's start error that retrying cannot fix (see Driver::Start).
bool IsPermanentStartError(const Status& s) { return s.code() == StatusCode::kInvalidArgument; }

}  // namespace

Reconciler::Reconciler(StateStore& store, Driver& driver, HealthWatcher& prober,
                       ArtifactStore& artifacts, const Clock& clock, PassScheduler& scheduler,
                       Options options)
    : store_(store),
      driver_(driver),
      prober_(prober),
      artifacts_(artifacts),
      clock_(clock),
      scheduler_(scheduler),
      options_(std::move(options)) {
  driver_.SetExitCallback([this](const ExitInfo& e) { OnExit(e); });
}

std::string Reconciler::ServiceOf(const std::string& instance) {
  size_t dash = instance.rfind('-');
  return dash == std::string::npos ? instance : instance.substr(0, dash);
}

Status Reconciler::Event(EventKind kind, const std::string& service, int64_t revision,
                         const std::string& instance, const std::string& actor,
                         const std::string& message) {
  EventRecord e;
  e.kind = kind;
  e.service = service;
  e.revision = revision;
  e.instance = instance;
  e.actor = actor;
  e.message = message;
  if (IsFailureEvent(kind) || (IsLifecycleEvent(kind) && crash_looping_.count(service))) {
    e.aggregate_key = AggregateKey(kind, revision, instance, message);
  }
  LogInfo(message, {{"event", EventKindName(kind)},
                    {"service", service},
                    {"revision", revision},
                    {"instance", instance},
                    {"actor", actor}});
  RETURN_IF_ERROR(store_.AppendEvent(e).status());
  // Metrics and webhooks see an event only once it is durable: a pass whose commit fails (a full
  // disk) leaves no trace there either.
  if (options_.on_event) {
    store_.AfterCommit([this, e = std::move(e)] { options_.on_event(e); });
  }
  return Status::Ok();
}

StatusOr<std::string> Reconciler::HashOf(const std::string& service, int64_t revision) {
  // Revisions are immutable, so their hashes can be remembered.
  auto key = std::make_pair(service, revision);
  auto it = hash_cache_.find(key);
  if (it != hash_cache_.end()) return it->second;
  ASSIGN_OR_RETURN(RevisionRecord r, store_.GetRevision(service, revision));
  hash_cache_.emplace(key, r.template_hash);
  return r.template_hash;
}

std::vector<std::string> Reconciler::ServiceNames() const {
  std::set<std::string> names;
  for (const auto& [name, d] : desired_.services()) names.insert(name);
  auto services = store_.ListServices();
  if (services.ok()) {
    for (const auto& s : *services) {
      if (!s.retired) names.insert(s.name);
    }
  }
  return {names.begin(), names.end()};
}

// ---------------------------------------------------------------------------------------------
// Start-up

Status Reconciler::Recover() {
  // The last good desired state, for services whose file is broken or gone at start-up.
  ASSIGN_OR_RETURN(auto services, store_.ListServices());
  std::vector<DesiredService> seed;
  for (const ServiceRecord& s : services) {
    if (s.retired || s.spec.empty()) continue;
    StatusOr<ServiceSpec> spec = ServiceSpecFromJson(s.spec);
    if (spec.ok()) seed.emplace_back(*spec, "", "");
  }
  desired_.Seed(std::move(seed));

  ASSIGN_OR_RETURN(auto running, driver_.List());
  std::map<std::string, RunningInstance> by_name;
  for (auto& r : running) by_name[r.handle.instance] = r;

  ASSIGN_OR_RETURN(auto live, store_.ListLiveInstances());
  std::set<std::string> known;
  int adopted_count = 0, lost_count = 0, never_started = 0, stopped_while_down = 0;
  int unknown_count = 0;
  for (const InstanceRecord& inst : live) {
    known.insert(inst.name);
    auto found = by_name.find(inst.name);
    InstanceHandle handle{inst.name, inst.handle, inst.host, inst.port, inst.pid};
    // The recorded handle (the leader's pid + start time) is the instance: what List() found
    // under its name stands in only when none was recorded (started, but kilnd stopped before
    // recording it). A leader that is gone is gone even if processes it left behind run; the
    // driver kills those when asked to adopt it.
    if (found != by_name.end() && inst.handle.empty()) handle = found->second.handle;
    const Status adopt = handle.id.empty() ? NotFoundError("no handle") : driver_.Adopt(handle);
    const bool adopted = adopt.ok();
    // FAILED_PRECONDITION: the driver cannot reach where it runs (a Docker host this kilnd is
    // not configured with); it is left running there, and that is said loudly.
    const bool unreachable = adopt.code() == StatusCode::kFailedPrecondition;
    // UNAVAILABLE: where it runs is down (a Docker host marked down).
    const bool reached_no_driver = unreachable || adopt.code() == StatusCode::kUnavailable;
    if (unreachable) {
      LogError("instance left running where this kilnd cannot reach it",
               {{"service", inst.service},
                {"revision", inst.revision},
                {"instance", inst.name},
                {"error", adopt.message()}});
    }
    adopted_count += adopted;
    lost_count +=
        !adopted && inst.state != InstanceState::kPending && inst.state != InstanceState::kDraining;
    never_started += !adopted && inst.state == InstanceState::kPending;
    stopped_while_down += !adopted && inst.state == InstanceState::kDraining;
    Status s;
    if (inst.state == InstanceState::kPending) {
      if (adopted) {
        InstanceUpdate u;
        u.reason = "adopted after a restart of kilnd";
        u.handle = handle.id;
        u.pid = handle.pid;
        u.host = handle.host;
        u.port = handle.port;
        s = store_.Transaction([&]() -> Status {
          RETURN_IF_ERROR(
              store_.TransitionInstance(inst.name, InstanceState::kStarting, u).status());
          return Event(EventKind::kInstanceAdopted, inst.service, inst.revision, inst.name, "kilnd",
                       "instance " + inst.name + " was started before kilnd stopped; adopted");
        });
      } else {
        s = store_.Transaction([&]() -> Status {
          RETURN_IF_ERROR(store_
                              .TransitionInstance(inst.name, InstanceState::kFailed,
                                                  {.reason = "never started: kilnd stopped first"})
                              .status());
          return Event(EventKind::kInstanceFailed, inst.service, inst.revision, inst.name, "kilnd",
                       "instance " + inst.name + " was never started (kilnd stopped first)");
        });
      }
    } else if (inst.state == InstanceState::kDraining) {
      const DesiredService* d = desired_.Find(inst.service);
      if (adopted && options_.endpoints != nullptr && d != nullptr && d->spec.expose) {
        // Its drain goes on: the first pass stops it once no proxy routes to it.
      } else if (adopted) {
        IssueStop(inst);
      } else {
        s = store_.Transaction([&]() -> Status {
          RETURN_IF_ERROR(store_
                              .TransitionInstance(inst.name, InstanceState::kTerminated,
                                                  {.reason = "stopped while kilnd was down"})
                              .status());
          return Event(EventKind::kInstanceTerminated, inst.service, inst.revision, inst.name,
                       "kilnd", "instance " + inst.name + " stopped");
        });
      }
    } else if (!adopted) {
      s = store_.Transaction([&]() -> Status {
        RETURN_IF_ERROR(
            store_
                .TransitionInstance(
                    inst.name, InstanceState::kLost,
                    {.reason = reached_no_driver ? adopt.message() : "gone while kilnd was down"})
                .status());
        return Event(EventKind::kInstanceLost, inst.service, inst.revision, inst.name, "kilnd",
                     reached_no_driver
                         ? "instance " + inst.name + " lost: " + adopt.message()
                         : "instance " + inst.name + " was gone after kilnd restarted");
      });
    }
    RETURN_IF_ERROR(s);
    if (adopted && inst.state != InstanceState::kDraining) {
      auto rev = store_.GetRevision(inst.service, inst.revision);
      auto tmpl =
          rev.ok() ? Template::FromCanonical(rev->template_json) : StatusOr<Template>(rev.status());
      if (tmpl.ok()) {
        InstanceRecord watched = inst;
        watched.host = handle.host;
        watched.port = handle.port;
        WatchHealth(watched, *tmpl);
      }
    }
    scheduler_.Add(inst.service);
  }
  // Running with our identity but unknown to the store (or already final there): stop it.
  for (const auto& [name, r] : by_name) {
    if (known.count(name)) continue;
    LogWarn("stopping an instance unknown to the store",
            {{"instance", name}, {"service", r.service}, {"revision", r.revision}});
    driver_.Stop(r.handle, options_.stop_grace, [](const StatusOr<ExitInfo>&) {});
    (void)Event(EventKind::kUnknownInstanceStopped, r.service, r.revision, name, "kilnd",
                "instance " + name + " ran with kiln's identity but was not in the store; stopped");
    ++unknown_count;
  }
  // One line for whoever reads the log after a restart; the events say which instance.
  LogInfo("start-up recovery done", {{"adopted", adopted_count},
                                     {"lost", lost_count},
                                     {"never_started", never_started},
                                     {"stopped_while_down", stopped_while_down},
                                     {"unknown_stopped", unknown_count}});
  for (const auto& name : ServiceNames()) scheduler_.Add(name);
  // The pools as recorded, before any proxy is served a snapshot: a proxy that reconnects to a
  // restarted kilnd must find every address it served, never a partial view.
  if (options_.endpoints != nullptr) {
    const int64_t now = NowMs();
    for (const ServiceRecord& s : services) {
      if (s.spec.empty()) continue;
      StatusOr<ServiceSpec> spec = ServiceSpecFromJson(s.spec);
      if (!spec.ok() || !spec->expose) continue;
      Status p = PublishAndDrain(s.name, spec->expose, !s.retired,
                                 spec->update.min_healthy_time.count(), now);
      if (!p.ok()) {
        LogError("cannot publish a pool", {{"service", s.name}, {"error", p.ToString()}});
      }
    }
    options_.endpoints->MarkReady();
  }
  return Status::Ok();
}

void Reconciler::ApplyManifests(const ManifestSet& set) {
  DesiredSet::Update update = desired_.Apply(set);
  manifests_loaded_ = true;
  // A broken or missing directory is reloaded on every retry: say what is wrong once per change.
  if (update.errors != logged_manifest_errors_) {
    for (const std::string& e : update.errors) LogError("manifest error", {{"error", e}});
    if (update.errors.empty() && !logged_manifest_errors_.empty())
      LogInfo("manifest errors resolved");
    logged_manifest_errors_ = update.errors;
  }
  for (const std::string& name : update.changed) scheduler_.Add(name);
}

// ---------------------------------------------------------------------------------------------
// Driver and prober callbacks: record, then enqueue.

Status Reconciler::RecordHostEvent(const std::string& host, bool up, const std::string& message) {
  Status s = store_.Transaction([&]() -> Status {
    return Event(up ? EventKind::kHostUp : EventKind::kHostDown, "", 0, "", "kilnd", message);
  });
  if (!s.ok()) {
    LogError("cannot record a host event", {{"docker_host", host}, {"error", s.ToString()}});
  }
  // A host that comes back can take instances again: every service looks.
  if (up) {
    for (const auto& name : ServiceNames()) scheduler_.Add(name);
  }
  return s;
}

void Reconciler::OnExit(const ExitInfo& info) {
  prober_.Unwatch(info.instance);
  probe_written_.erase(info.instance);
  if (!RecordExit(info)) unrecorded_exits_[info.instance] = info;
  scheduler_.Add(ServiceOf(info.instance));
}

bool Reconciler::RecordExit(const ExitInfo& info) {
  const std::string service = ServiceOf(info.instance);
  Status s = store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(InstanceRecord inst, store_.GetInstance(info.instance));
    if (!IsLive(inst.state)) return Status::Ok();
    InstanceUpdate u;
    u.reason = info.Describe();
    u.exit_code = info.exit_code;
    if (info.signal) u.exit_signal = "signal " + std::to_string(*info.signal);
    InstanceState to = inst.state == InstanceState::kDraining ? InstanceState::kTerminated
                                                              : InstanceState::kFailed;
    if (info.lost && to == InstanceState::kFailed) {
      // Unreachable, not failed: replaced like one, but no crash of the service.
      to = InstanceState::kLost;
      RETURN_IF_ERROR(store_.TransitionInstance(inst.name, to, u).status());
      return Event(EventKind::kInstanceLost, service, inst.revision, inst.name, "kilnd",
                   "instance " + inst.name + " " + u.reason);
    }
    RETURN_IF_ERROR(store_.TransitionInstance(inst.name, to, u).status());
    if (to == InstanceState::kFailed) {
      RETURN_IF_ERROR(RecordFailure(service, inst.name + " " + u.reason));
    }
    return Event(
        to == InstanceState::kFailed ? EventKind::kInstanceExited : EventKind::kInstanceTerminated,
        service, inst.revision, inst.name, "kilnd", "instance " + inst.name + " " + u.reason);
  });
  if (!s.ok()) {
    LogError("cannot record an exit; will retry",
             {{"instance", info.instance}, {"error", s.ToString()}});
  }
  return s.ok();
}

void Reconciler::WarnIfCrashLooping(const ServiceRecord& svc, int64_t now) {
  if (svc.crash_count < 2) return;
  crash_looping_.insert(svc.name);
  LogWarn("crash-looping; delaying the next start",
          {{"service", svc.name},
           {"failures", svc.crash_count},
           {"last_failure", svc.crash_reason},
           {"next_start_in_ms", NextStartMs(svc, DecideOptionsOf(options_)) - now}});
}

Status Reconciler::RecordFailure(const std::string& service, const std::string& what,
                                 bool permanent, int64_t revision) {
  return store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    const int64_t now = NowMs();
    CountFailure(svc, what, now, permanent, revision);
    WarnIfCrashLooping(svc, now);
    return store_.PutService(svc);
  });
}

std::optional<Reconciler::FileIdentity> Reconciler::IdentityOf(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileIdentity{static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
                      st.st_ctim.tv_sec * 1'000'000'000LL + st.st_ctim.tv_nsec};
}

bool Reconciler::ArtifactUnchanged(const std::string& digest) const {
  auto it = artifact_verified_.find(digest);
  if (it == artifact_verified_.end()) return false;
  std::optional<FileIdentity> now = IdentityOf(artifacts_.PathFor(digest));
  return now && *now == it->second;
}

void Reconciler::RememberVerified(const std::string& digest, std::optional<FileIdentity> identity) {
  if (identity) {
    artifact_verified_[digest] = *identity;
  } else {
    artifact_verified_.erase(digest);
  }
}

Status Reconciler::CheckArtifact(const std::string& service, const std::string& digest) {
  // On every start: a stat tells whether the bytes verified before are still there; they are
  // hashed again only when the file changed (or was never verified by this kilnd).
  if (ArtifactUnchanged(digest)) return Status::Ok();
  std::optional<FileIdentity> before = IdentityOf(artifacts_.PathFor(digest));
  Status v = artifacts_.Verify(digest);
  if (v.ok()) {
    RememberVerified(digest, before);
    return Status::Ok();
  }
  LogWarn("artifact no longer matches its digest",
          {{"service", service}, {"sha256", digest}, {"error", v.message()}});
  return HandleArtifactDrift(digest, v);
}

StatusOr<std::string> Reconciler::ArtifactOf(const std::string& service, int64_t revision) {
  ASSIGN_OR_RETURN(RevisionRecord r, store_.GetRevision(service, revision));
  ASSIGN_OR_RETURN(Template t, Template::FromCanonical(r.template_json));
  return t.artifact_sha256;
}

std::vector<std::string> Reconciler::ArtifactsInUse() {
  // What runs, not what the manifests declare: a new template's artifact is stored (and hashed
  // while copied) only when its revision is written.
  std::set<std::string> digests;
  auto live = store_.ListLiveInstances();
  if (live.ok()) {
    std::set<std::pair<std::string, int64_t>> seen;
    for (const InstanceRecord& inst : *live) {
      if (!seen.insert({inst.service, inst.revision}).second) continue;
      StatusOr<std::string> digest = ArtifactOf(inst.service, inst.revision);
      if (digest.ok() && !digest->empty()) digests.insert(*digest);
    }
  }
  return {digests.begin(), digests.end()};
}

void Reconciler::OnArtifactVerified(const std::string& digest, const Status& verified,
                                    std::optional<FileIdentity> identity) {
  if (verified.ok()) {
    RememberVerified(digest, identity);
    return;
  }
  if (verified.code() == StatusCode::kNotFound && !identity) {
    // Collected since it was listed (history_limit), or never stored: nothing runs it.
    auto in_use = ArtifactsInUse();
    if (std::find(in_use.begin(), in_use.end(), digest) == in_use.end()) return;
  }
  LogWarn("periodic verification: artifact no longer matches its digest",
          {{"sha256", digest}, {"error", verified.message()}});
  Status s = HandleArtifactDrift(digest, verified);
  if (!s.ok())
    LogError("artifact drift not repaired", {{"sha256", digest}, {"error", s.ToString()}});
}

Status Reconciler::HandleArtifactDrift(const std::string& digest, const Status& mismatch) {
  artifact_verified_.erase(digest);
  // Restore it from a manifest source that still has exactly those bytes.
  Status restored = FailedPreconditionError("no manifest source has these bytes");
  for (const auto& [name, d] : desired_.services()) {
    if (d.spec.tmpl.artifact_sha256 != digest || d.spec.artifact_path.empty()) continue;
    std::error_code ec;
    std::filesystem::remove(artifacts_.PathFor(digest), ec);
    StatusOr<std::string> put = artifacts_.Put(d.spec.artifact_path, digest);
    restored = put.status();
    if (put.ok()) break;
  }
  const std::string what =
      mismatch.message() +
      (restored.ok() ? "; restored from its source" : "; cannot restore: " + restored.message());
  std::set<std::string> affected;
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    // Instances started from the altered bytes are drifted: replace them.
    ASSIGN_OR_RETURN(auto live, store_.ListLiveInstances());
    std::map<std::pair<std::string, int64_t>, std::string> digest_of;
    for (const auto& inst : live) {
      auto key = std::make_pair(inst.service, inst.revision);
      if (!digest_of.count(key)) {
        ASSIGN_OR_RETURN(digest_of[key], ArtifactOf(inst.service, inst.revision));
      }
      if (digest_of[key] != digest) continue;
      affected.insert(inst.service);
      // Pending ones have not run anything yet; they start from the restored bytes.
      if (inst.replace_reason.empty() && inst.state != InstanceState::kDraining &&
          inst.state != InstanceState::kPending) {
        RETURN_IF_ERROR(
            store_.RequestReplacement(inst.name, "artifact drift: " + mismatch.message()));
      }
    }
    for (const auto& [name, d] : desired_.services()) {
      if (d.spec.tmpl.artifact_sha256 == digest) affected.insert(name);
    }
    if (affected.empty()) return Event(EventKind::kArtifactDrift, "", 0, "", "kilnd", what);
    for (const std::string& service : affected) {
      RETURN_IF_ERROR(Event(EventKind::kArtifactDrift, service, 0, "", "kilnd", what));
    }
    return Status::Ok();
  }));
  for (const std::string& service : affected) scheduler_.Add(service);
  if (!restored.ok()) return DataLossError(what);
  RememberVerified(digest, IdentityOf(artifacts_.PathFor(digest)));
  return Status::Ok();
}

void Reconciler::OnProbe(const ProbeResult& r) {
  const std::string service = ServiceOf(r.instance);
  if (options_.on_probe) options_.on_probe(service, r);
  if (r.local_error) {
    // kilnd could not run the probe (no descriptors, no memory): that says nothing about the
    // instance. No transition; a kilnd-level condition instead.
    if (local_probe_error_.message != r.reason) {
      LogWarn("cannot run health probes; instances keep their state",
              {{"instance", r.instance}, {"service", service}, {"error", r.reason}});
    }
    local_probe_error_ = {r.reason, NowMs(), local_probe_error_.count + 1};
    return;
  }
  if (!local_probe_error_.message.empty()) {
    LogInfo("health probes run again", {{"after_local_errors", local_probe_error_.count}});
    local_probe_error_ = {};
  }
  auto written = probe_written_.find(r.instance);
  const bool changed = written == probe_written_.end() || written->second.first != r.healthy ||
                       written->second.second != r.reason;
  if (!changed && !r.transition) return;  // a steady probe writes nothing
  Status s = store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(InstanceRecord inst, store_.GetInstance(r.instance));
    if (!IsLive(inst.state)) return Status::Ok();
    if (changed) RETURN_IF_ERROR(store_.RecordProbe(inst.name, r.healthy, r.reason, NowMs()));
    if (!r.transition) return Status::Ok();
    if (r.healthy &&
        (inst.state == InstanceState::kStarting || inst.state == InstanceState::kUnhealthy)) {
      RETURN_IF_ERROR(
          store_.TransitionInstance(inst.name, InstanceState::kHealthy, {.reason = r.reason})
              .status());
      return Event(EventKind::kInstanceHealthy, service, inst.revision, inst.name, "kilnd",
                   "instance " + inst.name + " is healthy: " + r.reason);
    }
    if (!r.healthy && inst.state == InstanceState::kHealthy) {
      RETURN_IF_ERROR(
          store_.TransitionInstance(inst.name, InstanceState::kUnhealthy, {.reason = r.reason})
              .status());
      // Failing health past its threshold is drift: the instance is replaced, never restarted.
      RETURN_IF_ERROR(store_.RequestReplacement(inst.name, "health failing: " + r.reason));
      RETURN_IF_ERROR(RecordFailure(service, inst.name + " failed health: " + r.reason));
      return Event(EventKind::kInstanceUnhealthy, service, inst.revision, inst.name, "kilnd",
                   "instance " + inst.name + " is unhealthy: " + r.reason + "; replacing it");
    }
    return Status::Ok();
  });
  if (!s.ok()) {
    LogError("cannot record a probe result", {{"instance", r.instance}, {"error", s.ToString()}});
  } else {
    probe_written_[r.instance] = {r.healthy, r.reason};
  }
  if (r.transition || !s.ok()) scheduler_.Add(service);
}

// ---------------------------------------------------------------------------------------------
// Acting on the driver, after the intent is committed.

void Reconciler::WatchHealth(const InstanceRecord& inst, const Template& tmpl) {
  ProbeTarget t;
  t.instance = inst.name;
  t.check = tmpl.health;
  t.host = inst.host.empty() ? "127.0.0.1" : inst.host;
  t.port = inst.port;
  if (tmpl.health.kind == ProbeKind::kExec) {  // only an exec probe has an environment
    t.env = tmpl.env;
    t.env["PORT"] = std::to_string(inst.port);
    t.env["KILN_INSTANCE"] = inst.name;
    t.env["KILN_SERVICE"] = inst.service;
  }
  prober_.Watch(t, [this](const ProbeResult& r) { OnProbe(r); });
}

void Reconciler::StartInstance(const InstanceRecord& inst) {
  StatusOr<RevisionRecord> rev = store_.GetRevision(inst.service, inst.revision);
  StatusOr<Template> tmpl =
      rev.ok() ? Template::FromCanonical(rev->template_json) : StatusOr<Template>(rev.status());
  if (!tmpl.ok()) {
    LogError("cannot start: template unreadable",
             {{"instance", inst.name}, {"error", tmpl.status().ToString()}});
    return;
  }
  start_in_flight_.insert(inst.name);
  driver_.Start(SpecFor(inst, *tmpl), [this, inst, t = *tmpl](StatusOr<InstanceHandle> h) {
    start_in_flight_.erase(inst.name);
    Status s;
    if (!h.ok()) {
      const bool permanent = IsPermanentStartError(h.status());
      s = store_.Transaction([&]() -> Status {
        RETURN_IF_ERROR(store_
                            .TransitionInstance(inst.name, InstanceState::kFailed,
                                                {.reason = h.status().message()})
                            .status());
        RETURN_IF_ERROR(
            RecordFailure(inst.service, h.status().message(), permanent, inst.revision));
        return Event(EventKind::kInstanceStartFailed, inst.service, inst.revision, inst.name,
                     "kilnd", h.status().message() + (permanent ? " (retrying cannot help)" : ""));
      });
    } else {
      InstanceUpdate u;
      u.reason = "started";
      u.handle = h->id;
      u.pid = h->pid;
      u.host = h->host;
      u.port = h->port;
      s = store_.Transaction([&]() -> Status {
        RETURN_IF_ERROR(store_.TransitionInstance(inst.name, InstanceState::kStarting, u).status());
        // It could start after all (say, the command's executable was installed): the start
        // error no longer holds.
        ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(inst.service));
        if (!svc.start_error.empty() && svc.start_error_revision == inst.revision) {
          svc.start_error.clear();
          svc.start_error_revision = 0;
          RETURN_IF_ERROR(store_.PutService(svc));
        }
        return Event(EventKind::kInstanceStarted, inst.service, inst.revision, inst.name, "kilnd",
                     "instance " + inst.name + " started on port " + std::to_string(h->port));
      });
      if (!s.ok()) unrecorded_starts_[inst.name] = *h;
      InstanceRecord started = inst;
      started.host = h->host;
      started.port = h->port;
      WatchHealth(started, t);
    }
    if (!s.ok())
      LogError("cannot record a start", {{"instance", inst.name}, {"error", s.ToString()}});
    scheduler_.Add(inst.service);
  });
}

void Reconciler::StopInstance(const InstanceRecord& inst, bool mark_terminated) {
  prober_.Unwatch(inst.name);
  probe_written_.erase(inst.name);
  InstanceHandle handle{inst.name, inst.handle, inst.host, inst.port, inst.pid};
  if (handle.id.empty()) {
    auto it = unrecorded_starts_.find(inst.name);
    if (it != unrecorded_starts_.end()) handle = it->second;
  }
  auto finish = [this, inst, mark_terminated](StatusOr<ExitInfo> r) {
    unrecorded_starts_.erase(inst.name);
    stop_issued_.erase(inst.name);
    if (options_.endpoints) options_.endpoints->Forget(inst.name);
    if (!mark_terminated) return;
    Status s = store_.Transaction([&]() -> Status {
      ASSIGN_OR_RETURN(InstanceRecord now, store_.GetInstance(inst.name));
      if (now.state != InstanceState::kDraining) return Status::Ok();
      InstanceUpdate u;
      u.reason = r.ok() ? "stopped: " + r->Describe() : r.status().message();
      RETURN_IF_ERROR(store_.TransitionInstance(inst.name, InstanceState::kTerminated, u).status());
      return Event(EventKind::kInstanceTerminated, inst.service, inst.revision, inst.name, "kilnd",
                   "instance " + inst.name + " " + u.reason);
    });
    if (!s.ok())
      LogError("cannot record a stop", {{"instance", inst.name}, {"error", s.ToString()}});
    scheduler_.Add(inst.service);
  };
  if (handle.id.empty()) {
    finish(ExitInfo{inst.name, std::nullopt, std::nullopt, false});  // never ran
    return;
  }
  driver_.Stop(handle, options_.stop_grace, finish);
}

void Reconciler::RetryUnrecordedStarts(const std::string& service) {
  for (auto it = unrecorded_starts_.begin(); it != unrecorded_starts_.end();) {
    if (ServiceOf(it->first) != service) {
      ++it;
      continue;
    }
    InstanceUpdate u;
    u.reason = "started";
    u.handle = it->second.id;
    u.pid = it->second.pid;
    u.host = it->second.host;
    u.port = it->second.port;
    auto cur = store_.GetInstance(it->first);
    if (cur.ok() && cur->state == InstanceState::kPending &&
        store_.TransitionInstance(it->first, InstanceState::kStarting, u).ok()) {
      it = unrecorded_starts_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The pass

namespace {

// The instances in `before` that `after` no longer has.
std::vector<std::string> PrunedNames(const std::vector<InstanceRecord>& before,
                                     const std::vector<InstanceRecord>& after) {
  std::set<std::string> kept;
  for (const InstanceRecord& i : after) kept.insert(i.name);
  std::vector<std::string> gone;
  for (const InstanceRecord& i : before) {
    if (kept.count(i.name) == 0) gone.push_back(i.name);
  }
  return gone;
}

}  // namespace

StatusOr<int> Reconciler::PruneHistory(const ServiceRecord& svc, int64_t target_rev, int limit) {
  int deleted = 0;
  ASSIGN_OR_RETURN(auto revisions, store_.ListRevisions(svc.name));  // newest first
  std::set<int64_t> keep = {target_rev, svc.desired_revision, svc.pinned_revision};
  for (const auto& r : revisions) {
    // The last available revision other than the target: what a rollback goes back to.
    if (r.available_ms > 0 && r.number != target_rev) {
      keep.insert(r.number);
      break;
    }
  }
  ASSIGN_OR_RETURN(auto live, store_.ListInstances(svc.name, false));
  for (size_t i = 0; i < revisions.size(); ++i) {
    const RevisionRecord& r = revisions[i];
    if (static_cast<int>(i) < limit || keep.count(r.number)) continue;
    if (std::any_of(live.begin(), live.end(),
                    [&](const auto& l) { return l.revision == r.number; })) {
      continue;
    }
    RETURN_IF_ERROR(store_.DeleteFinalInstancesOf(svc.name, r.number).status());
    RETURN_IF_ERROR(store_.DeleteRevision(svc.name, r.number));
    hash_cache_.erase({svc.name, r.number});
    ++deleted;
    LogInfo("revision pruned by history_limit",
            {{"service", svc.name}, {"revision", r.number}, {"history_limit", limit}});
  }
  return deleted;
}

void Reconciler::CollectArtifacts() {
  auto services = store_.ListServices();
  if (!services.ok()) return;
  std::set<std::string> keep;
  for (const auto& s : *services) {
    auto revisions = store_.ListRevisions(s.name);
    if (!revisions.ok()) return;  // never collect on a partial view
    for (const auto& r : *revisions) {
      auto t = Template::FromCanonical(r.template_json);
      if (!t.ok()) return;
      if (!t->artifact_sha256.empty()) keep.insert(t->artifact_sha256);
    }
  }
  StatusOr<int> removed = artifacts_.Collect(keep);
  if (removed.ok() && *removed > 0) {
    LogInfo("artifacts collected",
            {{"removed", *removed}, {"kept", static_cast<int64_t>(keep.size())}});
  }
}

StatusOr<int64_t> Reconciler::LastAvailableRevision(const std::string& service,
                                                    const std::string& except_hash) {
  ASSIGN_OR_RETURN(auto revisions, store_.ListRevisions(service));
  for (const RevisionRecord& r : revisions) {  // newest first
    if (r.available_ms > 0 && r.template_hash != except_hash) return r.number;
  }
  return FailedPreconditionError("no earlier revision of " + service + " was ever fully available");
}

Status Reconciler::WriteRollbackRevision(ServiceRecord& svc, const RevisionRecord& from,
                                         const std::string& reason, const std::string& actor,
                                         RevisionRecord* written) {
  RevisionRecord r;
  r.service = svc.name;
  ASSIGN_OR_RETURN(r.number, store_.NextRevisionNumber(svc.name));
  r.template_hash = from.template_hash;
  r.template_json = from.template_json;
  r.source = RevisionSource::kRollback;
  r.actor = actor;
  r.reason = reason;
  r.rolled_back_from = from.number;
  RETURN_IF_ERROR(store_.WriteRevision(r));
  svc.pinned_revision = r.number;
  svc.pin_reason = PinReason(actor, reason);
  RETURN_IF_ERROR(Event(EventKind::kRolledBack, svc.name, r.number, "", actor,
                        svc.name + " rolled back to the template of revision " +
                            std::to_string(from.number) + " as revision " +
                            std::to_string(r.number) + "; pinned (" + svc.pin_reason + ")"));
  if (written) *written = r;
  return Status::Ok();
}

StatusOr<bool> Reconciler::DeclaresNewTemplate(const DesiredService& desired) {
  const std::string& name = desired.spec.name;
  auto known = desired_hash_.find(name);
  if (known != desired_hash_.end()) return known->second != desired.template_hash;
  StatusOr<ServiceRecord> svc = store_.GetService(name);
  if (!svc.ok()) {
    return svc.status().code() == StatusCode::kNotFound ? StatusOr<bool>(true) : svc.status();
  }
  if (svc->desired_revision == 0) return true;
  ASSIGN_OR_RETURN(std::string hash, HashOf(name, svc->desired_revision));
  return hash != desired.template_hash;
}

StatusOr<PassInput> Reconciler::LoadPassInput(const std::string& name,
                                              const DesiredService* desired, Status artifact,
                                              int64_t now) {
  PassInput in;
  in.now_ms = now;
  in.options = DecideOptionsOf(options_);
  StatusOr<ServiceRecord> existing = store_.GetService(name);
  if (!existing.ok() && existing.status().code() != StatusCode::kNotFound) {
    return existing.status();
  }
  in.service_exists = existing.ok();
  in.service = existing.ok() ? *std::move(existing) : ServiceRecord{.name = name};
  in.declared = desired != nullptr;
  if (!in.declared) {
    if (in.service_exists) {
      ASSIGN_OR_RETURN(in.instances, store_.ListInstances(name, false));
    }
    return in;
  }
  in.spec = desired->spec;
  in.template_hash = desired->template_hash;
  in.spec_json = desired->spec_json;
  in.manifest_sha256 = desired->manifest_sha256;
  in.manifest_commit = desired->commit.value_or(SourceCommit{});
  in.manifest_error = desired->error;
  in.artifact = std::move(artifact);
  const ServiceRecord& svc = in.service;
  if (svc.desired_revision > 0) {
    ASSIGN_OR_RETURN(in.desired_hash, HashOf(name, svc.desired_revision));
  }
  const int64_t stored_target =
      svc.pinned_revision > 0 ? svc.pinned_revision : svc.desired_revision;
  if (stored_target > 0) {
    ASSIGN_OR_RETURN(in.target, store_.GetRevision(name, stored_target));
    in.template_hashes[in.target.number] = in.target.template_hash;
  }
  ASSIGN_OR_RETURN(in.instances, store_.ListInstances(name, false));
  for (const InstanceRecord& inst : in.instances) {
    if (!in.template_hashes.count(inst.revision)) {
      ASSIGN_OR_RETURN(in.template_hashes[inst.revision], HashOf(name, inst.revision));
    }
  }
  StatusOr<RolloutRecord> latest = store_.GetLatestRollout(name);
  if (!latest.ok() && latest.status().code() != StatusCode::kNotFound) return latest.status();
  if (latest.ok()) in.rollout = *latest;
  // Only a new template, or a rollout in progress (or one this pass starts), can write a
  // revision: a steady pass reads no more than the live instances.
  if (in.NewTemplate() || !latest.ok() || latest->to_revision != stored_target ||
      IsActive(latest->state)) {
    ASSIGN_OR_RETURN(in.next_revision, store_.NextRevisionNumber(name));
    ASSIGN_OR_RETURN(auto revisions, store_.ListRevisions(name));  // newest first
    for (RevisionRecord& r : revisions) {
      if (r.available_ms == 0) continue;
      if (in.last_available.empty() || r.template_hash != in.last_available[0].template_hash) {
        in.last_available.push_back(std::move(r));
      }
      if (in.last_available.size() == 2) break;
    }
  }
  return in;
}

Status Reconciler::Reconcile(const std::string& name) {
  RetryUnrecordedStarts(name);
  for (auto it = unrecorded_exits_.begin(); it != unrecorded_exits_.end();) {
    if (ServiceOf(it->first) == name && RecordExit(it->second)) {
      it = unrecorded_exits_.erase(it);
    } else {
      ++it;
    }
  }
  const DesiredService* desired = desired_.Find(name);
  const int64_t now = NowMs();

  // A new template's artifact goes into the store before the transaction that writes its
  // revision: copying and hashing a file is no work to hold the write lock for.
  Status artifact;
  if (desired != nullptr && !desired->spec.artifact_path.empty()) {
    ASSIGN_OR_RETURN(bool new_template, DeclaresNewTemplate(*desired));
    if (new_template) {
      artifact =
          artifacts_.Put(desired->spec.artifact_path, desired->spec.tmpl.artifact_sha256).status();
    }
  }

  std::vector<InstanceRecord> to_start, to_stop, to_fail;
  int64_t next_deadline_ms = 0;
  bool requeue_now = false;
  bool collect_artifacts = false;
  std::string desired_hash;  // of the desired revision, once committed
  std::string stored_spec;   // the service's spec as recorded, for one no longer declared
  bool retired = false;
  std::vector<std::string> pruned_instances;  // final instance rows deleted by this pass

  Status committed = store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(PassInput in, LoadPassInput(name, desired, artifact, now));
    const std::vector<InstanceRecord>& live = in.instances;
    const std::optional<RolloutRecord>& latest = in.rollout;

    // Decide, then commit what was decided, in the order a pass always recorded it.
    ASSIGN_OR_RETURN(PassResult d, Decide(in));
    ServiceRecord& svc = d.service;
    const int64_t target_rev = d.target_revision;
    stored_spec = in.service.spec;
    retired = svc.retired;
    if (!in.service_exists && in.declared) {
      RETURN_IF_ERROR(store_.PutService({.name = name}));  // revisions reference it
    }
    if (d.revision) RETURN_IF_ERROR(store_.WriteRevision(*d.revision));
    if (in.declared) desired_hash = d.revision ? d.revision->template_hash : in.desired_hash;
    if (d.superseded) RETURN_IF_ERROR(store_.PutRollout(*d.superseded).status());
    RolloutRecord rollout = d.rollout;
    if (d.rollout_is_new) {
      ASSIGN_OR_RETURN(rollout.id, store_.PutRollout(rollout));
    } else if (latest && !(rollout == *latest)) {
      RETURN_IF_ERROR(store_.PutRollout(rollout).status());
    }
    for (const InstanceTransition& f : d.failed) {
      ASSIGN_OR_RETURN(InstanceRecord failed,
                       store_.TransitionInstance(f.instance, f.to, {.reason = f.reason}));
      to_fail.push_back(failed);
    }
    if (!d.failed.empty()) WarnIfCrashLooping(svc, now);
    if (!d.backoff_reset_by.empty()) {
      LogInfo("running well again; crash-loop back-off reset",
              {{"service", name}, {"instance", d.backoff_reset_by}});
    }
    if (svc.crash_count < 2) crash_looping_.erase(name);
    for (const PassEvent& e : d.events) {
      RETURN_IF_ERROR(Event(e.kind, name, e.revision, e.instance, e.actor, e.message));
    }
    if (d.mark_available) RETURN_IF_ERROR(store_.MarkRevisionAvailable(name, target_rev, now));
    if (d.rollback) {
      RevisionRecord written;
      RETURN_IF_ERROR(
          WriteRollbackRevision(svc, d.rollback->from, d.rollback->reason, "auto", &written));
      if (written.number != d.rollback->number) {
        return InternalError("rollback of " + name + " written as revision " +
                             std::to_string(written.number) + ", decided as " +
                             std::to_string(d.rollback->number));
      }
      requeue_now = true;
    }
    if (!d.no_rollback.empty()) {
      LogWarn("no revision to roll back to", {{"service", name}, {"error", d.no_rollback}});
    }

    // Intents committed by an earlier pass whose start never happened (the artifact was not
    // fit to run then): start them now, unless the step stops them.
    const std::vector<std::string>& destroy = d.plan.destroy;
    for (const InstanceRecord& inst : live) {
      if (inst.state == InstanceState::kPending && !start_in_flight_.count(inst.name) &&
          !unrecorded_starts_.count(inst.name) &&
          std::find(destroy.begin(), destroy.end(), inst.name) == destroy.end()) {
        to_start.push_back(inst);
      }
    }

    // The step: drain, then create, as intent.
    for (const InstanceTransition& t : d.drain) {
      ASSIGN_OR_RETURN(InstanceRecord drained,
                       store_.TransitionInstance(t.instance, t.to, {.reason = t.reason}));
      RETURN_IF_ERROR(Event(EventKind::kInstanceDraining, name, drained.revision, t.instance,
                            "kilnd", "stopping " + t.instance + ": " + t.reason));
      to_stop.push_back(drained);
    }
    for (int i = 0; i < d.create; ++i) {
      ASSIGN_OR_RETURN(InstanceRecord c, store_.CreateInstance(name, d.create_revision));
      RETURN_IF_ERROR(Event(EventKind::kInstanceCreated, name, d.create_revision, c.name, "kilnd",
                            "creating " + c.name + " of revision " +
                                std::to_string(d.create_revision) + " (" + d.plan.summary + ")"));
      to_start.push_back(c);
    }
    next_deadline_ms = d.wake_at_ms;
    // A steady pass writes nothing: no commit, no fsync.
    if (in.service_exists ? !(svc == in.service) : in.declared) {
      RETURN_IF_ERROR(store_.PutService(svc));
    }
    if (in.declared && rollout.state == RolloutState::kCompleted && rollout.finished_ms == now) {
      ASSIGN_OR_RETURN(const std::vector<InstanceRecord> before, store_.ListInstances(name, true));
      RETURN_IF_ERROR(store_.PruneFinalInstances(name, options_.final_instances_kept).status());
      ASSIGN_OR_RETURN(int pruned, PruneHistory(svc, target_rev, in.spec.history_limit));
      ASSIGN_OR_RETURN(const std::vector<InstanceRecord> after, store_.ListInstances(name, true));
      pruned_instances = PrunedNames(before, after);
      // Only a pruned revision can leave an artifact unreferenced.
      collect_artifacts = pruned > 0;
    }
    return Status::Ok();
  });
  if (!committed.ok()) return committed;  // nothing was started or stopped
  if (!desired_hash.empty()) desired_hash_[name] = desired_hash;
  // Their rows are gone for good: so go their logs. (A crash right here leaves the files behind;
  // they are never read again, and nothing else depends on them.)
  for (const std::string& gone : pruned_instances) driver_.Discard(gone);

  // Instances leave their service's pool before they are stopped: for a service with a stable
  // address, a draining instance is stopped only once no proxy routes to it.
  const std::optional<ExposeSpec> expose = ExposeOf(name, desired, stored_spec);
  auto stop_drained = [&]() -> Status {
    if (!expose || !options_.endpoints) {
      for (const auto& inst : to_stop) IssueStop(inst);
      if (options_.endpoints && published_.count(name)) {
        RETURN_IF_ERROR(PublishAndDrain(name, std::nullopt, false, 0, now));
      }
      return Status::Ok();
    }
    const ServiceSpec* spec = desired != nullptr ? &desired->spec : nullptr;
    StatusOr<ServiceSpec> stored = ServiceSpecFromJson(stored_spec);
    if (spec == nullptr && stored.ok()) spec = &*stored;
    const int64_t min_healthy = spec != nullptr ? spec->update.min_healthy_time.count() : 0;
    return PublishAndDrain(name, expose, !retired, min_healthy, now);
  };

  // Never start instances from bytes that no longer match their digest.
  if (!to_start.empty() && desired != nullptr && !desired->spec.tmpl.artifact_sha256.empty()) {
    std::set<int64_t> revisions;
    for (const auto& inst : to_start) revisions.insert(inst.revision);
    for (int64_t rev : revisions) {
      StatusOr<std::string> digest = ArtifactOf(name, rev);
      Status checked = digest.ok() ? CheckArtifact(name, *digest) : digest.status();
      if (!checked.ok()) {
        // The intents stay pending; the next pass (after backoff) starts them once it is fixed.
        for (const auto& inst : to_fail) StopInstance(inst, false);
        Status drained = stop_drained();
        if (!drained.ok()) {
          LogError("cannot publish a pool", {{"service", name}, {"error", drained.ToString()}});
        }
        return checked;
      }
    }
  }

  for (const auto& inst : to_fail) StopInstance(inst, /*mark_terminated=*/false);
  Status drained = stop_drained();
  for (const auto& inst : to_start) StartInstance(inst);
  if (collect_artifacts) CollectArtifacts();
  if (requeue_now) scheduler_.Add(name);
  if (next_deadline_ms > 0) scheduler_.AddAfter(name, Duration(next_deadline_ms - now));
  return drained;
}

std::optional<ExposeSpec> Reconciler::ExposeOf(const std::string& name,
                                               const DesiredService* desired,
                                               const std::string& stored_spec) {
  if (desired != nullptr) return desired->spec.expose;
  if (stored_spec.empty()) return std::nullopt;
  StatusOr<ServiceSpec> spec = ServiceSpecFromJson(stored_spec);
  if (!spec.ok()) {
    LogWarn("recorded spec unreadable", {{"service", name}, {"error", spec.status().ToString()}});
    return std::nullopt;
  }
  return spec->expose;
}

StatusOr<std::string> Reconciler::VersionOf(const std::string& service, int64_t revision) {
  auto key = std::make_pair(service, revision);
  auto it = version_cache_.find(key);
  if (it != version_cache_.end()) return it->second;
  ASSIGN_OR_RETURN(RevisionRecord r, store_.GetRevision(service, revision));
  ASSIGN_OR_RETURN(Template t, Template::FromCanonical(r.template_json));
  version_cache_.emplace(key, t.version);
  return t.version;
}

Status Reconciler::PublishAndDrain(const std::string& name, const std::optional<ExposeSpec>& expose,
                                   bool listening, int64_t min_healthy_ms, int64_t now) {
  EndpointsHub& hub = *options_.endpoints;
  if (!expose) {
    hub.Publish(name, std::nullopt);
    published_.erase(name);
    draining_services_.erase(name);
    return Status::Ok();
  }
  ASSIGN_OR_RETURN(auto live, store_.ListInstances(name, false));
  StatusOr<RolloutRecord> latest = store_.GetLatestRollout(name);
  if (!latest.ok() && latest.status().code() != StatusCode::kNotFound) return latest.status();
  std::optional<RolloutRecord> rollout;
  if (latest.ok()) rollout = *latest;
  Status versions = Status::Ok();
  auto version_of = [&](int64_t revision) {
    StatusOr<std::string> v = VersionOf(name, revision);
    if (!v.ok()) versions = v.status();
    return v.ok() ? *v : std::string();
  };
  if (listening) {
    hub.Publish(name, BuildPool(name, *expose, live, rollout, now, min_healthy_ms, version_of));
    published_.insert(name);
  } else {
    hub.Publish(name, std::nullopt);  // retired: its address closes; open connections finish
    published_.erase(name);
  }
  RETURN_IF_ERROR(versions);

  int64_t wake = NextPoolChangeMs(live, now, min_healthy_ms);
  bool waiting = false;
  for (const InstanceRecord& inst : live) {
    if (inst.state != InstanceState::kDraining || stop_issued_.count(inst.name)) continue;
    int64_t deadline = 0;
    const std::string why = DrainDone(inst, *expose, now, &deadline);
    if (why.empty()) {
      waiting = true;
      if (wake == 0 || deadline < wake) wake = deadline;
      continue;
    }
    Status s = store_.Transaction([&]() -> Status {
      return Event(EventKind::kInstanceDrained, name, inst.revision, inst.name, "kilnd",
                   "instance " + inst.name + " " + why + "; stopping it");
    });
    if (!s.ok())
      LogWarn("cannot record a drain", {{"instance", inst.name}, {"error", s.ToString()}});
    LogInfo(
        "instance drained",
        {{"service", name}, {"revision", inst.revision}, {"instance", inst.name}, {"why", why}});
    IssueStop(inst);
  }
  if (waiting) {
    draining_services_.insert(name);
  } else {
    draining_services_.erase(name);
  }
  if (wake > now) scheduler_.AddAfter(name, Duration(wake - now));
  return Status::Ok();
}

std::string Reconciler::DrainDone(const InstanceRecord& inst, const ExposeSpec& expose, int64_t now,
                                  int64_t* deadline) {
  if (inst.port <= 0) return "never took connections";
  const int64_t drain_ms = expose.drain.count();
  *deadline = inst.state_changed_ms + drain_ms;
  EndpointsHub::DrainStatus st = options_.endpoints->Drain(inst.name);
  const std::string waited =
      FormatDuration(Duration(std::max<int64_t>(0, now - inst.state_changed_ms)));
  if (st.drained) {
    return "drained: no proxy routes to it and no connection is open (after " + waited + ")";
  }
  if (now >= *deadline) {
    if (st.proxies == 0) {
      return "not drained within its drain time (" + FormatDuration(expose.drain) +
             "): no proxy reporting";
    }
    return "not drained within its drain time (" + FormatDuration(expose.drain) +
           "): " + std::to_string(st.open_connections) + " connection(s) still open";
  }
  return "";
}

void Reconciler::IssueStop(const InstanceRecord& inst) {
  if (!stop_issued_.insert(inst.name).second) return;
  StopInstance(inst, /*mark_terminated=*/true);
}

void Reconciler::OnProxyReport() {
  for (const std::string& name : draining_services_) scheduler_.Add(name);
}

// ---------------------------------------------------------------------------------------------
// Commands

StatusOr<RevisionRecord> Reconciler::Rollback(const std::string& service, int64_t to_revision,
                                              const std::string& reason, const std::string& actor) {
  RevisionRecord written;
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    const int64_t current = svc.pinned_revision > 0 ? svc.pinned_revision : svc.desired_revision;
    if (current == 0) return FailedPreconditionError(service + " has no revision yet");
    ASSIGN_OR_RETURN(std::string current_hash, HashOf(service, current));
    int64_t from_number = to_revision;
    if (from_number == 0) {
      ASSIGN_OR_RETURN(from_number, LastAvailableRevision(service, current_hash));
    }
    ASSIGN_OR_RETURN(RevisionRecord from, store_.GetRevision(service, from_number));
    if (from.template_hash == current_hash) {
      return FailedPreconditionError("revision " + std::to_string(from_number) + " of " + service +
                                     " has the current template; nothing to roll back to");
    }
    RETURN_IF_ERROR(WriteRollbackRevision(svc, from, reason, actor, &written));
    return store_.PutService(svc);
  }));
  scheduler_.Add(service);
  return written;
}

StatusOr<int64_t> Reconciler::Unpin(const std::string& service, const std::string& actor) {
  int64_t target = 0;
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    if (svc.pinned_revision == 0) return FailedPreconditionError(service + " is not pinned");
    RETURN_IF_ERROR(Event(EventKind::kUnpinned, service, svc.pinned_revision, "", actor,
                          service + " unpinned from revision " +
                              std::to_string(svc.pinned_revision) +
                              "; following its manifest again"));
    svc.pinned_revision = 0;
    svc.pin_reason.clear();
    target = svc.desired_revision;
    return store_.PutService(svc);
  }));
  scheduler_.Add(service);
  return target;
}

Status Reconciler::Pause(const std::string& service, const std::string& reason,
                         const std::string& actor) {
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    if (svc.paused) return FailedPreconditionError(service + " is already paused");
    svc.paused = true;
    StatusOr<RolloutRecord> r = store_.GetLatestRollout(service);
    if (r.ok() && IsActive(r->state) && r->state != RolloutState::kPaused) {
      r->state = RolloutState::kPaused;
      r->paused_at_ms = NowMs();
      RETURN_IF_ERROR(store_.PutRollout(*r).status());
    }
    RETURN_IF_ERROR(Event(EventKind::kPaused, service, 0, "", actor,
                          service + " paused" + (reason.empty() ? "" : ": " + reason)));
    return store_.PutService(svc);
  }));
  scheduler_.Add(service);
  return Status::Ok();
}

Status Reconciler::Resume(const std::string& service, const std::string& actor) {
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    if (!svc.paused) return FailedPreconditionError(service + " is not paused");
    svc.paused = false;
    StatusOr<RolloutRecord> r = store_.GetLatestRollout(service);
    if (r.ok() && r->state == RolloutState::kPaused) {
      r->state = RolloutState::kProgressing;
      r->paused_ms += NowMs() - r->paused_at_ms;  // paused time does not count toward the deadline
      r->paused_at_ms = 0;
      RETURN_IF_ERROR(store_.PutRollout(*r).status());
    }
    RETURN_IF_ERROR(Event(EventKind::kResumed, service, 0, "", actor, service + " resumed"));
    return store_.PutService(svc);
  }));
  scheduler_.Add(service);
  return Status::Ok();
}

Status Reconciler::Promote(const std::string& service, const std::string& actor) {
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, store_.GetService(service));
    StatusOr<RolloutRecord> r = store_.GetLatestRollout(service);
    if (!r.ok() || r->state != RolloutState::kWaitingPromotion) {
      return FailedPreconditionError(service + " has no canary waiting for promotion");
    }
    r->promoted = true;
    r->state = RolloutState::kProgressing;
    r->last_progress_ms = NowMs();
    RETURN_IF_ERROR(store_.PutRollout(*r).status());
    return Event(
        EventKind::kPromoted, service, r->to_revision, "", actor,
        "canaries of revision " + std::to_string(r->to_revision) + " promoted by " + actor);
  }));
  scheduler_.Add(service);
  return Status::Ok();
}

Status Reconciler::ReplaceInstance(const std::string& instance, const std::string& reason,
                                   const std::string& actor) {
  RETURN_IF_ERROR(store_.Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(InstanceRecord inst, store_.GetInstance(instance));
    const std::string why =
        "replacement requested by " + actor + (reason.empty() ? "" : ": " + reason);
    RETURN_IF_ERROR(store_.RequestReplacement(instance, why));
    return Event(EventKind::kReplaceRequested, inst.service, inst.revision, instance, actor, why);
  }));
  scheduler_.Add(ServiceOf(instance));
  return Status::Ok();
}

StatusOr<Reconciler::NextStep> Reconciler::Plan(const std::string& service) {
  return PlanAs(service, desired_.Find(service));
}

StatusOr<Reconciler::NextStep> Reconciler::PlanAs(const std::string& service,
                                                  const DesiredService* d) {
  // What the pass would find of a new template's artifact, without putting it into the store:
  // it is there already, or its source is (the pass copies it, checking the digest again).
  Status artifact;
  if (d != nullptr && !d->spec.artifact_path.empty() && !d->spec.tmpl.artifact_sha256.empty() &&
      !artifacts_.Has(d->spec.tmpl.artifact_sha256) &&
      !std::filesystem::exists(d->spec.artifact_path)) {
    artifact = ErrnoError(ENOENT, "cannot read artifact " + d->spec.artifact_path);
  }
  ASSIGN_OR_RETURN(PassInput in, LoadPassInput(service, d, artifact, NowMs()));
  // A service no longer declared is planned too (its retirement), once it was ever recorded.
  if (d == nullptr && !in.service_exists) {
    return NotFoundError("service \"" + service + "\" is not declared");
  }
  ASSIGN_OR_RETURN(const PassResult p, Decide(in));
  NextStep next;
  next.summary = p.plan.summary;
  next.target_revision = p.target_revision;
  if (p.revision) next.new_revision = p.revision->number;
  next.create = p.create;
  for (const InstanceTransition& t : p.drain) next.destroy.push_back(t.instance);
  if (p.rollback) next.rollback_revision = p.rollback->number;
  return next;
}

}  // namespace kiln
