#include "tests/integration/process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/test_util.h"

extern char** environ;

namespace kiln::testing {
namespace {

pid_t Spawn(const std::vector<std::string>& argv, const std::filesystem::path& out,
            const std::filesystem::path& err) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot spawn " + argv[0] + ": " + std::strerror(rc));
  return pid;
}

int DecodeStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

std::string BinPath(const std::string& name) { return std::string(KILN_BIN_DIR) + "/" + name; }
std::string SourcePath(const std::string& rel) { return std::string(KILN_SOURCE_DIR) + "/" + rel; }

Child::Child(const std::vector<std::string>& argv, const std::filesystem::path& log_dir) {
  static int counter = 0;
  std::string stem = std::filesystem::path(argv[0]).filename().string() + "-" +
                     std::to_string(::getpid()) + "-" + std::to_string(counter++);
  out_ = log_dir / (stem + ".out");
  err_ = log_dir / (stem + ".err");
  pid_ = Spawn(argv, out_, err_);
}

Child::~Child() {
  if (!reaped_ && pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

void Child::Signal(int sig) const { ::kill(pid_, sig); }

int Child::Wait(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!reaped_) {
    pid_t r = ::waitpid(pid_, &status_, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return DecodeStatus(status_);
}

std::string Child::Stdout() const { return ReadFile(out_); }
std::string Child::Stderr() const { return ReadFile(err_); }

bool Child::WaitForStderr(const std::string& needle, std::chrono::milliseconds timeout) {
  return WaitForOutput(err_, needle, timeout);
}

bool Child::WaitForStdout(const std::string& needle, std::chrono::milliseconds timeout) {
  return WaitForOutput(out_, needle, timeout);
}

bool Child::WaitForOutput(const std::filesystem::path& file, const std::string& needle,
                          std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ReadFile(file).find(needle) != std::string::npos) return true;
    if (!reaped_ && ::waitpid(pid_, &status_, WNOHANG) == pid_) reaped_ = true;
    if (reaped_) return ReadFile(file).find(needle) != std::string::npos;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

RunResult Run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  TempDir logs;
  RunResult r;
  {
    Child c(argv, logs.path());
    r.exit_code = c.Wait(timeout);
    r.out = c.Stdout();
    r.err = c.Stderr();
  }
  return r;
}

}  // namespace kiln::testing
