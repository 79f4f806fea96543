#pragma once

// Internal to the API (api_server.cc): DiffRevisions and PlanManifests, kept apart from the
// other handlers. PlanManifests runs in three steps on three kinds of thread: parsing the files
// (the call's thread: artifacts are hashed there, never on the event thread), asking the
// reconciler what each service's next pass would do (the event thread), and reading what kilnd
// runs (a reader). None of them writes anything.

#include <google/protobuf/repeated_field.h>

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "controller/reconciler.h"
#include "kiln/v1/kiln.pb.h"
#include "spec/desired_set.h"
#include "spec/manifest.h"
#include "storage/state_store.h"

namespace kiln::api_internal {

namespace pb = ::kiln::v1;

// Defined in api_server.cc.
void FillRevision(const RevisionRecord& r, pb::Revision* out);

// The steps `Plan` reports for one service's next pass.
void AppendPlanSteps(const std::string& service, const Reconciler::NextStep& next,
                     google::protobuf::RepeatedPtrField<pb::PlanStep>* steps);

// DiffRevisions on one snapshot of the store: NOT_FOUND for an unknown service or revision,
// FAILED_PRECONDITION when there is nothing to compare with.
Status BuildDiffRevisions(StateReader& r, const pb::DiffRevisionsRequest& req,
                          pb::DiffRevisionsResponse* resp);

// The request's files parsed by every manifest rule (`rules` adds kilnd's own, such as the
// ports of --port-range); INVALID_ARGUMENT for a request without files or with a duplicate path.
StatusOr<ManifestSet> ParsePlanRequest(const pb::PlanManifestsRequest& req,
                                       const std::function<void(ManifestSet&)>& rules);

// What the reconciler says about the plan (filled on the event thread).
struct PlanVerdicts {
  std::map<std::string, StatusOr<Reconciler::NextStep>> declared;  // the files' good services
  std::map<std::string, StatusOr<Reconciler::NextStep>> retired;   // whole_directory only
};

// On the event thread: the next pass of each service the set declares, as if it were applied,
// and with `whole_directory`, of each service kilnd declares that the set does not.
PlanVerdicts PlanOnReconciler(Reconciler& reconciler, const ManifestSet& set, bool whole_directory);

// The response, from the set, the verdicts and what the store holds.
Status BuildPlanResponse(StateReader& r, const ManifestSet& set, const PlanVerdicts& verdicts,
                         pb::PlanManifestsResponse* resp);

}  // namespace kiln::api_internal
