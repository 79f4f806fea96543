#include "controller/decide.h"

#include <algorithm>

#include "common/duration.h"

namespace kiln {
namespace {

int64_t BackoffMs(int failures, const DecideOptions& o) {
  if (failures <= 1) return 0;  // one failure is replaced at once
  int64_t ms = o.crash_backoff_initial.count();
  for (int i = 2; i < failures && ms < o.crash_backoff_max.count(); ++i) ms *= 2;
  return std::min<int64_t>(ms, o.crash_backoff_max.count());
}

std::string ProbeDetail(const InstanceRecord& inst, int64_t now_ms) {
  if (inst.last_probe.empty()) return "no probe answered yet";
  std::string out = "last probe: " + inst.last_probe;
  if (!inst.last_probe_ok && inst.probe_failing_since_ms > 0 &&
      inst.first_probe_failure != inst.last_probe) {
    const int64_t ago = now_ms - inst.probe_failing_since_ms;
    out += "; failing since " + FormatDuration(Duration(ago >= 1000 ? ago / 1000 * 1000 : ago)) +
           " ago, first: " + inst.first_probe_failure;
  }
  return out;
}

// The conditions `now`, each keeping its last transition time while its status holds.
std::vector<Condition> WithTransitionTimes(const std::vector<Condition>& previous,
                                           std::vector<Condition> now, int64_t now_ms) {
  for (Condition& c : now) {
    c.last_transition_ms = now_ms;
    for (const Condition& p : previous) {
      if (p.type == c.type && p.status == c.status) c.last_transition_ms = p.last_transition_ms;
    }
  }
  return now;
}

std::string HashOf(const PassInput& in, int64_t revision) {
  auto it = in.template_hashes.find(revision);
  return it == in.template_hashes.end() ? "" : it->second;
}

}  // namespace

void CountFailure(ServiceRecord& svc, const std::string& what, int64_t now_ms, bool permanent,
                  int64_t revision) {
  ++svc.crash_count;
  svc.last_crash_ms = now_ms;
  svc.crash_reason = what;
  if (permanent) {
    svc.start_error = what;
    svc.start_error_revision = revision;
  }
}

int64_t NextStartMs(const ServiceRecord& svc, const DecideOptions& options) {
  if (svc.crash_count == 0) return 0;
  // A start error retrying cannot fix waits the longest; only a new revision (or the start
  // succeeding after all) lifts it.
  return svc.last_crash_ms + (!svc.start_error.empty() ? options.crash_backoff_max.count()
                                                       : BackoffMs(svc.crash_count, options));
}

std::string PinReason(const std::string& actor, const std::string& reason) {
  return (actor == "auto" ? "automatic rollback" : "rollback by " + actor) +
         (reason.empty() ? "" : ": " + reason);
}

namespace {

// Gone from the manifests: wait --retire-after before scaling to zero, so that a file moved,
// rewritten or removed by mistake costs nothing when it comes back; then drain every instance.
PassResult DecideRetirement(const PassInput& in) {
  PassResult out;
  ServiceRecord& svc = out.service;
  svc = in.service;
  if (in.rollout) out.rollout = *in.rollout;
  const std::string& name = svc.name;
  const int64_t now = in.now_ms;
  if (!in.service_exists) return out;  // never recorded: nothing to retire
  if (!svc.retired && (svc.retire_at_ms == 0 || now < svc.retire_at_ms)) {
    if (svc.retire_at_ms == 0) {
      svc.retire_at_ms = now + in.options.retire_after.count();
      out.events.push_back({EventKind::kServiceMissing, 0, "", "kilnd",
                            name + " is no longer declared in the manifests (was in " +
                                svc.manifest_file + "); retiring it in " +
                                FormatDuration(in.options.retire_after) + " unless it comes back"});
    }
    if (svc.retire_at_ms > now) {
      out.wake_at_ms = svc.retire_at_ms;
    } else {
      out.requeue_now = true;
    }
    out.plan.summary = "not declared in the manifests: retiring in " +
                       FormatDuration(Duration(
                           (std::max<int64_t>(svc.retire_at_ms - now, 0) + 999) / 1000 * 1000));
    return out;
  }
  if (!svc.retired) {
    svc.retired = true;
    out.events.push_back({EventKind::kServiceRetired, 0, "", "kilnd",
                          name + " has not been declared in the manifests for " +
                              FormatDuration(in.options.retire_after) + "; scaling to zero"});
  }
  for (const InstanceRecord& inst : in.instances) {
    if (inst.state == InstanceState::kDraining) continue;
    out.drain.push_back({inst.name, inst.revision, InstanceState::kDraining, "service retired"});
    out.plan.destroy.push_back(inst.name);
  }
  out.plan.summary =
      "retired: " + (out.drain.empty()
                         ? std::string("nothing left to stop")
                         : "stopping " + std::to_string(out.drain.size()) + " instance(s)");
  return out;
}

}  // namespace

StatusOr<PassResult> Decide(const PassInput& in) {
  if (!in.declared) return DecideRetirement(in);
  PassResult out;
  const ServiceSpec& spec = in.spec;
  const int64_t now = in.now_ms;
  ServiceRecord& svc = out.service;
  svc = in.service;
  const std::string& name = svc.name;
  auto wake_at = [&](int64_t at) {
    if (at > now && (out.wake_at_ms == 0 || at < out.wake_at_ms)) out.wake_at_ms = at;
  };
  auto event = [&](EventKind kind, int64_t revision, const std::string& instance,
                   const std::string& actor, const std::string& message) {
    out.events.push_back({kind, revision, instance, actor, message});
  };

  // A template no revision has yet becomes the next revision, and the service converges to it;
  // one that differs from the template rolled away from is the fix, so it lifts a pin.
  RevisionRecord target = in.target;
  int64_t next_revision = in.next_revision;
  std::string manifest_error = in.manifest_error;
  if (in.NewTemplate()) {
    if (!in.artifact.ok()) {
      Status refused = in.artifact.WithContext("revision of " + name + " refused");
      // Nothing to converge to yet: the pass fails. Otherwise keep converging, and say why.
      if (svc.desired_revision == 0) return refused;
      manifest_error = refused.message();
    } else {
      RevisionRecord& r = out.revision.emplace();
      r.service = name;
      r.number = next_revision++;
      r.template_hash = in.template_hash;
      r.template_json = spec.tmpl.Canonical();
      r.source = RevisionSource::kManifest;
      r.manifest_file = spec.file;
      r.manifest_sha256 = in.manifest_sha256;
      r.commit = in.manifest_commit;
      event(EventKind::kRevisionCreated, r.number, "", "kilnd",
            "revision " + std::to_string(r.number) + " of " + name + " (version " +
                spec.tmpl.version + ") from " + spec.file);
      if (svc.pinned_revision > 0 && svc.desired_revision > 0) {
        event(EventKind::kPinLifted, r.number, "", "kilnd",
              name + " no longer pinned to revision " + std::to_string(svc.pinned_revision) +
                  ": the manifest declares a new template");
        svc.pinned_revision = 0;
        svc.pin_reason.clear();
      }
      svc.desired_revision = r.number;
      target = r;
    }
  }
  if (svc.manifest_error != manifest_error && !manifest_error.empty()) {
    event(EventKind::kManifestError, 0, "", "kilnd", manifest_error);
  }
  svc.manifest_error = manifest_error;
  svc.manifest_file = spec.file;
  svc.spec = in.spec_json;
  svc.retired = false;
  if (svc.retire_at_ms != 0) {
    svc.retire_at_ms = 0;
    event(EventKind::kRetirementCancelled, 0, "", "kilnd",
          name + " is declared again (in " + spec.file + "); not retiring it");
  }
  const int64_t target_rev = out.target_revision = target.number;
  const std::string& target_hash = target.template_hash;

  // Rollout bookkeeping: a new target starts a new rollout and supersedes an unfinished one.
  RolloutRecord& rollout = out.rollout;
  if (in.rollout) rollout = *in.rollout;
  if (!in.rollout || rollout.to_revision != target_rev) {
    if (in.rollout && IsActive(rollout.state)) {
      out.superseded = rollout;
      out.superseded->state = RolloutState::kSuperseded;
      out.superseded->finished_ms = now;
    }
    RolloutRecord next;
    next.service = name;
    next.from_revision = in.rollout ? rollout.to_revision : 0;
    next.to_revision = target_rev;
    next.strategy = spec.update.strategy;
    next.state = svc.paused ? RolloutState::kPaused : RolloutState::kProgressing;
    next.paused_at_ms = svc.paused ? now : 0;
    next.started_ms = next.last_progress_ms = now;
    rollout = next;
    out.rollout_is_new = true;
    // A new target is a fresh start: a fix must not wait out the old revision's back-off.
    svc.crash_count = 0;
    svc.last_crash_ms = 0;
    svc.crash_reason.clear();
    svc.next_start_ms = 0;
    if (svc.start_error_revision != target_rev) {
      svc.start_error.clear();
      svc.start_error_revision = 0;
    }
    event(EventKind::kRolloutStarted, target_rev, "", "kilnd",
          "rollout of " + name + " to revision " + std::to_string(target_rev) + " (" +
              std::string(StrategyName(rollout.strategy)) + ")");
  }

  // Instances that missed their healthy deadline fail; the rest feed the plan.
  PlanInput plan_in;
  plan_in.policy = spec.update;
  plan_in.replicas = spec.replicas;
  plan_in.paused = svc.paused;
  plan_in.promoted = rollout.promoted;
  for (const InstanceRecord& inst : in.instances) {
    const bool starting = inst.state == InstanceState::kStarting;
    const int64_t deadline = inst.started_ms + spec.update.healthy_deadline.count();
    if (starting && inst.started_ms > 0 && now >= deadline) {
      const std::string reason = "not healthy within healthy_deadline " +
                                 FormatDuration(spec.update.healthy_deadline) + " (" +
                                 ProbeDetail(inst, now) + ")";
      out.failed.push_back({inst.name, inst.revision, InstanceState::kFailed, reason});
      CountFailure(svc, inst.name + " " + reason, now);
      event(EventKind::kInstanceFailed, inst.revision, inst.name, "kilnd",
            "instance " + inst.name + " " + reason);
      continue;
    }
    if (starting && inst.started_ms > 0) wake_at(deadline);
    PlanInstance p;
    p.name = inst.name;
    p.state = inst.state;
    p.is_target = HashOf(in, inst.revision) == target_hash;
    p.replace = !inst.replace_reason.empty();
    p.created_ms = inst.created_ms;
    p.available = IsAvailable(inst, now, spec.update.min_healthy_time.count());
    if (inst.state == InstanceState::kHealthy && !p.available) {
      wake_at(inst.healthy_since_ms + spec.update.min_healthy_time.count());
    }
    plan_in.instances.push_back(p);
  }
  PlanOutput& plan = out.plan;
  plan = PlanStep(plan_in);

  // Crash-loop back-off: reset once an instance started after the last failure has run well
  // for a while; until then no new instance starts before next_start_ms.
  if (svc.crash_count > 0) {
    const int64_t settle =
        spec.update.min_healthy_time.count() + in.options.crash_backoff_reset_after.count();
    for (const InstanceRecord& inst : in.instances) {
      if (inst.state != InstanceState::kHealthy || inst.healthy_since_ms <= svc.last_crash_ms) {
        continue;
      }
      if (now >= inst.healthy_since_ms + settle) {
        out.backoff_reset_by = inst.name;
        svc.crash_count = 0;
        svc.next_start_ms = 0;
        svc.crash_reason.clear();
        break;
      }
      wake_at(inst.healthy_since_ms + settle);
    }
  }
  svc.next_start_ms = NextStartMs(svc, in.options);
  if (plan.create > 0 && now < svc.next_start_ms) {
    plan.summary = "crash-looping: " + svc.crash_reason + "; next start in " +
                   FormatDuration(Duration((svc.next_start_ms - now + 999) / 1000 * 1000));
    plan.create = 0;
    wake_at(svc.next_start_ms);
  }
  const bool start_error = !svc.start_error.empty() && svc.start_error_revision == target_rev;

  // Rollout progress, completion and the progress deadline.
  if (IsActive(rollout.state)) {
    if (rollout.seen_new_available != plan.new_available ||
        rollout.seen_old_total != plan.old_total) {
      if (rollout.seen_new_available >= 0) rollout.last_progress_ms = now;
      rollout.seen_new_available = plan.new_available;
      rollout.seen_old_total = plan.old_total;
    }
    if (plan.promote_now && !rollout.promoted) {
      rollout.promoted = true;
      event(EventKind::kPromoted, target_rev, "", "auto",
            "canaries of revision " + std::to_string(target_rev) +
                " available; promoted automatically");
    }
    if (plan.waiting_promotion && rollout.state == RolloutState::kProgressing) {
      rollout.state = RolloutState::kWaitingPromotion;
      event(EventKind::kWaitingPromotion, target_rev, "", "kilnd",
            "canaries of revision " + std::to_string(target_rev) +
                " are available; waiting for `kilnctl promote " + name + "`");
    }
    const bool done = plan.old_total == 0 && plan.new_available >= spec.replicas &&
                      plan.create == 0 && plan.destroy.empty();
    const int64_t deadline_at =
        rollout.last_progress_ms + rollout.paused_ms + spec.update.progress_deadline.count();
    if (done) {
      rollout.state = RolloutState::kCompleted;
      rollout.finished_ms = now;
      out.mark_available = true;
      event(EventKind::kRolloutCompleted, target_rev, "", "kilnd",
            "rollout of " + name + " to revision " + std::to_string(target_rev) +
                " completed: " + std::to_string(spec.replicas) + " available");
    } else if (rollout.state == RolloutState::kProgressing && (now >= deadline_at || start_error)) {
      rollout.state = RolloutState::kFailed;
      rollout.finished_ms = now;
      rollout.reason = start_error ? "instances of revision " + std::to_string(target_rev) +
                                         " cannot start: " + svc.start_error
                                   : "no progress for progress_deadline " +
                                         FormatDuration(spec.update.progress_deadline) + " (" +
                                         plan.summary + ")";
      event(EventKind::kRolloutFailed, target_rev, "", "kilnd",
            "rollout of " + name + " to revision " + std::to_string(target_rev) +
                " failed: " + rollout.reason);
      if (spec.update.auto_rollback) {
        // Back to the last revision that was fully available, with another template.
        const RevisionRecord* candidate = nullptr;
        for (const RevisionRecord& r : in.last_available) {
          if (candidate == nullptr && r.template_hash != target_hash) candidate = &r;
        }
        if (candidate != nullptr) {
          const int64_t number = next_revision;
          const std::string reason =
              "rollout to revision " + std::to_string(target_rev) + " failed";
          out.rollback = RollbackDecision{*candidate, number, reason};
          svc.pinned_revision = number;
          svc.pin_reason = PinReason("auto", reason);
          out.requeue_now = true;
        } else {
          out.no_rollback = "no earlier revision of " + name + " was ever fully available";
        }
      }
    } else if (rollout.state == RolloutState::kProgressing) {
      wake_at(deadline_at);
    }
  } else if (plan.old_total == 0 && plan.new_available >= spec.replicas && spec.replicas > 0 &&
             target.available_ms == 0) {
    out.mark_available = true;
  }

  // The step: drain, then create. Not while rolling back: the next pass steps to the rollback.
  if (!out.requeue_now) {
    for (const std::string& victim : plan.destroy) {
      const InstanceRecord* inst = nullptr;
      for (const InstanceRecord& l : in.instances) {
        if (l.name == victim) inst = &l;
      }
      const std::string why = !inst->replace_reason.empty() ? inst->replace_reason
                              : HashOf(in, inst->revision) != target_hash
                                  ? "replaced by revision " + std::to_string(target_rev)
                                  : "scaled down";
      out.drain.push_back({victim, inst->revision, InstanceState::kDraining, why});
    }
    out.create = plan.create;
    out.create_revision = target_rev;
  }

  // Conditions.
  const int min_available =
      spec.replicas - spec.update.max_unavailable.Resolve(spec.replicas, false);
  const int available = plan.new_available + plan.old_available;
  std::vector<Condition> conditions;
  conditions.push_back(
      {ConditionType::kAvailable, available >= min_available,
       available >= min_available ? "MinimumReplicasAvailable" : "MinimumReplicasUnavailable",
       std::to_string(available) + " of " + std::to_string(spec.replicas) +
           " instances available"});
  if (rollout.state == RolloutState::kCompleted) {
    conditions.push_back({ConditionType::kProgressing, true, "NewRevisionAvailable",
                          "revision " + std::to_string(target_rev) + " is available"});
  } else if (rollout.state == RolloutState::kFailed) {
    conditions.push_back({ConditionType::kProgressing, false,
                          start_error ? "StartError" : "ProgressDeadlineExceeded", rollout.reason});
  } else if (rollout.state == RolloutState::kPaused) {
    conditions.push_back(
        {ConditionType::kProgressing, false, "RolloutPaused", "paused by an operator"});
  } else if (rollout.state == RolloutState::kWaitingPromotion) {
    conditions.push_back({ConditionType::kProgressing, true, "WaitingForPromotion", plan.summary});
  } else {
    conditions.push_back(
        {ConditionType::kProgressing, true, "NewRevisionProgressing", plan.summary});
  }
  if (!svc.manifest_error.empty()) {
    conditions.push_back({ConditionType::kDegraded, true, "ManifestError", svc.manifest_error});
  } else if (start_error) {
    conditions.push_back({ConditionType::kDegraded, true, "StartError", svc.start_error});
  } else if (svc.crash_count >= 2) {
    conditions.push_back({ConditionType::kDegraded, true, "CrashLoopBackOff",
                          "crash-looping: " + svc.crash_reason + " (" +
                              std::to_string(svc.crash_count) + " failures in a row)"});
  } else if (rollout.state == RolloutState::kFailed || svc.pinned_revision > 0) {
    conditions.push_back({ConditionType::kDegraded, true,
                          svc.pinned_revision > 0 ? "Pinned" : "RolloutFailed",
                          svc.pinned_revision > 0 ? svc.pin_reason : rollout.reason});
  } else {
    conditions.push_back({ConditionType::kDegraded, false, "AsExpected", ""});
  }
  svc.conditions = WithTransitionTimes(svc.conditions, std::move(conditions), now);
  return out;
}

}  // namespace kiln
