#include "spec/template.h"

#include <nlohmann/json.hpp>

#include "common/sha256.h"

namespace kiln {
namespace {

using nlohmann::json;

const char* ProbeKindName(ProbeKind k) {
  switch (k) {
    case ProbeKind::kNone:
      return "none";
    case ProbeKind::kHttp:
      return "http";
    case ProbeKind::kTcp:
      return "tcp";
    case ProbeKind::kExec:
      return "exec";
  }
  return "none";
}

}  // namespace

std::string Template::Canonical() const {
  // Every field is always present, so adding a field later changes every hash on purpose only
  // when its value is part of what an instance is.
  json h = {
      {"kind", ProbeKindName(health.kind)},
      {"path", health.http_path},
      {"port", health.port},
      {"exec", health.exec},
      {"interval_ms", health.interval.count()},
      {"timeout_ms", health.timeout.count()},
      {"failure_threshold", health.failure_threshold},
  };
  json t = {
      {"version", version},
      {"artifact_sha256", artifact_sha256},
      {"image", image},
      {"command", command},
      {"env", env},
      {"port", port},
      {"health", std::move(h)},
  };
  if (!hosts.empty()) t["hosts"] = hosts;
  // nlohmann::json orders object keys; dump(-1) adds no whitespace. The loader admits only
  // UTF-8, so `replace` changes nothing here; it keeps a stray byte from throwing.
  return t.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string Template::Hash() const { return Sha256Hex(Canonical()); }

StatusOr<Template> Template::FromCanonical(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return DataLossError("stored template is not valid JSON");
  try {
    Template t;
    t.version = j.at("version").get<std::string>();
    t.artifact_sha256 = j.at("artifact_sha256").get<std::string>();
    t.image = j.at("image").get<std::string>();
    t.command = j.at("command").get<std::vector<std::string>>();
    t.env = j.at("env").get<std::map<std::string, std::string>>();
    t.port = j.at("port").get<int>();
    if (j.contains("hosts")) t.hosts = j.at("hosts").get<std::vector<std::string>>();
    const json& h = j.at("health");
    std::string kind = h.at("kind").get<std::string>();
    if (kind == "http")
      t.health.kind = ProbeKind::kHttp;
    else if (kind == "tcp")
      t.health.kind = ProbeKind::kTcp;
    else if (kind == "exec")
      t.health.kind = ProbeKind::kExec;
    else
      t.health.kind = ProbeKind::kNone;
    t.health.http_path = h.at("path").get<std::string>();
    t.health.port = h.at("port").get<int>();
    t.health.exec = h.at("exec").get<std::vector<std::string>>();
    t.health.interval = Duration(h.at("interval_ms").get<int64_t>());
    t.health.timeout = Duration(h.at("timeout_ms").get<int64_t>());
    t.health.failure_threshold = h.at("failure_threshold").get<int>();
    return t;
  } catch (const json::exception& e) {
    return DataLossError(std::string("stored template is malformed: ") + e.what());
  }
}

}  // namespace kiln
