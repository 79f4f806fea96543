// Steady state at 10,000 services x 10 instances: the CPU time of a full resync pass (every
// service reconciled once, nothing to do) and the peak RSS, with the fake driver and a real
// SQLite file. Never fails on a time.

#include <time.h>

#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <set>

#include "bench/bench_util.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "controller/reconciler.h"
#include "storage/sqlite_state_store.h"
#include "tests/fakes/fake_driver.h"
#include "tests/fakes/fake_health.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
constexpr int kServices = 10'000;
constexpr int kReplicas = 10;

// Deduplicates like the real work queue; timers are not needed here.
class QueueScheduler final : public PassScheduler {
 public:
  void Add(const std::string& n) override {
    if (queued.insert(n).second) queue.push_back(n);
  }
  void AddAfter(const std::string&, Duration) override {}
  std::string Pop() {
    std::string n = queue.front();
    queue.pop_front();
    queued.erase(n);
    return n;
  }
  std::deque<std::string> queue;
  std::set<std::string> queued;
};

double CpuNow() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int Main(int argc, char** argv) {
  SetupLogging(LogFormat::kText, LogLevel::kWarn);
  bench::PrintMachine();
  // The database lives on /dev/shm when there is one: setting up 100,000 instances is ~20,000
  // transactions, each an fsync on a disk. The resync being measured commits nothing.
  fs::path base = argc > 1
                      ? fs::path(argv[1])
                      : (fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path());
  fs::path dir = base / ("kiln-resync-bench-" + std::to_string(getpid()));
  fs::create_directories(dir / "m");
  std::ofstream(dir / "app") << "app";
  for (int f = 0; f < kServices / 100; ++f) {
    std::ofstream m(dir / "m" / ("f" + std::to_string(f) + ".yaml"));
    for (int i = 0; i < 100; ++i) {
      m << "name: svc-" << f * 100 + i << "\nversion: \"1\"\nreplicas: " << kReplicas
        << "\nartifact: {path: ../app}\nhealth: {tcp: {}}\n---\n";
    }
  }
  RealClock clock;
  auto store = SqliteStateStore::Open({.path = (dir / "kiln.db").string(), .clock = &clock});
  auto artifacts = ArtifactStore::Open(dir / "artifacts");
  if (!store.ok() || !artifacts.ok()) return 1;
  testing::FakeDriver driver;
  driver.record_starts = false;
  testing::FakeHealth health;
  QueueScheduler scheduler;
  Reconciler reconciler(**store, driver, health, *artifacts, clock, scheduler, {});

  auto setup_begin = std::chrono::steady_clock::now();
  std::string digest;
  ArtifactHasher cached = [&](const fs::path& p) -> StatusOr<std::string> {
    if (digest.empty()) {
      ASSIGN_OR_RETURN(digest, Sha256File(p));
    }
    return digest;
  };
  {
    ManifestSet set = LoadManifestDir(dir / "m", cached);
    if (!set.ok()) {
      std::printf("manifest errors: %s\n", set.AllErrors()[0].ToString().c_str());
      return 1;
    }
    reconciler.ApplyManifests(set);
  }
  auto drain = [&] {
    while (!scheduler.queue.empty()) (void)reconciler.Reconcile(scheduler.Pop());
  };
  drain();
  for (const auto& [name, w] : std::map(health.watched)) health.Report(name, true);
  drain();
  double setup = bench::Seconds(std::chrono::steady_clock::now() - setup_begin);
  auto live = (*store)->ListLiveInstances();
  std::printf("setup: %d services x %d instances (%zu live) in %.1f s, database on %s\n", kServices,
              kReplicas, live.ok() ? live->size() : 0, setup, base.c_str());

  const auto names = reconciler.ServiceNames();
  const size_t starts_before = driver.start_count;
  std::vector<double> cpu, wall;
  for (int round = 0; round < 3; ++round) {
    double c0 = CpuNow();
    auto w0 = std::chrono::steady_clock::now();
    for (const auto& n : names) (void)reconciler.Reconcile(n);
    cpu.push_back(CpuNow() - c0);
    wall.push_back(bench::Seconds(std::chrono::steady_clock::now() - w0));
  }
  double c = bench::Median(cpu);
  std::printf(
      "full resync pass over %zu services (median of 3): CPU %.3f s, wall %.3f s, "
      "%.1f us CPU per service pass\n",
      names.size(), c, bench::Median(wall), c / names.size() * 1e6);
  std::printf("  target: under 50 ms per pass -> %s per service pass, %s for the full resync\n",
              c / names.size() < 0.050 ? "met" : "NOT met", c < 0.050 ? "met" : "NOT met");
  std::printf("  instances started by the steady passes: %zu (must be 0)\n",
              driver.start_count - starts_before);
  std::printf("peak RSS: %.1f MiB (target under 200 MB)\n", bench::PeakRssKiB() / 1024.0);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  return kiln::bench::RunMain("resync_bench", [&] { return kiln::Main(argc, argv); });
}
