#include "common/metrics.h"

#include <cmath>
#include <sstream>

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

std::string LabelText(const Labels& labels, const std::string& extra_key = "",
                      const std::string& extra_value = "") {
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

void Metrics::AddGroupCollector(std::function<std::map<std::string, Series>()> fn) {
  std::lock_guard lock(mu_);
  groups_.push_back(std::move(fn));
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
  std::map<std::string, std::function<Series()>> collectors;
  std::vector<std::function<std::map<std::string, Series>()>> groups;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, f] : families_) {
      if (f.collector) collectors[name] = f.collector;
    }
    groups = groups_;
  }
  std::map<std::string, Series> collected;
  for (auto& [name, fn] : collectors) collected[name] = fn();
  for (auto& group : groups) {
    for (auto& [name, series] : group()) collected[name] = std::move(series);
  }

  std::lock_guard lock(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    out.append("# HELP ").append(name).append(" ").append(f.help);
    out.append("\n# TYPE ").append(name).append(" ").append(f.type).append("\n");
    if (f.type == "histogram") {
      for (const auto& [labels, h] : f.histograms) {
        double cumulative = 0;
        for (size_t i = 0; i < f.buckets.size(); ++i) {
          cumulative += h.counts[i];
          out += name + "_bucket" + LabelText(labels, "le", Number(f.buckets[i])) + " " +
                 Number(cumulative) + "\n";
        }
        out += name + "_bucket" + LabelText(labels, "le", "+Inf") + " " + Number(h.count) + "\n";
        out += name + "_sum" + LabelText(labels) + " " + Number(h.sum) + "\n";
        out += name + "_count" + LabelText(labels) + " " + Number(h.count) + "\n";
      }
      continue;
    }
    auto c = collected.find(name);
    if (c != collected.end()) {
      for (const auto& [labels, v] : c->second)
        out += name + LabelText(labels) + " " + Number(v) + "\n";
      continue;
    }
    for (const auto& [labels, v] : f.values)
      out += name + LabelText(labels) + " " + Number(v) + "\n";
  }
  return out;
}

}  // namespace kiln
