#pragma once

// A small Prometheus registry: counters, gauges and histograms with labels, rendered in the
// text exposition format 0.0.4. Thread-safe (the reconciler thread, gRPC threads and the HTTP
// handler all touch it).

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace kiln {

using Labels = std::vector<std::pair<std::string, std::string>>;
using Series = std::vector<std::pair<Labels, double>>;

class Metrics {
 public:
  // Declares a metric; declaring again is harmless. `type` is counter, gauge or histogram.
  void Declare(const std::string& name, const std::string& type, const std::string& help,
               std::vector<double> buckets = {});

  void Add(const std::string& name, const Labels& labels = {}, double delta = 1);
  void Set(const std::string& name, const Labels& labels, double value);
  void Observe(const std::string& name, const Labels& labels, double value);
  // Gauges computed when scraped (they replace every series of the metric).
  void SetCollector(const std::string& name,
                    std::function<std::vector<std::pair<Labels, double>>()> fn);

  // Several metrics computed together when scraped (one read of the store for all of them): each
  // metric named in the result replaces every series it had. The metrics must be declared.
  void AddGroupCollector(std::function<std::map<std::string, Series>()> fn);

  std::string Render() const;
  double ValueForTest(const std::string& name, const Labels& labels) const;

 private:
  struct Histogram {
    std::vector<double> counts;  // per bucket, not cumulative
    double sum = 0;
    double count = 0;
  };
  struct Family {
    std::string type, help;
    std::vector<double> buckets;
    std::map<Labels, double> values;
    std::map<Labels, Histogram> histograms;
    std::function<std::vector<std::pair<Labels, double>>()> collector;
  };
  mutable std::mutex mu_;  // guards families_ and groups_
  std::map<std::string, Family> families_;
  std::vector<std::function<std::map<std::string, Series>()>> groups_;
};

}  // namespace kiln
