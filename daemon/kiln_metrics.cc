#include "daemon/kiln_metrics.h"

#include <vector>

#include "kiln/version.h"

namespace kiln {

void DeclareKilnMetrics(Metrics& m) {
  const std::vector<double> seconds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,   0.25,   0.5,   1,    2.5};
  m.Declare("kiln_build_info", "gauge", "Build of this kilnd (always 1).");
  m.Set("kiln_build_info", {{"version", kVersion}}, 1);
  m.Declare("kiln_reconcile_passes_total", "counter", "Reconcile passes by result (ok or error).");
  m.Declare("kiln_reconcile_duration_seconds", "histogram",
            "Duration of one reconcile pass of one service.", seconds);
  m.Declare("kiln_workqueue_depth", "gauge", "Services waiting for a pass.");
  m.Declare("kiln_workqueue_retries_total", "counter",
            "Passes requeued with backoff after an error.");
  m.Declare("kiln_instances", "gauge",
            "Instances by service, revision and state (final ones still retained included).");
  m.Declare("kiln_rollouts_total", "counter",
            "Rollouts that ended, by result (completed, failed).");
  m.Declare("kiln_rollbacks_total", "counter", "Rollbacks by trigger (manual, automatic).");
  m.Declare("kiln_manifest_errors_total", "counter", "Manifest errors found by loads.");
  m.Declare("kiln_probe_failures_total", "counter",
            "Failed health probes, by service (each failing probe, also below the threshold).");
  m.Declare("kiln_probe_local_errors_total", "counter",
            "Health probes kilnd could not run for a reason of its own (descriptors, memory); no "
            "instance is blamed.");
  m.Declare("kiln_instance_failures_total", "counter",
            "Instances that failed, by service and how (exited, start_failed, deadline).");
  m.Declare("kiln_service_crash_loop_failures", "gauge",
            "Failures in a row of a service's instances (0 when it runs well).");
  m.Declare("kiln_service_start_backoff_seconds", "gauge",
            "Seconds until a crash-looping service may start its next instance.");
  m.Declare("kiln_artifact_verifications_total", "counter",
            "Periodic artifact verifications, by result (ok, mismatch, missing).");
  m.Declare("kiln_artifact_drift_total", "counter",
            "Artifacts found with bytes that no longer match their digest.");
  m.Declare("kiln_driver_errors_total", "counter", "Instance starts the driver refused.");
  m.Declare("kiln_grpc_requests_total", "counter", "gRPC requests by method and status code.");
  m.Declare("kiln_store_commit_duration_seconds", "histogram",
            "Duration of state store write transactions.", seconds);
}

}  // namespace kiln
