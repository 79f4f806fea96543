#include "daemon/readiness.h"

#include <nlohmann/json.hpp>

namespace kiln {

HttpServer::Readiness ReadinessOf(const ReconcilerSnapshot& s,
                                  std::chrono::steady_clock::time_point steady_now,
                                  int64_t unix_now_ms) {
  const bool store_ok = s.store_error.empty();
  const bool loaded = s.manifests_loaded;
  // A reconciler that has not published for this long is stuck in one step.
  const auto silent = steady_now - s.at;
  const bool responsive = silent < std::chrono::seconds(10);
  // Probes kilnd could not run lately (its own descriptors or memory ran out).
  const bool probes_ok =
      s.local_probe_error.empty() || unix_now_ms - s.local_probe_error_ms > 30'000;
  HttpServer::Readiness r;
  r.ready = store_ok && loaded && s.recovered && probes_ok && responsive && !s.shutting_down;
  nlohmann::json j = {
      {"ready", r.ready},
      {"checks",
       {{"store_writable", {{"ok", store_ok}, {"error", s.store_error}}},
        {"recovered", {{"ok", s.recovered}, {"error", s.recovery_error}}},
        {"manifests_loaded", {{"ok", loaded}}},
        {"probes_runnable", {{"ok", probes_ok}, {"error", probes_ok ? "" : s.local_probe_error}}},
        {"reconciler_responsive",
         {{"ok", responsive},
          {"silent_ms", std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()}}},
        {"not_shutting_down", {{"ok", !s.shutting_down}}}}}};
  r.json = j.dump();
  return r;
}

}  // namespace kiln
