#pragma once

// A real kilnd on a temporary manifest and state directory, running kiln-testsvc instances,
// and what a test needs to look at: the store (read-only), the processes in /proc.

#include <signal.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "common/clock.h"
#include "deploy/cgroup.h"
#include "deploy/proc.h"
#include "deploy/process_driver.h"
#include "storage/sqlite_state_store.h"
#include "tests/integration/process.h"
#include "tests/test_util.h"

namespace kiln::testing {

inline bool WaitFor(const std::function<bool()>& pred,
                    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

class KilndHarness {
 public:
  KilndHarness() { std::filesystem::create_directories(tmp_ / "m"); }
  // Never throws (std::filesystem may, listing /proc or cgroups): a clean-up that fails is
  // reported, and the test's own result stands.
  ~KilndHarness() {
    kilnd_.reset();  // SIGKILL if still running
    try {
      KillInstances();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "KilndHarness: cannot clean up %s: %s\n", tmp_.path().c_str(), e.what());
    }
  }

  std::filesystem::path manifests() const { return tmp_ / "m"; }
  std::filesystem::path state() const { return tmp_ / "state"; }

  // A service running kiln-testsvc; `flags` go on its command line.
  void Declare(
      const std::string& name, const std::string& version, int replicas, const std::string& update,
      const std::string& flags = "",
      const std::string& health =
          "{http: {path: /healthz}, interval: 100ms, timeout: 500ms, failure_threshold: 2}") {
    WriteFile(manifests() / (name + ".yaml"),
              Manifest(name, version, replicas, update, flags, health));
  }
  // The text Declare writes (for a test that puts it somewhere else: a git repository).
  std::string Manifest(
      const std::string& name, const std::string& version, int replicas, const std::string& update,
      const std::string& flags = "",
      const std::string& health =
          "{http: {path: /healthz}, interval: 100ms, timeout: 500ms, failure_threshold: 2}") const {
    std::string cmd = "[\"{artifact}\", \"--version-string\", \"" + version + "\"" + flags + "]";
    return "name: " + name + "\nversion: \"" + version +
           "\"\nreplicas: " + std::to_string(replicas) +
           "\nartifact: {path: " + BinPath("kiln-testsvc") + "}\ncommand: " + cmd +
           "\nhealth: " + health + "\nupdate: " + update + "\n" + extra_yaml_;
  }

  // `http_listen` is kilnd's --http-listen (port 0: kilnd picks one; HttpPort() reads it back).
  void Start(const std::vector<std::string>& extra = {},
             const std::string& http_listen = "127.0.0.1:0") {
    std::vector<std::string> argv = {
        BinPath("kilnd"),
        "--manifests",
        manifests_arg_.empty() ? manifests().string() : manifests_arg_,
        "--state",
        state().string(),
        "--port-range",
        std::to_string(PortWindow()) + "-" + std::to_string(PortWindow() + kPortWindowSize - 1),
        "--resync",
        "2s",
        "--stop-grace",
        stop_grace_,
        "--http-listen",
        http_listen};
    argv.insert(argv.end(), extra.begin(), extra.end());
    kilnd_ = std::make_unique<Child>(argv, tmp_.path());
  }
  // kilnd's --manifests for the next Start() (a git+ URL); default: manifests().
  void SetManifestsArg(const std::string& arg) { manifests_arg_ = arg; }
  // YAML lines every later Declare appends ("expose: {port: 18080}\n").
  void SetExtraYaml(const std::string& yaml) { extra_yaml_ = yaml; }
  // kilnd's --stop-grace for the next Start() (default 2s).
  void SetStopGrace(const std::string& grace) { stop_grace_ = grace; }
  std::string UnixAddr() const { return "unix:" + (state() / "kiln.sock").string(); }
  // The TCP port of --grpc-listen (HOST:0 picks one), from STATE/kilnd.addr; 0 if none.
  int TcpPort() { return BoundPort("grpc_tcp"); }
  // The HTTP port (--http-listen HOST:0 picks one), from STATE/kilnd.addr; 0 if none.
  int HttpPort() { return BoundPort("http"); }
  // What this kilnd wrote to STATE/kilnd.addr once it had bound everything: waits for the file
  // of this kilnd's pid (one of an earlier, killed kilnd may still be there). Null on timeout.
  nlohmann::json Addr(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    nlohmann::json addr;
    WaitFor(
        [&] {
          std::ifstream in(state() / "kilnd.addr");
          if (!in) return false;
          addr = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
          return addr.is_object() && addr.value("pid", -1) == kilnd_->pid();
        },
        timeout);
    return addr.is_object() && addr.value("pid", -1) == kilnd_->pid() ? addr : nlohmann::json();
  }
  // The port of "HOST:PORT" at `key` in kilnd.addr; 0 when it is not there.
  int BoundPort(const std::string& key) {
    nlohmann::json addr = Addr();
    if (!addr.contains(key) || !addr[key].is_string()) return 0;
    const std::string hostport = addr[key];
    return std::atoi(hostport.c_str() + hostport.rfind(':') + 1);
  }
  // The TCP ports this kilnd listens on, from /proc: its socket descriptors matched with the
  // kernel's listening sockets. For when it could not write kilnd.addr (a full disk).
  std::set<int> ListeningTcpPorts() {
    std::set<std::string> inodes;  // "socket:[N]" of kilnd's descriptors
    const auto fds = std::filesystem::path("/proc") / std::to_string(kilnd_->pid()) / "fd";
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(fds, ec)) {
      std::error_code link_ec;
      const std::string target = std::filesystem::read_symlink(e.path(), link_ec).string();
      if (target.rfind("socket:[", 0) == 0) inodes.insert(target.substr(8, target.size() - 9));
    }
    std::set<int> ports;
    for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
      std::ifstream in(table);
      std::string line;
      std::getline(in, line);  // header
      // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
      while (std::getline(in, line)) {
        std::istringstream f(line);
        std::string sl, local, remote, st, queues, timer, retransmits, uid, timeout, inode;
        f >> sl >> local >> remote >> st >> queues >> timer >> retransmits >> uid >> timeout >>
            inode;
        if (st != "0A" || !inodes.count(inode)) continue;  // 0A: LISTEN
        ports.insert(std::stoi(local.substr(local.rfind(':') + 1), nullptr, 16));
      }
    }
    return ports;
  }
  const TempDir& tmp() const { return tmp_; }
  bool WaitReady() { return kilnd_->WaitForStderr("kilnd ready", std::chrono::seconds(30)); }
  Child& kilnd() { return *kilnd_; }
  void Kill9() {
    kilnd_->Signal(SIGKILL);
    kilnd_->Wait(std::chrono::seconds(10));
  }

  // A fresh read-only view of the store (kilnd writes meanwhile).
  std::unique_ptr<SqliteStateStore> Store() {
    auto s = SqliteStateStore::Open(
        {.path = (state() / "kiln.db").string(), .clock = &clock_, .read_only = true});
    return s.ok() ? std::move(s).value() : nullptr;
  }
  std::vector<InstanceRecord> Live(const std::string& service) {
    auto s = Store();
    if (!s) return {};
    auto l = s->ListInstances(service, false);
    return l.ok() ? *l : std::vector<InstanceRecord>{};
  }
  int Healthy(const std::string& service, int64_t revision = 0) {
    int n = 0;
    for (const auto& i : Live(service)) {
      n += i.state == InstanceState::kHealthy && (revision == 0 || i.revision == revision);
    }
    return n;
  }
  // The service's start error once it has one (a start that cannot succeed); "" on timeout.
  std::string WaitStartError(const std::string& name) {
    std::string error;
    WaitFor([&] {
      auto s = Service(name);
      error = s.ok() ? s->start_error : "";
      return !error.empty();
    });
    return error;
  }
  StatusOr<ServiceRecord> Service(const std::string& name) {
    auto s = Store();
    if (!s) return UnavailableError("no store yet");
    return s->GetService(name);
  }
  std::vector<EventRecord> Events(const std::string& service) {
    auto s = Store();
    if (!s) return {};
    auto e = s->ReadEvents({.service = service, .limit = 100000});
    return e.ok() ? *e : std::vector<EventRecord>{};
  }
  bool HasEvent(const std::string& service, EventKind kind) {
    for (const auto& e : Events(service)) {
      if (e.kind == kind) return true;
    }
    return false;
  }

  // pid -> instance for every process in /proc carrying this kilnd's identity (session leaders).
  std::map<pid_t, std::string> InstanceProcesses() {
    std::map<pid_t, std::string> out;
    const std::string id = ControllerIdForStateDir(state());
    for (pid_t pid : proc::ListPids()) {
      auto st = proc::ReadStat(pid);
      if (!st.ok() || st->session != pid || st->state == 'Z') continue;
      auto env = proc::ReadEnviron(pid);
      if (env["KILN_CONTROLLER"] == id) out[pid] = env["KILN_INSTANCE"];
    }
    return out;
  }

  // Every live row has its process, and every process is a live row: nothing runs untracked.
  std::string TrackingProblems(const std::vector<std::string>& services) {
    std::map<std::string, pid_t> rows;
    std::string problems;
    for (const auto& s : services) {
      for (const auto& i : Live(s)) {
        if (i.state == InstanceState::kPending || i.state == InstanceState::kDraining) {
          problems += i.name + " is still " + std::string(InstanceStateName(i.state)) + "; ";
          continue;
        }
        rows[i.name] = static_cast<pid_t>(std::atoi(i.handle.c_str() + 4));
      }
    }
    auto procs = InstanceProcesses();
    for (const auto& [pid, name] : procs) {
      auto it = rows.find(name);
      if (it == rows.end())
        problems += "pid " + std::to_string(pid) + " (" + name + ") runs untracked; ";
      else if (it->second != pid)
        problems += name + " row says pid " + std::to_string(it->second) + " but " +
                    std::to_string(pid) + " runs; ";
    }
    for (const auto& [name, pid] : rows) {
      bool found = false;
      for (const auto& [p, n] : procs) found |= n == name;
      if (!found) problems += name + " is live in the store but no process runs; ";
    }
    return problems;
  }

  // One process carrying this kilnd's identity: an instance's leader or anything it started
  // (children inherit the environment), wherever it went since (own session, reparented).
  struct InstanceProcess {
    pid_t pid = 0;
    pid_t ppid = 0;
    pid_t pgrp = 0;
    pid_t session = 0;
    uint64_t start_time = 0;  // clock ticks after boot, as in the process driver's handles
    std::string instance;     // its KILN_INSTANCE
  };
  // Every live (not zombie) process in /proc with this kilnd's KILN_CONTROLLER, leaders or not.
  std::vector<InstanceProcess> ControllerProcesses() {
    std::vector<InstanceProcess> out;
    const std::string id = ControllerIdForStateDir(state());
    for (pid_t pid : proc::ListPids()) {
      auto env = proc::ReadEnviron(pid);
      if (env["KILN_CONTROLLER"] != id) continue;
      // "pid (comm) state ppid pgrp session ..." with starttime as field 22; comm may hold ')'.
      std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
      size_t close = stat.rfind(')');
      if (close == std::string::npos) continue;  // gone meanwhile
      std::istringstream fields(stat.substr(close + 2));
      std::string field;
      std::vector<std::string> f;
      while (fields >> field) f.push_back(field);
      if (f.size() < 20 || f[0] == "Z" || f[0] == "X") continue;
      InstanceProcess p;
      p.pid = pid;
      p.ppid = static_cast<pid_t>(std::stol(f[1]));
      p.pgrp = static_cast<pid_t>(std::stol(f[2]));
      p.session = static_cast<pid_t>(std::stol(f[3]));
      p.start_time = std::stoull(f[19]);
      p.instance = env["KILN_INSTANCE"];
      out.push_back(std::move(p));
    }
    return out;
  }

  // Kills every process of this kilnd's instances: the leaders' groups, and whatever escaped
  // them (children in their own session, or left behind when their leader stopped).
  void KillInstances() {
    for (const auto& [pid, name] : InstanceProcesses()) ::kill(-pid, SIGKILL);
    for (const auto& p : ControllerProcesses()) ::kill(p.pid, SIGKILL);
    for (pid_t pid : ProxyProcesses()) ::kill(pid, SIGKILL);
    RemoveCgroups();
  }

  // The kiln-proxy processes this kilnd's supervisor started (they outlive kilnd): marked with
  // KILN_SUPERVISOR_STATE=STATE/proxy.
  std::vector<pid_t> ProxyProcesses() {
    std::vector<pid_t> out;
    const std::string mark = (state() / "proxy").string();
    for (pid_t pid : proc::ListPids()) {
      auto st = proc::ReadStat(pid);
      if (!st.ok() || st->state == 'Z') continue;
      if (proc::ReadEnviron(pid)["KILN_SUPERVISOR_STATE"] == mark) out.push_back(pid);
    }
    return out;
  }

  // The instances' cgroups (the process driver makes one per instance under
  // <kilnd's cgroup>/kiln-<controller id>), removed once their processes are gone, so test runs
  // leave nothing behind in /sys/fs/cgroup.
  void RemoveCgroups() {
    auto own = cgroup::OwnCgroupDir();  // kilnd ran in the test's own cgroup
    if (!own.ok()) return;
    const auto parent = *own / ("kiln-" + ControllerIdForStateDir(state()));
    std::error_code ec;
    if (!std::filesystem::is_directory(parent, ec)) return;
    WaitFor(
        [&] {
          std::error_code it_ec;
          for (const auto& e : std::filesystem::directory_iterator(parent, it_ec)) {
            if (!e.is_directory()) continue;
            (void)cgroup::KillAll(e.path());
            (void)cgroup::Remove(e.path());
          }
          return cgroup::Remove(parent).ok() && !std::filesystem::exists(parent, it_ec);
        },
        std::chrono::seconds(5));
  }

 private:
  TempDir tmp_;
  std::string manifests_arg_;
  FakeClock clock_;  // only for the read-only store's timestamps, which it never writes
  std::unique_ptr<Child> kilnd_;
  std::string stop_grace_ = "2s";
  std::string extra_yaml_;
};

}  // namespace kiln::testing
