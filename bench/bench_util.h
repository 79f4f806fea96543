#pragma once

// What every benchmark prints about where it ran, and small measuring helpers.

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "deploy/proc.h"
#include "deploy/process_driver.h"

namespace kiln::bench {

inline std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown cpu";
}

inline void PrintMachine() {
  std::printf("machine: %s, %ld cores, %ld MiB\n", CpuModel().c_str(),
              sysconf(_SC_NPROCESSORS_ONLN),
              sysconf(_SC_PHYS_PAGES) / 1024 * sysconf(_SC_PAGESIZE) / 1024);
}

inline long PeakRssKiB() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

inline double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// kilnd leaves its instances running by design (a controller's stop must not stop the data
// plane); a benchmark that ran one kills the instances of its state directory afterwards.
inline void KillInstancesOf(const std::filesystem::path& state_dir) {
  const std::string id = ControllerIdForStateDir(state_dir);
  for (pid_t pid : proc::ListPids()) {
    if (proc::ReadEnviron(pid)["KILN_CONTROLLER"] == id) ::kill(-pid, SIGKILL);
  }
}

// A benchmark's whole main: what a library throws (Asio, std::filesystem, a parse) ends it with
// one line on stderr and exit 1 instead of std::terminate.
template <typename Main>
int RunMain(const char* name, Main&& main) {
  try {
    return main();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace kiln::bench
