#include "api/plan_api.h"

#include <algorithm>
#include <optional>

#include "spec/template_diff.h"

namespace kiln::api_internal {
namespace {

void FillChanges(const std::vector<FieldChange>& changes,
                 google::protobuf::RepeatedPtrField<pb::FieldChange>* out) {
  for (const FieldChange& c : changes) {
    pb::FieldChange* f = out->Add();
    f->set_path(c.path);
    f->set_old_value(c.old_value.value_or(""));
    f->set_new_value(c.new_value.value_or(""));
    f->set_added(c.added());
    f->set_removed(c.removed());
  }
}

void FillProblem(const ManifestError& e, pb::ManifestProblem* out) {
  out->set_file(e.file);
  out->set_line(e.line);
  out->set_column(e.column);
  out->set_key(e.key_path);
  out->set_message(e.message);
  out->set_error(e.ToString());
}

std::string Numbers(const std::vector<RevisionRecord>& revisions) {
  std::string out;
  for (const RevisionRecord& r : revisions) {
    if (!out.empty()) out += ", ";
    out += std::to_string(r.number);
  }
  return out.empty() ? "none" : out;
}

// What kilnd has of a service: its record, its spec as last declared and the template it runs.
struct Current {
  bool exists = false;
  ServiceRecord record;
  std::optional<ServiceSpec> spec;  // with the target revision's template
  int64_t target = 0;
  std::string version;
};

StatusOr<Current> ReadCurrent(StateReader& r, const std::string& name) {
  Current c;
  StatusOr<ServiceRecord> svc = r.GetService(name);
  if (!svc.ok()) {
    if (svc.status().code() == StatusCode::kNotFound) return c;
    return svc.status();
  }
  c.exists = true;
  c.record = *std::move(svc);
  c.target = c.record.pinned_revision > 0 ? c.record.pinned_revision : c.record.desired_revision;
  if (!c.record.spec.empty()) {
    ASSIGN_OR_RETURN(ServiceSpec spec, ServiceSpecFromJson(c.record.spec));
    c.spec = std::move(spec);
  }
  if (c.target > 0) {
    ASSIGN_OR_RETURN(RevisionRecord rev, r.GetRevision(name, c.target));
    ASSIGN_OR_RETURN(Template t, Template::FromCanonical(rev.template_json));
    c.version = t.version;
    if (c.spec) c.spec->tmpl = std::move(t);
  }
  return c;
}

// One declared service's plan: what differs from what kilnd has, and what the next pass does.
void PlanDeclared(const ServiceSpec& spec, const Current& cur,
                  const StatusOr<Reconciler::NextStep>& next, pb::ServicePlan* out) {
  out->set_service(spec.name);
  out->set_file(spec.file);
  out->set_new_version(spec.tmpl.version);
  out->set_new_replicas(spec.replicas);
  out->set_current_revision(cur.target);
  out->set_current_version(cur.version);
  if (cur.spec) out->set_current_replicas(cur.spec->replicas);
  if (!next.ok()) {
    out->set_change(pb::PLAN_CHANGE_UNSPECIFIED);
    out->set_note("cannot plan: " + next.status().message());
    return;
  }
  AppendPlanSteps(spec.name, *next, out->mutable_steps());
  out->set_new_revision(next->new_revision);
  const bool known = cur.exists && !cur.record.retired && cur.spec.has_value();
  if (!known) {
    out->set_change(pb::PLAN_CHANGE_CREATE);
    if (cur.exists) out->set_note("retired earlier; declared again");
    return;
  }
  ServiceSpec current = *cur.spec;
  if (next->new_revision == 0) {
    // No new revision: the template stays what runs (a pin keeps an older one on purpose).
    current.tmpl = spec.tmpl;
  } else if (cur.record.pinned_revision > 0) {
    out->set_note("pinned to revision " + std::to_string(cur.record.pinned_revision) +
                  ": a new template lifts the pin");
  }
  const std::vector<FieldChange> changes = DiffServiceSpecs(current, spec);
  FillChanges(changes, out->mutable_changes());
  if (next->new_revision > 0) {
    out->set_change(pb::PLAN_CHANGE_UPDATE);
  } else if (!changes.empty()) {
    out->set_change(pb::PLAN_CHANGE_CONFIG);
  } else {
    out->set_change(pb::PLAN_CHANGE_NONE);
  }
  if (cur.record.retire_at_ms > 0) {
    out->set_note("its retirement is cancelled");
    if (changes.empty() && next->new_revision == 0) out->set_change(pb::PLAN_CHANGE_CONFIG);
  }
}

void PlanRetired(const std::string& name, const Current& cur,
                 const StatusOr<Reconciler::NextStep>& next, pb::ServicePlan* out) {
  out->set_service(name);
  out->set_change(pb::PLAN_CHANGE_RETIRE);
  out->set_current_revision(cur.target);
  out->set_current_version(cur.version);
  if (cur.spec) out->set_current_replicas(cur.spec->replicas);
  out->set_new_replicas(0);
  out->set_note("no file declares it: retired after --retire-after, every instance drained");
  if (next.ok()) AppendPlanSteps(name, *next, out->mutable_steps());
}

}  // namespace

void AppendPlanSteps(const std::string& service, const Reconciler::NextStep& next,
                     google::protobuf::RepeatedPtrField<pb::PlanStep>* steps) {
  if (next.new_revision > 0) {
    pb::PlanStep* step = steps->Add();
    step->set_service(service);
    step->set_action("write_revision");
    step->set_revision(next.new_revision);
    step->set_reason("the manifest declares a new template");
  }
  if (next.create == 0 && next.destroy.empty()) {
    pb::PlanStep* step = steps->Add();
    step->set_service(service);
    step->set_action("none");
    step->set_revision(next.target_revision);
    step->set_reason(next.summary);
  }
  if (next.create > 0) {
    pb::PlanStep* step = steps->Add();
    step->set_service(service);
    step->set_action("create");
    step->set_revision(next.target_revision);
    step->set_count(next.create);
    step->set_reason(next.summary);
  }
  if (!next.destroy.empty()) {
    pb::PlanStep* step = steps->Add();
    step->set_service(service);
    step->set_action("destroy");
    step->set_count(static_cast<int32_t>(next.destroy.size()));
    for (const auto& i : next.destroy) step->add_instances(i);
    step->set_reason(next.summary);
  }
}

Status BuildDiffRevisions(StateReader& r, const pb::DiffRevisionsRequest& req,
                          pb::DiffRevisionsResponse* resp) {
  if (req.service().empty()) return InvalidArgumentError("service is required");
  if (req.from_revision() < 0 || req.to_revision() < 0) {
    return InvalidArgumentError("revision numbers must be 0 or more");
  }
  return r.Snapshot([&]() -> Status {
    ASSIGN_OR_RETURN(ServiceRecord svc, r.GetService(req.service()));
    ASSIGN_OR_RETURN(std::vector<RevisionRecord> revisions, r.ListRevisions(req.service()));
    const std::string quoted = "\"" + req.service() + "\"";
    int64_t to = req.to_revision();
    if (to == 0) to = svc.pinned_revision > 0 ? svc.pinned_revision : svc.desired_revision;
    if (to == 0) return FailedPreconditionError("service " + quoted + " has no revision yet");
    auto find = [&](int64_t number) {
      return std::find_if(revisions.begin(), revisions.end(),
                          [&](const RevisionRecord& rev) { return rev.number == number; });
    };
    auto to_it = find(to);
    if (to_it == revisions.end()) {
      return NotFoundError("service " + quoted + " has no revision " + std::to_string(to) +
                           " (revisions kept: " + Numbers(revisions) + ")");
    }
    auto from_it = revisions.end();
    if (req.from_revision() > 0) {
      from_it = find(req.from_revision());
      if (from_it == revisions.end()) {
        return NotFoundError("service " + quoted + " has no revision " +
                             std::to_string(req.from_revision()) +
                             " (revisions kept: " + Numbers(revisions) + ")");
      }
    } else {
      // Newest first: the first one older than `to` is the one before it.
      from_it = std::find_if(revisions.begin(), revisions.end(),
                             [&](const RevisionRecord& rev) { return rev.number < to; });
      if (from_it == revisions.end()) {
        return FailedPreconditionError("revision " + std::to_string(to) + " is the oldest of " +
                                       quoted + " kept; name two revisions to compare");
      }
    }
    ASSIGN_OR_RETURN(Template from, Template::FromCanonical(from_it->template_json));
    ASSIGN_OR_RETURN(Template to_tmpl, Template::FromCanonical(to_it->template_json));
    resp->set_service(req.service());
    FillRevision(*from_it, resp->mutable_from());
    FillRevision(*to_it, resp->mutable_to());
    FillChanges(DiffTemplates(from, to_tmpl), resp->mutable_changes());
    return Status::Ok();
  });
}

StatusOr<ManifestSet> ParsePlanRequest(const pb::PlanManifestsRequest& req,
                                       const std::function<void(ManifestSet&)>& rules) {
  if (req.files().empty()) return InvalidArgumentError("files: at least one manifest is required");
  std::vector<ManifestText> texts;
  std::set<std::string> paths;
  for (const pb::ManifestFileText& f : req.files()) {
    if (f.path().empty()) return InvalidArgumentError("files: every file needs a path");
    if (!paths.insert(f.path()).second) {
      return InvalidArgumentError("files: " + f.path() + " is given twice");
    }
    texts.push_back({f.path(), f.content()});
  }
  // The artifacts are hashed by reading them, not by copying them into kilnd's store: a plan
  // leaves no trace.
  ManifestSet set = ParseManifestFiles("", texts);
  if (rules) rules(set);
  return set;
}

PlanVerdicts PlanOnReconciler(Reconciler& reconciler, const ManifestSet& set,
                              bool whole_directory) {
  PlanVerdicts v;
  std::set<std::string> declared;
  for (const ManifestFile& f : set.files) {
    for (const auto& d : f.declared) declared.insert(d.name);
  }
  for (const ServiceSpec* spec : set.Services()) {
    const DesiredService desired(*spec, "", "");
    v.declared.emplace(spec->name, reconciler.PlanAs(spec->name, &desired));
  }
  if (whole_directory) {
    for (const auto& [name, unused] : reconciler.desired().services()) {
      if (declared.count(name) == 0) v.retired.emplace(name, reconciler.PlanAs(name, nullptr));
    }
  }
  return v;
}

Status BuildPlanResponse(StateReader& r, const ManifestSet& set, const PlanVerdicts& verdicts,
                         pb::PlanManifestsResponse* resp) {
  for (const ManifestError& e : set.AllErrors()) FillProblem(e, resp->add_errors());
  std::map<std::string, pb::ServicePlan> plans;  // by name
  RETURN_IF_ERROR(r.Snapshot([&]() -> Status {
    for (const ServiceSpec* spec : set.Services()) {
      ASSIGN_OR_RETURN(Current cur, ReadCurrent(r, spec->name));
      PlanDeclared(*spec, cur, verdicts.declared.at(spec->name), &plans[spec->name]);
    }
    for (const auto& [name, next] : verdicts.retired) {
      ASSIGN_OR_RETURN(Current cur, ReadCurrent(r, name));
      PlanRetired(name, cur, next, &plans[name]);
    }
    return Status::Ok();
  }));
  bool changes = false;
  for (auto& [name, plan] : plans) {
    changes = changes || plan.change() != pb::PLAN_CHANGE_NONE;
    *resp->add_services() = std::move(plan);
  }
  resp->set_changes(changes);
  return Status::Ok();
}

}  // namespace kiln::api_internal
