// Starting instances through the process driver vs. a plain posix_spawn loop of the same binary.
// Prints both times, their ratio (target: driver <= 1.3x the plain loop) and the peak RSS of this
// process after the driver rounds. Never fails on a time.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <thread>

#include "bench/bench_util.h"
#include "common/logging.h"
#include "deploy/artifact_store.h"
#include "deploy/process_driver.h"

namespace kiln {
namespace {

constexpr int kInstances = 1000;
constexpr int kRounds = 3;

// The plain loop: posix_spawn in a new session, like a minimal supervisor would, with output to
// /dev/null, or (like for like with the driver) appended to a log file per instance in `log_dir`.
double PlainLoop(const std::string& binary, const std::filesystem::path& log_dir) {
  if (!log_dir.empty()) std::filesystem::create_directories(log_dir);
  std::vector<pid_t> pids;
  pids.reserve(kInstances);
  auto begin = std::chrono::steady_clock::now();
  for (int i = 0; i < kInstances; ++i) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    std::string log = log_dir.empty()
                          ? std::string("/dev/null")
                          : (log_dir / ("plain-" + std::to_string(i) + ".log")).string();
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);
    char* argv[] = {const_cast<char*>(binary.c_str()), const_cast<char*>("60"), nullptr};
    char* envp[] = {nullptr};
    pid_t pid;
    if (posix_spawn(&pid, binary.c_str(), &actions, &attr, argv, envp) == 0) pids.push_back(pid);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
  }
  double took = bench::Seconds(std::chrono::steady_clock::now() - begin);
  for (pid_t pid : pids) ::kill(pid, SIGKILL);
  for (pid_t pid : pids) ::waitpid(pid, nullptr, 0);
  return took;
}

double DriverRound(boost::asio::io_context& io, ProcessDriver& driver, const std::string& digest,
                   int round) {
  std::vector<InstanceHandle> handles;
  int failed = 0;
  auto begin = std::chrono::steady_clock::now();
  for (int i = 0; i < kInstances; ++i) {
    InstanceSpec s;
    s.instance = "bench-" + std::to_string(round * kInstances + i);
    s.service = "bench";
    s.revision = 1;
    s.artifact_sha256 = digest;
    s.command = {"{artifact}", "60"};
    driver.Start(s, [&](StatusOr<InstanceHandle> h) {
      if (h.ok())
        handles.push_back(*h);
      else
        ++failed;
    });
  }
  while (static_cast<int>(handles.size()) + failed < kInstances) io.run_one();
  double took = bench::Seconds(std::chrono::steady_clock::now() - begin);
  if (failed) std::printf("  (%d starts failed)\n", failed);
  int stopped = 0;
  for (const auto& h : handles)
    driver.Stop(h, Duration(5000), [&](const StatusOr<ExitInfo>&) { ++stopped; });
  while (stopped < static_cast<int>(handles.size())) io.run_one();
  return took;
}

int Main() {
  SetupLogging(LogFormat::kText, LogLevel::kWarn);
  bench::PrintMachine();
  auto dir = std::filesystem::temp_directory_path() / ("kiln-bench-" + std::to_string(getpid()));
  auto store = ArtifactStore::Open(dir / "artifacts");
  if (!store.ok()) return 1;
  auto digest = store->Put("/bin/sleep");
  if (!digest.ok()) return 1;
  const std::string binary = store->PathFor(*digest).string();

  boost::asio::io_context io;
  ProcessDriver::Options o;
  o.log_dir = dir / "logs";
  o.artifacts = &*store;
  o.port_first = 21000;
  o.port_last = 22999;
  o.controller_id = ControllerIdForStateDir(dir);
  ProcessDriver driver(io, o);

  std::vector<double> null_out, logged, drv;
  for (int r = 0; r < kRounds; ++r) {
    null_out.push_back(PlainLoop(binary, {}));
    logged.push_back(PlainLoop(binary, dir / ("plain-logs-" + std::to_string(r))));
    drv.push_back(DriverRound(io, driver, *digest, r));
  }
  long rss = bench::PeakRssKiB();
  double n = bench::Median(null_out), p = bench::Median(logged), d = bench::Median(drv);
  std::printf("start %d instances of %s (median of %d rounds):\n", kInstances, "sleep 60", kRounds);
  std::printf("  plain posix_spawn loop, output to /dev/null:     %.3f s (%.0f starts/s)\n", n,
              kInstances / n);
  std::printf("  plain posix_spawn loop, output to a log file each: %.3f s (%.0f starts/s)\n", p,
              kInstances / p);
  std::printf("  process driver (log file each, port, pidfd):     %.3f s (%.0f starts/s)\n", d,
              kInstances / d);
  std::printf("  ratio driver / plain with log files: %.2fx (target <= 1.30x)\n", d / p);
  std::printf("  ratio driver / plain to /dev/null:   %.2fx\n", d / n);
  std::printf("  peak RSS of this process after the driver rounds: %.1f MiB\n", rss / 1024.0);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("driver_bench", kiln::Main); }
