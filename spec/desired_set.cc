#include "spec/desired_set.h"

#include <set>

namespace kiln {

void DesiredSet::Seed(std::vector<DesiredService> services) {
  // What a load already brought in is newer than the store's copy.
  for (auto& d : services) services_.emplace(d.spec.name, std::move(d));
}

const DesiredService* DesiredSet::Find(const std::string& name) const {
  auto it = services_.find(name);
  return it == services_.end() ? nullptr : &it->second;
}

DesiredSet::Update DesiredSet::Apply(const ManifestSet& set) {
  Update update;
  for (const ManifestError& e : set.AllErrors()) update.errors.push_back(e.ToString());

  std::map<std::string, DesiredService> next;
  auto keep_all = [&](const std::string& why) {
    next = services_;
    for (auto& [name, d] : next) d.error = why;
  };
  if (!set.dir_errors.empty()) {
    keep_all(set.dir_errors.front().ToString() + "; keeping the last good desired state");
  } else {
    for (const ManifestFile& f : set.files) {
      if (f.ok()) {
        for (const ServiceSpec& s : f.services) next[s.name] = {s, f.sha256, "", f.commit};
        continue;
      }
      // A broken file keeps what it declared before, and what it still declares, as it was.
      std::set<std::string> names;
      for (const auto& d : f.declared) names.insert(d.name);
      for (const auto& [name, d] : services_) {
        if (d.spec.file == f.path) names.insert(name);
      }
      const std::string why =
          f.errors.front().ToString() +
          (f.errors.size() > 1 ? " (and " + std::to_string(f.errors.size() - 1) + " more)" : "") +
          (set.source_commit.empty() ? "" : " at commit " + set.source_commit);
      for (const std::string& name : names) {
        auto it = services_.find(name);
        if (it == services_.end() || next.count(name)) continue;
        next[name] = it->second;
        next[name].error = why;
      }
    }
    if (next.empty() && !services_.empty()) {
      keep_all("manifest directory " + set.dir +
               " declares no services; keeping the last good desired state rather than retiring "
               "every service");
    }
  }

  std::set<std::string> names;
  for (const auto& [name, d] : services_) names.insert(name);
  for (const auto& [name, d] : next) names.insert(name);
  for (const std::string& name : names) {
    auto a = services_.find(name);
    auto b = next.find(name);
    bool same = a != services_.end() && b != next.end() && a->second.error == b->second.error &&
                a->second.manifest_sha256 == b->second.manifest_sha256 &&
                a->second.commit == b->second.commit && a->second.spec_json == b->second.spec_json;
    if (!same) update.changed.push_back(name);
  }
  services_ = std::move(next);
  return update;
}

}  // namespace kiln
