#pragma once

// What HTTP shows of the reconciler's state. The HTTP server runs on a thread of its own; the
// reconciler's thread publishes a snapshot of what readiness and the work-queue metrics need, and
// HTTP's thread reads only that snapshot.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

#include "http/http_server.h"

namespace kiln {

struct ReconcilerSnapshot {
  std::string store_error;  // the last write the store could not take; "" when it took it
  bool manifests_loaded = false;
  bool recovered = false;
  std::string recovery_error;
  std::string local_probe_error;  // probes kilnd could not run for a reason of its own
  int64_t local_probe_error_ms = 0;
  bool shutting_down = false;
  size_t queue_depth = 0;
  int64_t queue_retries = 0;
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();  // published
};

// One snapshot, written by the reconciler's thread, read by any.
class PublishedState {
 public:
  void Publish(ReconcilerSnapshot s) {
    std::lock_guard lock(mu_);
    snapshot_ = std::move(s);
  }
  ReconcilerSnapshot Get() const {
    std::lock_guard lock(mu_);
    return snapshot_;
  }

 private:
  mutable std::mutex mu_;  // guards snapshot_
  ReconcilerSnapshot snapshot_;
};

// /readyz of a snapshot: ready when the store takes writes, the manifests are loaded, start-up
// recovery is recorded, probes could run lately, the reconciler published within 10 s (it is not
// stuck in one step) and kilnd is not shutting down. Each check with its error, as JSON.
HttpServer::Readiness ReadinessOf(const ReconcilerSnapshot& s,
                                  std::chrono::steady_clock::time_point steady_now,
                                  int64_t unix_now_ms);

}  // namespace kiln
