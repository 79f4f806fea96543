#pragma once

// A real Docker engine for tests tagged [docker]: dockerd started by the test with its own
// data root, exec root, socket, pidfile and bridge (kilnbrN, 10.211.N.0/24, N held by a lock
// file so parallel tests never share one), stopped and removed at the end even when the test
// fails. Several can run at once (a test of several hosts starts two): nothing is shared. Images
// are made offline: a tar of kiln-testsvc and the shared libraries it needs, imported through the
// API (POST /images/create?fromSrc=-), so they have an image ID and no repository digest.
//
// When dockerd cannot start at all (not installed, no permission for bridges), Start() says why
// and the test SKIPs with that message printed.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/url.h"
#include "deploy/docker_client.h"
#include "tests/test_util.h"

extern char** environ;

namespace kiln::testing {

// Runs a command to its end (output to /dev/null or `out_file`); its exit code, -1 if it could
// not run.
inline int RunCommand(const std::vector<std::string>& argv, const std::string& out_file = "") {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  const std::string out = out_file.empty() ? "/dev/null" : out_file;
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class DockerEngine {
 public:
  DockerEngine() = default;
  ~DockerEngine() { Stop(); }
  DockerEngine(const DockerEngine&) = delete;
  DockerEngine& operator=(const DockerEngine&) = delete;

  // "" when the engine answers; else why it could not start (the test then skips).
  std::string Start() {
    // Short paths: a unix socket's path is limited to 107 bytes.
    std::string base = "/tmp/kiln-dockerd-XXXXXX";
    if (::mkdtemp(base.data()) == nullptr) return "cannot make a directory under /tmp";
    dir_ = base;
    if (RunCommand({"dockerd", "--version"}) != 0) return "dockerd is not installed";
    for (int i = 0; i < 50 && lock_fd_ < 0; ++i) {
      std::string lock = "/tmp/kiln-test-bridge-" + std::to_string(i) + ".lock";
      int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
      if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0) {
        lock_fd_ = fd;
        slot_ = i;
      } else if (fd >= 0) {
        ::close(fd);
      }
    }
    if (lock_fd_ < 0) return "no free bridge slot";
    bridge_ = "kilnbr" + std::to_string(slot_);
    RunCommand({"ip", "link", "del", bridge_});  // left behind by a killed test run
    const std::string log = (dir_ / "setup.log").string();
    if (RunCommand({"ip", "link", "add", bridge_, "type", "bridge"}, log) != 0 ||
        RunCommand(
            {"ip", "addr", "add", "10.211." + std::to_string(slot_) + ".1/24", "dev", bridge_},
            log) != 0 ||
        RunCommand({"ip", "link", "set", bridge_, "up"}, log) != 0) {
      return "cannot make bridge " + bridge_ + ": " + ReadFile(log);
    }
    bridge_made_ = true;
    socket_ = (dir_ / "d.sock").string();
    return Launch();
  }

  // Stops dockerd (SIGTERM: its containers stop with it) and starts it again on the same
  // directories, as after a crash or an upgrade of the engine. "" when it answers again.
  std::string Restart() {
    StopDaemon();
    return Launch();
  }

  // SIGKILL to dockerd: the engine stops answering at once, as when its machine is lost. What
  // its containers do meanwhile is up to containerd; Relaunch() brings the engine back.
  void KillDaemon() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  // dockerd again on the same directories after KillDaemon(). "" when it answers.
  std::string Relaunch() { return Launch(); }

  // The image `id` ("sha256:<hex>") saved from this engine and loaded into `other`, so both hold
  // it under the same ID (an import on each would make two IDs: the import time is part of the
  // image's configuration). False when either call fails.
  bool CopyImageTo(DockerEngine& other, const std::string& id) {
    StatusOr<docker::Response> saved = client_->CallSync(
        docker::Method::kGet, "/images/" + id + "/get", {}, std::chrono::seconds(60));
    if (!saved.ok() || saved->status != 200) return false;
    StatusOr<docker::Response> loaded =
        other.client().CallSync(docker::Method::kPost, "/images/load?quiet=1", saved->body,
                                std::chrono::seconds(60), "application/x-tar");
    if (!loaded.ok() || loaded->status != 200) return false;
    StatusOr<docker::Response> there =
        other.client().CallSync(docker::Method::kGet, "/images/" + id + "/json");
    return there.ok() && there->status == 200;
  }

 private:
  std::string Launch() {
    std::vector<std::string> argv = {"dockerd",
                                     "--data-root=" + (dir_ / "data").string(),
                                     "--exec-root=" + (dir_ / "exec").string(),
                                     "--host=unix://" + socket_,
                                     "--pidfile=" + (dir_ / "d.pid").string(),
                                     "--bridge=" + bridge_,
                                     "--iptables=false",
                                     "--ip-masq=false",
                                     "--log-level=warn"};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    const std::string dlog = (dir_ / "dockerd.log").string();
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, dlog.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, dlog.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    std::vector<char*> args;
    args.reserve(argv.size() + 1);
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int rc = posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      pid_ = -1;
      return "cannot run dockerd: " + std::string(strerror(rc));
    }
    client_.emplace(docker::Client::Options{.endpoint = *docker::ParseEndpoint(endpoint()),
                                            .timeout = std::chrono::seconds(5)});
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return "dockerd exited at start: " + Tail(ReadFile(dlog));
      }
      if (std::filesystem::exists(socket_)) {
        StatusOr<docker::Response> r = client_->CallSync(docker::Method::kGet, "/info");
        if (r.ok() && r->status == 200) return "";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return "dockerd did not answer within 60s: " + Tail(ReadFile(dlog));
  }

  void StopDaemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      bool done = false;
      for (int i = 0; i < 300 && !done; ++i) {  // dockerd stops its containers first
        done = ::waitpid(pid_, &status, WNOHANG) == pid_;
        if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      if (!done) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
      }
      pid_ = -1;
    }
  }

 public:
  // Stops dockerd (its containers with it) and removes everything it made. Idempotent.
  void Stop() {
    StopDaemon();
    if (bridge_made_) RunCommand({"ip", "link", "del", bridge_});
    bridge_made_ = false;
    if (lock_fd_ >= 0) ::close(lock_fd_);
    lock_fd_ = -1;
    if (!dir_.empty()) {
      UnmountUnder(dir_);
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
      dir_.clear();
    }
  }

  std::string endpoint() const { return "unix://" + socket_; }
  docker::Client& client() { return *client_; }
  std::string Log() const { return ReadFile(dir_ / "dockerd.log"); }

  // Imports an image holding kiln-testsvc (at /kiln-testsvc) and what it links, plus a file
  // /VERSION holding `version`, so that two versions are two image IDs. Returns "sha256:<hex>".
  std::string ImportTestImage(const std::string& version) {
    const std::filesystem::path root = dir_ / ("rootfs-" + version);
    const std::string svc = std::string(KILN_BIN_DIR) + "/kiln-testsvc";
    std::filesystem::create_directories(root);
    std::filesystem::copy_file(svc, root / "kiln-testsvc",
                               std::filesystem::copy_options::overwrite_existing);
    const std::string ldd_out = (dir_ / ("ldd-" + version)).string();
    RunCommand({"ldd", svc}, ldd_out);
    std::istringstream lines(ReadFile(ldd_out));
    for (std::string line; std::getline(lines, line);) {
      size_t slash = line.find('/');
      if (slash == std::string::npos) continue;
      std::string path = line.substr(slash, line.find(' ', slash) - slash);
      std::filesystem::path dest = root / path.substr(1);
      std::filesystem::create_directories(dest.parent_path());
      std::filesystem::copy_file(path, dest, std::filesystem::copy_options::overwrite_existing);
    }
    WriteFile(root / "VERSION", version + "\n");
    std::filesystem::create_directories(root / "tmp");
    const std::string tar = (dir_ / ("image-" + version + ".tar")).string();
    if (RunCommand({"tar", "-C", root.string(), "-cf", tar, "."}) != 0) return "";
    StatusOr<docker::Response> r =
        client_->CallSync(docker::Method::kPost, "/images/create?fromSrc=-", ReadFile(tar),
                          std::chrono::seconds(60), "application/x-tar");
    if (!r.ok() || r->status != 200) return "";
    std::string id;
    std::istringstream out(r->body);
    for (std::string line; std::getline(out, line);) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_object() && j.contains("status") && j["status"].is_string()) {
        std::string s = j["status"].get<std::string>();
        if (s.rfind("sha256:", 0) == 0) id = s;
      }
    }
    return id;
  }

  // The containers of the engine with this label filter ("kiln.controller=..."), exited too.
  nlohmann::json Containers(const std::string& label) {
    nlohmann::json filters = nlohmann::json::object();
    filters["label"] = nlohmann::json::array({label});
    StatusOr<docker::Response> r = client_->CallSync(
        docker::Method::kGet, "/containers/json?all=1&filters=" + UrlEncode(filters.dump()));
    if (!r.ok() || r->status != 200) return nlohmann::json::array();
    return nlohmann::json::parse(r->body, nullptr, false);
  }

  // `docker kill`: SIGKILL to the container's process, through the API.
  bool Kill(const std::string& container_id) {
    StatusOr<docker::Response> r = client_->CallSync(
        docker::Method::kPost, "/containers/" + container_id + "/kill?signal=KILL");
    return r.ok() && r->status == 204;
  }

 private:
  static std::string Tail(const std::string& s) {
    return s.size() > 2000 ? s.substr(s.size() - 2000) : s;
  }

  static void UnmountUnder(const std::filesystem::path& dir) {
    std::ifstream mounts("/proc/self/mounts");
    std::vector<std::string> points;
    for (std::string line; std::getline(mounts, line);) {
      std::istringstream fields(line);
      std::string dev, point;
      fields >> dev >> point;
      if (point.rfind(dir.string(), 0) == 0) points.push_back(point);
    }
    for (auto it = points.rbegin(); it != points.rend(); ++it) ::umount2(it->c_str(), MNT_DETACH);
  }

  std::filesystem::path dir_;
  std::string socket_;
  std::string bridge_;
  bool bridge_made_ = false;
  int slot_ = -1;
  int lock_fd_ = -1;
  pid_t pid_ = -1;
  std::optional<docker::Client> client_;
};

}  // namespace kiln::testing
