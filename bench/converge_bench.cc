// Cold converge and rolling replacement of 1,000 kiln-testsvc instances through a real kilnd,
// against a plain posix_spawn loop and supervisord starting the same 1,000 programs, all in
// this run. "Up" means accepting TCP connections on its port (kilnd: healthy in its store, which
// its TCP probe decides). Never fails on a time. Ports stay below the ephemeral range
// (32768+), where a connect to a port nobody listens on yet can connect to itself.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "common/clock.h"
#include "common/unique_fd.h"
#include "deploy/proc.h"
#include "deploy/process_driver.h"
#include "storage/sqlite_state_store.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr int kInstances = 1000;

const std::string kBin = KILN_BIN_DIR;

// Waits until every port accepts; returns false after `limit`.
bool WaitAllUp(int first_port, int count, std::chrono::seconds limit) {
  std::set<int> waiting;
  for (int i = 0; i < count; ++i) waiting.insert(first_port + i);
  auto deadline = Clock::now() + limit;
  while (!waiting.empty() && Clock::now() < deadline) {
    for (auto it = waiting.begin(); it != waiting.end();)
      it = bench::Accepts(*it) ? waiting.erase(it) : std::next(it);
    if (!waiting.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return waiting.empty();
}

double PlainLoop(const fs::path& dir, double* spawn_seconds) {
  const int first = 21000;
  std::vector<pid_t> pids;
  pids.reserve(kInstances);
  auto begin = Clock::now();
  for (int i = 0; i < kInstances; ++i) {
    pids.push_back(bench::Spawn({kBin + "/kiln-testsvc"}, {"PORT=" + std::to_string(first + i)},
                                (dir / ("plain-" + std::to_string(i) + ".log")).string()));
  }
  *spawn_seconds = bench::Seconds(Clock::now() - begin);
  bool up = WaitAllUp(first, kInstances, std::chrono::seconds(120));
  double took = bench::Seconds(Clock::now() - begin);
  for (pid_t p : pids) ::kill(p, SIGKILL);
  for (pid_t p : pids) ::waitpid(p, nullptr, 0);
  return up ? took : -1;
}

double Supervisord(const fs::path& dir) {
  if (!fs::exists("/usr/bin/supervisord")) return -1;
  const int first = 23000;
  std::ofstream conf(dir / "supervisord.conf");
  conf << "[supervisord]\nnodaemon=true\nlogfile=" << (dir / "supervisord.log").string()
       << "\npidfile=" << (dir / "supervisord.pid").string() << "\nchildlogdir=" << dir.string()
       << "\n[unix_http_server]\nfile=" << (dir / "supervisor.sock").string() << "\n";
  for (int i = 0; i < kInstances; ++i) {
    conf << "[program:svc" << i << "]\ncommand=" << kBin << "/kiln-testsvc\nenvironment=PORT=\""
         << first + i << "\"\nstartsecs=0\nautorestart=true\nstdout_logfile="
         << (dir / ("sup-" + std::to_string(i) + ".log")).string() << "\nredirect_stderr=true\n";
  }
  conf.close();
  auto begin = Clock::now();
  pid_t sup =
      bench::Spawn({"/usr/bin/supervisord", "-n", "-c", (dir / "supervisord.conf").string()},
                   {"PATH=/usr/bin:/bin"}, (dir / "supervisord.out").string());
  bool up = WaitAllUp(first, kInstances, std::chrono::seconds(300));
  double took = bench::Seconds(Clock::now() - begin);
  ::kill(sup, SIGTERM);  // supervisord stops its programs
  ::waitpid(sup, nullptr, 0);
  return up ? took : -1;
}

struct KilndRun {
  double cold = -1, cold_cpu = 0, rolling = -1, rolling_cpu = 0;
};

void WriteManifest(const fs::path& dir, const std::string& version) {
  std::ofstream m(dir / "bench.yaml.tmp");
  m << "name: bench\nversion: \"" << version << "\"\nreplicas: " << kInstances
    << "\nartifact: {path: " << kBin << "/kiln-testsvc}\n"
    << "command: [\"{artifact}\", \"--version-string\", \"" << version << "\"]\n"
    << "health: {tcp: {}, interval: 1s, timeout: 1s}\n"
    << "update: {strategy: rolling, max_surge: 25%, max_unavailable: 0, progress_deadline: 10m}\n";
  m.close();
  fs::rename(dir / "bench.yaml.tmp", dir / "bench.yaml");
}

// Polls the store until `count` instances of `revision` are healthy and nothing else is live.
bool WaitConverged(const fs::path& db, int64_t revision, std::chrono::seconds limit) {
  RealClock clock;
  auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    auto store = SqliteStateStore::Open({.path = db.string(), .clock = &clock, .read_only = true});
    if (store.ok()) {
      auto live = (*store)->ListInstances("bench", false);
      if (live.ok() && static_cast<int>(live->size()) == kInstances &&
          std::all_of(live->begin(), live->end(), [&](const InstanceRecord& i) {
            return i.revision == revision && i.state == InstanceState::kHealthy;
          })) {
        return true;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

KilndRun Kilnd(const fs::path& dir) {
  KilndRun r;
  fs::create_directories(dir / "m");
  WriteManifest(dir / "m", "1");
  auto begin = Clock::now();
  pid_t kilnd = bench::Spawn(
      {kBin + "/kilnd", "--manifests", (dir / "m").string(), "--state", (dir / "state").string(),
       "--port-range", "25000-26999", "--log-level", "warn", "--http-listen", ""},
      {"PATH=/usr/bin:/bin"}, (dir / "kilnd.log").string());
  if (WaitConverged(dir / "state/kiln.db", 1, std::chrono::seconds(300))) {
    r.cold = bench::Seconds(Clock::now() - begin);
    r.cold_cpu = bench::CpuSeconds(kilnd);
    begin = Clock::now();
    WriteManifest(dir / "m", "2");
    if (WaitConverged(dir / "state/kiln.db", 2, std::chrono::seconds(600))) {
      r.rolling = bench::Seconds(Clock::now() - begin);
      r.rolling_cpu = bench::CpuSeconds(kilnd) - r.cold_cpu;
    }
  }
  ::kill(kilnd, SIGKILL);
  ::waitpid(kilnd, nullptr, 0);
  bench::KillInstancesOf(dir / "state");
  return r;
}

int Main() {
  bench::PrintMachine();
  fs::path dir = fs::temp_directory_path() / ("kiln-converge-bench-" + std::to_string(getpid()));
  fs::create_directories(dir);
  double spawned = 0;
  double plain = PlainLoop(dir, &spawned);
  double sup = Supervisord(dir);
  KilndRun k = Kilnd(dir);
  std::printf("cold converge of %d kiln-testsvc instances (until every one accepts connections):\n",
              kInstances);
  std::printf("  plain posix_spawn loop: %.2f s (spawning alone %.2f s)\n", plain, spawned);
  if (sup > 0) {
    std::printf("  supervisord:            %.2f s\n", sup);
  } else {
    std::printf("  supervisord:            not measured (install the supervisor package)\n");
  }
  std::printf("  kilnd:                  %.2f s, controller CPU %.2f s\n", k.cold, k.cold_cpu);
  if (plain > 0 && k.cold > 0) std::printf("  ratio kilnd/plain:      %.2fx\n", k.cold / plain);
  if (sup > 0 && k.cold > 0) std::printf("  ratio kilnd/supervisord: %.2fx\n", k.cold / sup);
  std::printf("rolling replacement of the %d (max_surge 25%%, max_unavailable 0):\n", kInstances);
  std::printf("  kilnd: %.2f s, controller CPU %.2f s\n", k.rolling, k.rolling_cpu);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("converge_bench", kiln::Main); }
