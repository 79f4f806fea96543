// Latency from a manifest file's rename into place to the first instance of the new revision
// spawned, through a real kilnd (inotify, work queue, reconciler, process driver): median and
// p99 over 100 changes. Times come from kilnd's own JSON log (millisecond stamps, one clock).
// Never fails on a time.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench/bench_util.h"
#include "common/clock.h"
#include "deploy/proc.h"
#include "deploy/process_driver.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
constexpr int kChanges = 100;
const std::string kBin = KILN_BIN_DIR;

int64_t ParseTsMs(const std::string& ts) {  // 2026-11-25T12:00:00.123Z
  std::tm tm{};
  strptime(ts.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  return static_cast<int64_t>(timegm(&tm)) * 1000 + std::atoi(ts.c_str() + 20);
}

// The log time of "instance process started" for `revision`, or -1.
int64_t SpawnTime(const fs::path& log, int64_t revision) {
  std::ifstream f(log);
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || j.value("msg", "") != "instance process started") continue;
    if (j.value("revision", int64_t{0}) == revision) return ParseTsMs(j.value("ts", ""));
  }
  return -1;
}

void Write(const fs::path& dir, int version) {
  std::ofstream m(dir / ".web.yaml.tmp");  // hidden: kilnd ignores it until it is renamed
  m << "name: web\nversion: \"" << version << "\"\nreplicas: 1\n"
    << "artifact: {path: " << kBin << "/kiln-testsvc}\n"
    << "command: [\"{artifact}\", \"--version-string\", \"" << version << "\"]\n"
    << "health: {tcp: {}, interval: 50ms}\n"
    << "update: {strategy: rolling, max_surge: 1, max_unavailable: 1}\n";
}

int Main() {
  bench::PrintMachine();
  fs::path dir = fs::temp_directory_path() / ("kiln-latency-bench-" + std::to_string(getpid()));
  fs::create_directories(dir / "m");
  Write(dir / "m", 0);
  fs::rename(dir / "m/.web.yaml.tmp", dir / "m/web.yaml");
  const std::string log = (dir / "kilnd.log").string();
  std::vector<std::string> args = {kBin + "/kilnd",
                                   "--manifests",
                                   (dir / "m").string(),
                                   "--state",
                                   (dir / "state").string(),
                                   "--port-range",
                                   "27000-27999",
                                   "--log-format",
                                   "json",
                                   "--http-listen",
                                   ""};
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  char* envp[] = {nullptr};
  pid_t kilnd = -1;
  posix_spawn(&kilnd, argv[0], &actions, nullptr, argv.data(), envp);
  posix_spawn_file_actions_destroy(&actions);

  RealClock clock;
  std::vector<double> latencies;
  int missed = 0;
  for (int i = 1; i <= kChanges; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(i == 1 ? 1000 : 150));
    Write(dir / "m", i);
    const int64_t renamed = ToUnixMillis(clock.SystemNow());
    fs::rename(dir / "m/.web.yaml.tmp", dir / "m/web.yaml");
    int64_t spawned = -1;
    for (int tries = 0; tries < 500 && spawned < 0; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      spawned = SpawnTime(log, i + 1);  // revision 1 is version 0
    }
    if (spawned < 0) {
      ++missed;
      continue;
    }
    latencies.push_back(static_cast<double>(spawned - renamed));
  }
  ::kill(kilnd, SIGKILL);
  ::waitpid(kilnd, nullptr, 0);
  bench::KillInstancesOf(dir / "state");
  std::sort(latencies.begin(), latencies.end());
  if (latencies.empty()) {
    std::printf("rename -> first new instance: no change was seen (see %s)\n", log.c_str());
    return 1;
  }
  auto pct = [&](double p) { return latencies[static_cast<size_t>(p * (latencies.size() - 1))]; };
  std::printf("manifest rename -> first instance of the new revision spawned, %zu changes%s:\n",
              latencies.size(), missed ? " (some missed)" : "");
  std::printf(
      "  median %.0f ms, p99 %.0f ms, max %.0f ms (target p99 < 50 ms; log stamps are ms)\n",
      pct(0.5), pct(0.99), latencies.back());
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("latency_bench", kiln::Main); }
