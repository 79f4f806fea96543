#pragma once

// Runs the project's real executables from integration tests.

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

namespace kiln::testing {

// Path of a built executable ("kilnd", "kilnctl").
std::string BinPath(const std::string& name);
// Path inside the source tree ("examples/manifests").
std::string SourcePath(const std::string& rel);

struct RunResult {
  int exit_code = -1;  // -1 when it did not exit in time (it is then killed)
  std::string out;
  std::string err;
};

// Runs argv to completion with stdout and stderr captured.
RunResult Run(const std::vector<std::string>& argv,
              std::chrono::milliseconds timeout = std::chrono::seconds(30));

// A started child whose stdout and stderr go to files; killed with SIGKILL if still running at
// destruction.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::filesystem::path& log_dir);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  void Signal(int sig) const;
  // The exit code, 128+signal when killed by one, or -1 when still running after `timeout`.
  int Wait(std::chrono::milliseconds timeout);
  std::string Stdout() const;
  std::string Stderr() const;
  // Waits until stderr contains `needle`; false on timeout or when the child exits first.
  bool WaitForStderr(const std::string& needle, std::chrono::milliseconds timeout);
  bool WaitForStdout(const std::string& needle, std::chrono::milliseconds timeout);

 private:
  bool WaitForOutput(const std::filesystem::path& file, const std::string& needle,
                     std::chrono::milliseconds timeout);

  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
  std::filesystem::path out_, err_;
};

}  // namespace kiln::testing
