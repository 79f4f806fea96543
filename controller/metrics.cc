#include "controller/metrics.h"

#include <cmath>
#include <sstream>

#include "kiln/version.h"

namespace kiln {
namespace {

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

std::string LabelText(const Labels& labels, const std::string& extra_key = "", const std::string& extra_value = "") {
  std::string out;
  for (const auto& [k, v] : labels) out += (out.empty() ? "" : ",") + k + "=\"" + Escape(v) + "\"";
  if (!extra_key.empty()) out += (out.empty() ? "" : ",") + extra_key + "=\"" + extra_value + "\"";
  return out.empty() ? "" : "{" + out + "}";
}

std::string Number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

}  // namespace

void Metrics::Declare(const std::string& name, const std::string& type, const std::string& help,
                      std::vector<double> buckets) {
  std::lock_guard lock(mu_);
  Family& f = families_[name];
  f.type = type;
  f.help = help;
  f.buckets = std::move(buckets);
}

void Metrics::Add(const std::string& name, const Labels& labels, double delta) {
  std::lock_guard lock(mu_);
  families_[name].values[labels] += delta;
}

void Metrics::Set(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mu_);
  families_[name].values[labels] = value;
}

void Metrics::Observe(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mu_);
  Family& f = families_[name];
  Histogram& h = f.histograms[labels];
  h.counts.resize(f.buckets.size() + 1);
  size_t i = 0;
  while (i < f.buckets.size() && value > f.buckets[i]) ++i;
  h.counts[i] += 1;
  h.sum += value;
  h.count += 1;
}

void Metrics::SetCollector(const std::string& name,
                           std::function<std::vector<std::pair<Labels, double>>()> fn) {
  std::lock_guard lock(mu_);
  families_[name].collector = std::move(fn);
}

double Metrics::ValueForTest(const std::string& name, const Labels& labels) const {
  std::lock_guard lock(mu_);
  auto it = families_.find(name);
  if (it == families_.end()) return 0;
  auto v = it->second.values.find(labels);
  return v == it->second.values.end() ? 0 : v->second;
}

std::string Metrics::Render() const {
  // Collectors run outside the lock: they may read the store.
  std::map<std::string, std::function<std::vector<std::pair<Labels, double>>()>> collectors;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, f] : families_) {
      if (f.collector) collectors[name] = f.collector;
    }
  }
  std::map<std::string, std::vector<std::pair<Labels, double>>> collected;
  for (auto& [name, fn] : collectors) collected[name] = fn();

  std::lock_guard lock(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    out += "# HELP " + name + " " + f.help + "\n# TYPE " + name + " " + f.type + "\n";
    if (f.type == "histogram") {
      for (const auto& [labels, h] : f.histograms) {
        double cumulative = 0;
        for (size_t i = 0; i < f.buckets.size(); ++i) {
          cumulative += h.counts[i];
          out += name + "_bucket" + LabelText(labels, "le", Number(f.buckets[i])) + " " + Number(cumulative) + "\n";
        }
        out += name + "_bucket" + LabelText(labels, "le", "+Inf") + " " + Number(h.count) + "\n";
        out += name + "_sum" + LabelText(labels) + " " + Number(h.sum) + "\n";
        out += name + "_count" + LabelText(labels) + " " + Number(h.count) + "\n";
      }
      continue;
    }
    auto c = collected.find(name);
    if (c != collected.end()) {
      for (const auto& [labels, v] : c->second) out += name + LabelText(labels) + " " + Number(v) + "\n";
      continue;
    }
    for (const auto& [labels, v] : f.values) out += name + LabelText(labels) + " " + Number(v) + "\n";
  }
  return out;
}

void DeclareKilnMetrics(Metrics& m) {
  const std::vector<double> seconds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
  m.Declare("kiln_build_info", "gauge", "Build of this kilnd (always 1).");
  m.Set("kiln_build_info", {{"version", kVersion}}, 1);
  m.Declare("kiln_reconcile_passes_total", "counter", "Reconcile passes by result (ok or error).");
  m.Declare("kiln_reconcile_duration_seconds", "histogram", "Duration of one reconcile pass of one service.", seconds);
  m.Declare("kiln_workqueue_depth", "gauge", "Services waiting for a pass.");
  m.Declare("kiln_workqueue_retries_total", "counter", "Passes requeued with backoff after an error.");
  m.Declare("kiln_instances", "gauge", "Instances by service, revision and state (final ones still retained included).");
  m.Declare("kiln_rollouts_total", "counter", "Rollouts that ended, by result (completed, failed).");
  m.Declare("kiln_rollbacks_total", "counter", "Rollbacks by trigger (manual, automatic).");
  m.Declare("kiln_manifest_errors_total", "counter", "Manifest errors found by loads.");
  m.Declare("kiln_probe_failures_total", "counter", "Failed health probes, by service (each failing probe, also below the threshold).");
  m.Declare("kiln_probe_local_errors_total", "counter", "Health probes kilnd could not run for a reason of its own (descriptors, memory); no instance is blamed.");
  m.Declare("kiln_instance_failures_total", "counter", "Instances that failed, by service and how (exited, start_failed, deadline).");
  m.Declare("kiln_service_crash_loop_failures", "gauge", "Failures in a row of a service's instances (0 when it runs well).");
  m.Declare("kiln_service_start_backoff_seconds", "gauge", "Seconds until a crash-looping service may start its next instance.");
  m.Declare("kiln_artifact_verifications_total", "counter", "Periodic artifact verifications, by result (ok, mismatch, missing).");
  m.Declare("kiln_artifact_drift_total", "counter", "Artifacts found with bytes that no longer match their digest.");
  m.Declare("kiln_driver_errors_total", "counter", "Instance starts the driver refused.");
  m.Declare("kiln_grpc_requests_total", "counter", "gRPC requests by method and status code.");
  m.Declare("kiln_store_commit_duration_seconds", "histogram", "Duration of state store write transactions.", seconds);
}

}  // namespace kiln
