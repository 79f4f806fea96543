#pragma once

// The desired state as the manifests declare it, with DESIGN.md's error rules: a broken file
// keeps its services' last good desired state; an empty, missing or unreadable directory never
// retires every service; a service whose document is removed from a readable directory goes.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "spec/manifest.h"

namespace kiln {

struct DesiredService {
  DesiredService() = default;
  DesiredService(ServiceSpec s, std::string sha256, std::string err,
                 std::optional<SourceCommit> c = std::nullopt)
      : spec(std::move(s)),
        manifest_sha256(std::move(sha256)),
        commit(std::move(c)),
        error(std::move(err)),
        template_hash(spec.tmpl.Hash()),
        spec_json(ServiceSpecToJson(spec)) {}

  ServiceSpec spec;             // the last good spec
  std::string manifest_sha256;  // of its file when that spec was read
  // The commit that last changed that file, when it is in a git work tree (recorded on the
  // revisions written from the spec).
  std::optional<SourceCommit> commit;
  std::string error;  // the current error that keeps it at its last good spec, or ""
  // Derived once from `spec`, not on every pass.
  std::string template_hash;
  std::string spec_json;
};

class DesiredSet {
 public:
  struct Update {
    std::vector<std::string> changed;  // added, changed, removed, or whose error changed
    std::vector<std::string> errors;   // every manifest error of this load, as text
  };

  // Starts from what the store remembers, so a file that is broken when kilnd starts keeps the
  // services it declared before.
  void Seed(std::vector<DesiredService> services);

  Update Apply(const ManifestSet& set);

  const DesiredService* Find(const std::string& name) const;
  const std::map<std::string, DesiredService>& services() const { return services_; }

 private:
  std::map<std::string, DesiredService> services_;
};

}  // namespace kiln
