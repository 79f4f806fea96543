#include "spec/template_diff.h"

#include <map>
#include <nlohmann/json.hpp>
#include <tuple>

#include "common/duration.h"

namespace kiln {
namespace {

// One field of a flattened template or spec. `group` and `order` place it in the manifest's
// field order; `path` breaks ties (map keys sort alphabetically).
struct Field {
  int group = 0;
  int order = 0;
  std::string path;
  std::string value;
};
using Fields = std::vector<Field>;

std::string ListValue(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    out += DiffValue(items[i]);
  }
  return out + "]";
}

// Groups, in the order a manifest declares them.
enum Group : int {
  kVersion,
  kArtifact,
  kImage,
  kCommand,
  kPort,
  kEnv,
  kHealth,
  kReplicas,
  kUpdate,
  kHistoryLimit,
  kExpose,
};

void AddTemplate(const Template& t, Fields& out) {
  out.push_back({kVersion, 0, "version", DiffValue(t.version)});
  if (!t.artifact_sha256.empty())
    out.push_back({kArtifact, 0, "artifact.sha256", t.artifact_sha256});
  if (!t.image.empty()) out.push_back({kImage, 0, "image", DiffValue(t.image)});
  out.push_back({kCommand, 0, "command", ListValue(t.command)});
  if (t.port != 0) out.push_back({kPort, 0, "port", std::to_string(t.port)});
  if (!t.hosts.empty()) out.push_back({kPort, 1, "hosts", ListValue(t.hosts)});
  for (const auto& [key, value] : t.env) out.push_back({kEnv, 0, "env." + key, DiffValue(value)});
  const HealthCheck& h = t.health;
  switch (h.kind) {
    case ProbeKind::kNone:
      out.push_back({kHealth, 0, "health", "none"});
      return;  // interval and friends mean nothing without a probe
    case ProbeKind::kHttp:
      out.push_back({kHealth, 1, "health.http.path", DiffValue(h.http_path)});
      out.push_back({kHealth, 2, "health.http.port", std::to_string(h.port)});
      break;
    case ProbeKind::kTcp:
      out.push_back({kHealth, 3, "health.tcp.port", std::to_string(h.port)});
      break;
    case ProbeKind::kExec:
      out.push_back({kHealth, 4, "health.exec", ListValue(h.exec)});
      break;
  }
  out.push_back({kHealth, 5, "health.interval", FormatDuration(h.interval)});
  out.push_back({kHealth, 6, "health.timeout", FormatDuration(h.timeout)});
  out.push_back({kHealth, 7, "health.failure_threshold", std::to_string(h.failure_threshold)});
}

void AddPolicy(const ServiceSpec& s, Fields& out) {
  out.push_back({kReplicas, 0, "replicas", std::to_string(s.replicas)});
  const UpdatePolicy& u = s.update;
  const auto flag = [](bool b) { return std::string(b ? "true" : "false"); };
  out.push_back({kUpdate, 0, "update.strategy", std::string(StrategyName(u.strategy))});
  out.push_back({kUpdate, 1, "update.max_surge", u.max_surge.ToString()});
  out.push_back({kUpdate, 2, "update.max_unavailable", u.max_unavailable.ToString()});
  out.push_back({kUpdate, 3, "update.min_healthy_time", FormatDuration(u.min_healthy_time)});
  out.push_back({kUpdate, 4, "update.healthy_deadline", FormatDuration(u.healthy_deadline)});
  out.push_back({kUpdate, 5, "update.progress_deadline", FormatDuration(u.progress_deadline)});
  out.push_back({kUpdate, 6, "update.auto_rollback", flag(u.auto_rollback)});
  if (u.strategy == Strategy::kCanary) {
    out.push_back({kUpdate, 7, "update.canary", std::to_string(u.canary)});
    out.push_back({kUpdate, 8, "update.auto_promote", flag(u.auto_promote)});
  }
  out.push_back({kHistoryLimit, 0, "history_limit", std::to_string(s.history_limit)});
  if (!s.expose) {
    out.push_back({kExpose, 0, "expose", "none"});
    return;
  }
  out.push_back(
      {kExpose, 1, "expose.listen", s.expose->listen_host + ":" + std::to_string(s.expose->port)});
  out.push_back({kExpose, 2, "expose.drain", FormatDuration(s.expose->drain)});
}

std::vector<FieldChange> Diff(const Fields& from, const Fields& to) {
  using Key = std::tuple<int, int, std::string>;
  std::map<Key, std::pair<std::optional<std::string>, std::optional<std::string>>> merged;
  for (const Field& f : from) merged[{f.group, f.order, f.path}].first = f.value;
  for (const Field& f : to) merged[{f.group, f.order, f.path}].second = f.value;
  std::vector<FieldChange> out;
  for (auto& [key, values] : merged) {
    if (values.first == values.second) continue;
    out.push_back({std::get<2>(key), std::move(values.first), std::move(values.second)});
  }
  return out;
}

}  // namespace

std::string DiffValue(std::string_view value) {
  bool plain = !value.empty();
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= ' ' || u == 0x7f || c == '"') plain = false;
  }
  if (plain) return std::string(value);
  return nlohmann::json(std::string(value))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string FieldChange::ToString() const {
  return path + ": " + old_value.value_or("(unset)") + " \u2192 " + new_value.value_or("(unset)");
}

std::vector<FieldChange> DiffTemplates(const Template& from, const Template& to) {
  Fields a, b;
  AddTemplate(from, a);
  AddTemplate(to, b);
  return Diff(a, b);
}

std::vector<FieldChange> DiffServiceSpecs(const ServiceSpec& from, const ServiceSpec& to) {
  Fields a, b;
  AddTemplate(from.tmpl, a);
  AddPolicy(from, a);
  AddTemplate(to.tmpl, b);
  AddPolicy(to, b);
  return Diff(a, b);
}

}  // namespace kiln
