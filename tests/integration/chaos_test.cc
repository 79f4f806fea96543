// The chaos suite (issue 9): a real kilnd on a real SQLite file, running real kiln-testsvc
// instances, is SIGKILLed at a random moment after every change (a rolling update, a scale, a
// manual rollback through the API or kilnctl, a version that fails health so that the automatic
// rollback fires), restarted, and after each convergence checked from three sides:
//   /proc   every process with this kilnd's KILN_CONTROLLER belongs to an instance the store has
//           live, as its recorded pid (+ start time) or a descendant of it: nothing orphaned, no
//           instance running twice, and every live row has its process: nothing lost unnoticed;
//   SQLite  integrity_check, revisions never change, instance ids never come back, and exactly
//           `replicas` healthy instances of the expected target template, nothing else live;
//   API     GetService agrees with the store and with what was asked for.
// Every violation is counted by kind and printed with its iteration, the seed and what was seen.
//
// Environment: KILN_CHAOS_SEED (default: random, printed), KILN_CHAOS_ITERATIONS (default 20, the
// short version `make test` runs; `make chaos` runs a few hundred), KILN_CHAOS_CONVERGE_TIMEOUT_S
// (default 60), KILN_CHAOS_SETSID_CHILD=1 (some versions leave a child in a session of its own,
// which only a cgroup can take down), KILN_CHAOS_KEEP=DIR (on violations, the state directory and
// kilnd's logs are copied there).

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "common/sha256.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "storage/sqlite.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

namespace pb = ::kiln::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using SteadyClock = std::chrono::steady_clock;

constexpr char kService[] = "web";
constexpr int kHistoryLimit = 4;  // small, so that pruning happens under the kills too

int64_t EnvInt(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::strtoll(v, nullptr, 10);
}

struct Settings {
  uint64_t seed = 0;
  int iterations = 20;
  std::chrono::seconds converge_timeout{60};
  bool setsid_child = false;
  std::string keep_dir;

  static Settings FromEnv() {
    Settings s;
    const char* seed = std::getenv("KILN_CHAOS_SEED");
    s.seed = seed != nullptr && *seed != '\0'
                 ? std::strtoull(seed, nullptr, 10)
                 : (static_cast<uint64_t>(std::random_device{}()) << 20) ^
                       static_cast<uint64_t>(SteadyClock::now().time_since_epoch().count());
    s.iterations = static_cast<int>(EnvInt("KILN_CHAOS_ITERATIONS", 20));
    s.converge_timeout = std::chrono::seconds(EnvInt("KILN_CHAOS_CONVERGE_TIMEOUT_S", 60));
    s.setsid_child = EnvInt("KILN_CHAOS_SETSID_CHILD", 0) != 0;
    if (const char* keep = std::getenv("KILN_CHAOS_KEEP")) s.keep_dir = keep;
    return s;
  }
};

// What the manifest file says.
struct Declared {
  std::string version;
  int replicas = 3;
  bool child = false;         // kiln-testsvc --child-ignoring-sigterm
  bool child_setsid = false;  // ... --child-setsid
  bool bad = false;           // /healthz answers 503 from the start
  std::string start_delay;    // "" or a duration
  std::string update;         // the update: block

  std::string Flags() const {
    std::string f;
    if (bad) f += ", \"--unhealthy-after\", \"0s\"";
    if (!start_delay.empty()) f += ", \"--start-delay\", \"" + start_delay + "\"";
    if (child) f += ", \"--child-ignoring-sigterm\"";
    if (child_setsid) f += ", \"--child-setsid\"";
    return f;
  }
};

enum class Action { kVersion, kScale, kManualRollback, kAutoRollback };

const char* ActionName(Action a) {
  switch (a) {
    case Action::kVersion:
      return "version";
    case Action::kScale:
      return "scale";
    case Action::kManualRollback:
      return "manual-rollback";
    case Action::kAutoRollback:
      return "auto-rollback";
  }
  return "?";
}

// What the service must converge to after a step.
struct Expectation {
  std::string version;           // the target template's version
  std::string hash;              // when set: the target's template hash
  int64_t revision = 0;          // when set: exactly this target revision
  int64_t newer_than = 0;        // the target is a revision written after this one
  bool pinned = false;           // the target is a pin
  std::string pin_actor;         // when set: the pinned revision's actor ("auto")
  int64_t rolled_back_from = 0;  // when set: the pinned revision reinstates this one
};

// One consistent read of the store.
struct Snapshot {
  bool ok = false;
  std::string error;
  ServiceRecord service;
  std::vector<RevisionRecord> revisions;  // newest first
  std::vector<InstanceRecord> instances;  // all retained ones, by id
  std::optional<RolloutRecord> rollout;

  int64_t Target() const {
    return service.pinned_revision > 0 ? service.pinned_revision : service.desired_revision;
  }
  const RevisionRecord* Revision(int64_t n) const {
    for (const auto& r : revisions) {
      if (r.number == n) return &r;
    }
    return nullptr;
  }
  std::string HashOf(int64_t n) const {
    const RevisionRecord* r = Revision(n);
    return r ? r->template_hash : "";
  }
  std::vector<const InstanceRecord*> Live() const {
    std::vector<const InstanceRecord*> out;
    for (const auto& i : instances) {
      if (IsLive(i.state)) out.push_back(&i);
    }
    return out;
  }
};

std::string VersionOf(const RevisionRecord& r) {
  auto j = nlohmann::json::parse(r.template_json, nullptr, false);
  return j.is_object() && j.contains("version") && j["version"].is_string()
             ? j["version"].get<std::string>()
             : "<unreadable template>";
}

// "pid:<pid>:<start time>" -> (pid, start time); (0, 0) when it is not one.
std::pair<pid_t, uint64_t> ParseHandle(const std::string& h) {
  static const std::regex re("^pid:(\\d+):(\\d+)$");
  std::smatch m;
  if (!std::regex_match(h, m, re)) return {0, 0};
  return {static_cast<pid_t>(std::stol(m[1])), std::stoull(m[2])};
}

pid_t ParentOf(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  size_t close = stat.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream fields(stat.substr(close + 2));
  std::string state;
  pid_t ppid = 0;
  fields >> state >> ppid;
  return ppid;
}

bool DescendsFrom(pid_t pid, pid_t ancestor) {
  for (int hops = 0; pid > 1 && hops < 64; ++hops) {
    pid = ParentOf(pid);
    if (pid == ancestor) return true;
  }
  return false;
}

// `line` mentions instance `name` ("web-4" but not "web-42").
bool Mentions(const std::string& line, const std::string& name) {
  for (size_t at = line.find(name); at != std::string::npos; at = line.find(name, at + 1)) {
    size_t end = at + name.size();
    if (end == line.size() || !std::isdigit(static_cast<unsigned char>(line[end]))) return true;
  }
  return false;
}

struct Violation {
  int iteration = 0;
  std::string kind;
  std::string step;
  std::string detail;
  std::string logs;  // kilnd's log lines about the instances concerned
};

class ChaosRun {
 public:
  explicit ChaosRun(Settings settings) : s_(std::move(settings)), rng_(s_.seed) {
    h_.SetStopGrace("1s");
  }

  // The harness kills kilnd and every instance process (orphans included) on destruction.
  ~ChaosRun() = default;

  void Go() {
    const auto began = SteadyClock::now();
    declared_ = {.version = "1.0", .replicas = 3, .update = NormalPolicy()};
    WriteManifest();
    h_.Start();
    if (!h_.WaitReady()) {
      Record("kilnd_not_ready", "first start",
             "kilnd never logged ready:\n" + Tail(h_.kilnd().Stderr()));
      return;
    }
    step_ = "iteration 0: cold start of version 1.0 with 3 replicas";
    Expectation first{.version = "1.0"};
    CheckIteration(first);
    for (iteration_ = 1; iteration_ <= s_.iterations; ++iteration_) {
      const auto t0 = SteadyClock::now();
      Expectation e;
      const Action a = Choose();
      std::chrono::milliseconds kill_after = Apply(a, e);
      std::this_thread::sleep_for(kill_after);
      h_.Kill9();
      step_ += "; SIGKILL of kilnd after " + std::to_string(kill_after.count()) + " ms";
      if (!Restart()) break;
      const std::string converged = CheckIteration(e);
      ++done_;
      counts_[ActionName(a)]++;
      std::cerr
          << "chaos[" << iteration_ << "/" << s_.iterations << "] " << step_ << " -> "
          << std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - t0).count()
          << " ms: " << converged << "; violations so far " << violations_.size() << std::endl;
    }
    elapsed_ = SteadyClock::now() - began;
    // Not a violation by itself (recovery is allowed to stop what it finds), but each one ran
    // untracked until a restart noticed it: worth a line in the report.
    for (const auto& ev : h_.Events(kService)) {
      if (ev.kind == EventKind::kUnknownInstanceStopped) ++unknown_stopped_;
    }
    if (!violations_.empty() && !s_.keep_dir.empty()) Keep();
  }

  int done() const { return done_; }
  KilndHarness& harness() { return h_; }
  // kind -> what, from one pass over /proc and the store.
  std::map<std::string, std::vector<std::string>> ProcessProblemsForTest() {
    std::map<std::string, std::vector<std::string>> out;
    Snapshot snap = Read();
    if (!snap.ok) return {{"store_unreadable", {snap.error}}};
    for (const auto& [kind, list] : ProcessProblems(snap)) {
      for (const auto& p : list) out[kind].push_back(p.what);
    }
    return out;
  }
  const std::vector<Violation>& violations() const { return violations_; }

  std::string Report() const {
    std::ostringstream o;
    o << "chaos: seed " << s_.seed << " (KILN_CHAOS_SEED=" << s_.seed << "), " << done_ << " of "
      << s_.iterations << " iterations in "
      << std::chrono::duration_cast<std::chrono::seconds>(elapsed_).count() << " s; steps:";
    for (const auto& [k, n] : counts_) o << " " << k << "=" << n;
    o << "; " << unknown_stopped_
      << " unknown_instance_stopped events (ran untracked until a restart stopped them); "
      << violations_.size() << " violations";
    std::map<std::string, int> by_kind;
    for (const auto& v : violations_) by_kind[v.kind]++;
    for (const auto& [k, n] : by_kind) o << "\n  " << k << ": " << n;
    for (const auto& v : violations_) {
      o << "\n--- " << v.kind << " at iteration " << v.iteration << " (seed " << s_.seed
        << ")\n  step: " << v.step << "\n  seen: " << v.detail;
      if (!v.logs.empty()) o << "\n  kilnd log:\n" << v.logs;
    }
    return o.str();
  }

 private:
  // ------------------------------------------------------------------------------------------
  // Steps

  std::string NormalPolicy() {
    static const char* kStrategies[] = {"rolling", "rolling",    "rolling",
                                        "rolling", "blue-green", "recreate"};
    std::string strategy = kStrategies[Uniform(0, 5)];
    // max_surge and max_unavailable only apply to rolling (and canary).
    std::string counts = strategy != "rolling"
                             ? ""
                             : ", max_surge: " + std::to_string(Uniform(1, 2)) +
                                   ", max_unavailable: " + std::to_string(Uniform(0, 1));
    return "{strategy: " + strategy + counts + ", healthy_deadline: 30s, progress_deadline: 60s}";
  }

  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  Action Choose() {
    int roll = Uniform(0, 99);
    Action a = roll < 45   ? Action::kVersion
               : roll < 65 ? Action::kScale
               : roll < 85 ? Action::kManualRollback
                           : Action::kAutoRollback;
    if (a == Action::kManualRollback && RollbackSource() == 0) a = Action::kVersion;
    return a;
  }

  // The revision a manual rollback must reinstate: the newest one this run saw fully available
  // whose template differs from the current target's, among those the store still keeps.
  int64_t RollbackSource() {
    Snapshot snap = Read();
    if (!snap.ok) return 0;
    for (auto it = available_.rbegin(); it != available_.rend(); ++it) {
      if (it->second != current_.hash && snap.Revision(it->first) != nullptr) return it->first;
    }
    return 0;
  }

  std::chrono::milliseconds Apply(Action a, Expectation& e) {
    step_ = "iteration " + std::to_string(iteration_) + ": ";
    int max_kill_ms = 1500;
    switch (a) {
      case Action::kVersion: {
        declared_.version = "1." + std::to_string(iteration_);
        declared_.bad = false;
        declared_.child = Uniform(0, 99) < 30;
        declared_.child_setsid = declared_.child && s_.setsid_child && Uniform(0, 1) == 1;
        static const char* kDelays[] = {"", "", "100ms", "300ms"};
        declared_.start_delay = kDelays[Uniform(0, 3)];
        declared_.update = NormalPolicy();
        WriteManifest();
        e.version = declared_.version;
        e.newer_than = current_.revision;
        step_ += "version " + declared_.version + " (" + std::to_string(declared_.replicas) +
                 " replicas" + (declared_.child ? ", child ignoring SIGTERM" : "") +
                 (declared_.child_setsid ? " in its own session" : "") +
                 (declared_.start_delay.empty() ? "" : ", start delay " + declared_.start_delay) +
                 ", update " + declared_.update + ")";
        break;
      }
      case Action::kScale: {
        int to = declared_.replicas;
        while (to == declared_.replicas) to = Uniform(1, 4);
        step_ += "scale " + std::to_string(declared_.replicas) + " -> " + std::to_string(to) +
                 " (target revision " + std::to_string(current_.revision) + ")";
        declared_.replicas = to;
        declared_.update = NormalPolicy();
        WriteManifest();
        e.version = current_.version;
        e.hash = current_.hash;
        e.revision = current_.revision;
        e.pinned = current_.pinned;
        break;
      }
      case Action::kManualRollback: {
        const int64_t from = RollbackSource();
        const bool via_kilnctl = Uniform(0, 1) == 1;
        step_ += std::string("manual rollback via ") + (via_kilnctl ? "kilnctl" : "gRPC") +
                 " from revision " + std::to_string(current_.revision) +
                 " (expecting the template of revision " + std::to_string(from) + ")";
        int64_t written = 0, reinstated = 0;
        std::string error;
        if (via_kilnctl) {
          RunResult r =
              Run({BinPath("kilnctl"), "--addr", h_.UnixAddr(), "--timeout", "20", "rollback",
                   kService, "--reason", "chaos iteration " + std::to_string(iteration_)},
                  30s);
          std::smatch m;
          static const std::regex re("revision (\\d+) runs the template of revision (\\d+)");
          if (r.exit_code == 0 && std::regex_search(r.out, m, re)) {
            written = std::stoll(m[1]);
            reinstated = std::stoll(m[2]);
          } else {
            error = "kilnctl rollback exited " + std::to_string(r.exit_code) + ": " + r.out + r.err;
          }
        } else {
          auto stub = pb::Kiln::NewStub(
              grpc::CreateChannel(h_.UnixAddr(), grpc::InsecureChannelCredentials()));
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + 20s);
          pb::RollbackRequest q;
          q.set_service(kService);
          q.set_reason("chaos iteration " + std::to_string(iteration_));
          pb::RollbackResponse resp;
          grpc::Status st = stub->Rollback(&ctx, q, &resp);
          if (st.ok()) {
            written = resp.revision().number();
            reinstated = resp.revision().rolled_back_from();
          } else {
            error =
                "Rollback RPC: code " + std::to_string(st.error_code()) + ": " + st.error_message();
          }
        }
        if (!error.empty()) {
          Record("rollback_refused", step_, error);
          e.version = current_.version;
          e.hash = current_.hash;
          e.revision = current_.revision;
          e.pinned = current_.pinned;
          break;
        }
        step_ += "; wrote revision " + std::to_string(written) + " from revision " +
                 std::to_string(reinstated);
        if (reinstated != from) {
          Record("rollback_wrong_source", step_,
                 "rolled back to the template of revision " + std::to_string(reinstated) +
                     ", but the last revision fully available before the current one (with another "
                     "template) is " +
                     std::to_string(from));
        }
        e.revision = written;
        e.pinned = true;
        e.rolled_back_from = reinstated;
        e.hash = HashSeen(reinstated);
        e.version = VersionSeen(reinstated);
        break;
      }
      case Action::kAutoRollback: {
        declared_.version = "1." + std::to_string(iteration_) + "-bad";
        declared_.bad = true;
        declared_.child = Uniform(0, 99) < 30;
        declared_.child_setsid = declared_.child && s_.setsid_child && Uniform(0, 1) == 1;
        declared_.start_delay.clear();
        declared_.update =
            "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
            "progress_deadline: 3s, auto_rollback: true}";
        WriteManifest();
        step_ += "version " + declared_.version + " failing health (" +
                 std::to_string(declared_.replicas) + " replicas" +
                 (declared_.child ? ", child ignoring SIGTERM" : "") +
                 ", healthy_deadline 1s, progress_deadline 3s): expecting an automatic rollback to "
                 "revision " +
                 std::to_string(current_.revision) + "'s template";
        e.version = current_.version;
        e.hash = current_.hash;
        e.pinned = true;
        e.pin_actor = "auto";
        e.newer_than = current_.revision + 1;  // the failing revision comes in between
        max_kill_ms = 4000;                    // around the deadline and the rollback too
        break;
      }
    }
    return std::chrono::milliseconds(Uniform(0, max_kill_ms));
  }

  void WriteManifest() {
    const Declared& d = declared_;
    const std::string text =
        std::string("name: ") + kService + "\nversion: \"" + d.version +
        "\"\nreplicas: " + std::to_string(d.replicas) +
        "\nartifact: {path: " + BinPath("kiln-testsvc") +
        "}\ncommand: [\"{artifact}\", \"--version-string\", \"" + d.version + "\"" + d.Flags() +
        "]\nhealth: {http: {path: /healthz}, interval: 100ms, timeout: 500ms, failure_threshold: "
        "2}" +
        "\nupdate: " + d.update + "\nhistory_limit: " + std::to_string(kHistoryLimit) + "\n";
    // Written beside and renamed in, so kilnd never reads half a file.
    const fs::path staged = h_.tmp() / "web.yaml.staged";
    WriteFile(staged, text);
    fs::rename(staged, h_.manifests() / "web.yaml");
  }

  bool Restart() {
    for (int attempt = 0; attempt < 3; ++attempt) {
      h_.Start();
      if (h_.WaitReady()) return true;
      Record("kilnd_not_ready", step_,
             "kilnd did not become ready after a restart (attempt " + std::to_string(attempt + 1) +
                 "):\n" + Tail(h_.kilnd().Stderr()));
      h_.Kill9();
    }
    return false;
  }

  // ------------------------------------------------------------------------------------------
  // Reading

  Snapshot Read() {
    Snapshot snap;
    auto store = h_.Store();
    if (!store) {
      snap.error = "cannot open the store read-only";
      return snap;
    }
    Status st = store->Snapshot([&]() -> Status {
      ASSIGN_OR_RETURN(snap.service, store->GetService(kService));
      ASSIGN_OR_RETURN(snap.revisions, store->ListRevisions(kService));
      ASSIGN_OR_RETURN(snap.instances, store->ListInstances(kService, true));
      auto r = store->GetLatestRollout(kService);
      if (r.ok()) snap.rollout = *r;
      return Status::Ok();
    });
    snap.ok = st.ok();
    if (!st.ok()) snap.error = st.ToString();
    return snap;
  }

  // Why `snap` is not (yet) converged to `e`; "" when it is.
  std::string NotConverged(const Snapshot& snap, const Expectation& e) const {
    if (!snap.ok) return snap.error;
    const int64_t target = snap.Target();
    const RevisionRecord* rev = snap.Revision(target);
    if (rev == nullptr) return "target revision " + std::to_string(target) + " is not in the store";
    std::ostringstream why;
    if (VersionOf(*rev) != e.version) {
      why << "target revision " << target << " has version " << VersionOf(*rev) << ", expected "
          << e.version << "; ";
    }
    if (!e.hash.empty() && rev->template_hash != e.hash) {
      why << "target revision " << target << " has template " << rev->template_hash.substr(0, 12)
          << ", expected " << e.hash.substr(0, 12) << "; ";
    }
    if (e.revision > 0 && target != e.revision) {
      why << "target is revision " << target << ", expected " << e.revision << "; ";
    }
    if (e.newer_than > 0 && target <= e.newer_than) {
      why << "target is revision " << target << ", expected one newer than " << e.newer_than
          << "; ";
    }
    if (e.pinned != (snap.service.pinned_revision > 0)) {
      why << (e.pinned ? "not pinned" : "pinned to " + std::to_string(snap.service.pinned_revision))
          << "; ";
    }
    if (!e.pin_actor.empty() && rev->actor != e.pin_actor) {
      why << "target revision " << target << " was written by \"" << rev->actor << "\" (source "
          << RevisionSourceName(rev->source) << "), expected \"" << e.pin_actor << "\"; ";
    }
    if (!snap.rollout || snap.rollout->to_revision != target ||
        snap.rollout->state != RolloutState::kCompleted) {
      why << "latest rollout "
          << (snap.rollout ? "to revision " + std::to_string(snap.rollout->to_revision) + " is " +
                                 std::string(RolloutStateName(snap.rollout->state))
                           : std::string("missing"))
          << "; ";
    }
    int healthy = 0;
    for (const InstanceRecord* i : snap.Live()) {
      if (i->state == InstanceState::kHealthy && snap.HashOf(i->revision) == rev->template_hash) {
        ++healthy;
      } else {
        why << i->name << " (revision " << i->revision << ") is " << InstanceStateName(i->state)
            << "; ";
      }
    }
    if (healthy != declared_.replicas) {
      why << healthy << " healthy of the target template, replicas " << declared_.replicas << "; ";
    }
    return why.str();
  }

  // ------------------------------------------------------------------------------------------
  // Checking

  // Returns what it converged to, for the progress line.
  std::string CheckIteration(const Expectation& e) {
    Snapshot snap;
    std::string why = "never read";
    const auto deadline = SteadyClock::now() + s_.converge_timeout;
    while (SteadyClock::now() < deadline) {
      snap = Read();
      why = NotConverged(snap, e);
      if (why.empty()) break;
      std::this_thread::sleep_for(100ms);
    }
    CheckStore(snap);
    if (!why.empty()) {
      Record("not_converged", step_,
             "not converged within " + std::to_string(s_.converge_timeout.count()) + " s: " + why,
             NamesIn(why));
    }
    CheckProcesses();
    CheckRecoveredExits();
    if (why.empty()) CheckApi();
    // The next step starts from what kilnd actually converged to (or at least targets).
    if (snap.ok) {
      const RevisionRecord* rev = snap.Revision(snap.Target());
      current_.revision = snap.Target();
      current_.hash = rev ? rev->template_hash : "";
      current_.version = rev ? VersionOf(*rev) : "";
      current_.pinned = snap.service.pinned_revision > 0;
      if (why.empty()) available_.emplace(current_.revision, current_.hash);
    }
    if (!why.empty()) return "NOT converged";
    std::string seen = "revision " + std::to_string(current_.revision) + " (" + current_.version +
                       (current_.pinned ? ", pinned" : "") + "):";
    for (const InstanceRecord* i : snap.Live())
      seen += " " + i->name + "/r" + std::to_string(i->revision);
    return seen;
  }

  // Integrity, immutable revisions, ids never reused.
  void CheckStore(const Snapshot& snap) {
    auto db = sqlite::Database::Open((h_.state() / "kiln.db").string(), /*read_only=*/true,
                                     /*create=*/false);
    if (!db.ok()) {
      Record("integrity", step_, "cannot open kiln.db: " + db.status().ToString());
    } else {
      for (const char* pragma : {"PRAGMA integrity_check", "PRAGMA foreign_key_check"}) {
        auto stmt = db->Prepare(pragma);
        if (!stmt.ok()) {
          Record("integrity", step_, std::string(pragma) + ": " + stmt.status().ToString());
          continue;
        }
        std::vector<std::string> rows;
        for (;;) {
          auto row = db->Step(**stmt, pragma);
          if (!row.ok()) {
            rows.push_back(row.status().ToString());
            break;
          }
          if (!*row) break;
          rows.push_back((*stmt)->Text(0));
        }
        const bool integrity = std::string(pragma) == "PRAGMA integrity_check";
        const bool good = integrity ? rows == std::vector<std::string>{"ok"} : rows.empty();
        if (!good) {
          std::string all;
          for (const auto& r : rows) all += r + "; ";
          Record("integrity", step_, std::string(pragma) + " returned: " + all);
        }
      }
    }
    if (!snap.ok) return;
    for (const RevisionRecord& r : snap.revisions) {
      if (Sha256Hex(r.template_json) != r.template_hash) {
        Record("revision_mutated", step_,
               "revision " + std::to_string(r.number) + "'s template hash " + r.template_hash +
                   " is not the SHA-256 of its template " + r.template_json);
      }
      auto [it, fresh] = revisions_seen_.emplace(r.number, r);
      const RevisionRecord& was = it->second;
      if (!fresh && (was.template_hash != r.template_hash || was.template_json != r.template_json ||
                     was.source != r.source || was.created_ms != r.created_ms ||
                     was.rolled_back_from != r.rolled_back_from)) {
        Record("revision_mutated", step_,
               "revision " + std::to_string(r.number) + " changed: was " +
                   std::string(RevisionSourceName(was.source)) + " " +
                   was.template_hash.substr(0, 12) + " created " + std::to_string(was.created_ms) +
                   ", now " + std::string(RevisionSourceName(r.source)) + " " +
                   r.template_hash.substr(0, 12) + " created " + std::to_string(r.created_ms));
        it->second = r;
      }
    }
    int64_t max_before = max_id_seen_;
    for (const InstanceRecord& i : snap.instances) {
      if (i.name != std::string(kService) + "-" + std::to_string(i.id)) {
        Record("id_reused", step_, "instance id " + std::to_string(i.id) + " is named " + i.name);
      }
      auto [it, fresh] = ids_seen_.emplace(i.id, std::make_pair(i.revision, i.created_ms));
      if (!fresh && it->second != std::make_pair(i.revision, i.created_ms)) {
        Record("id_reused", step_,
               "instance id " + std::to_string(i.id) + " was revision " +
                   std::to_string(it->second.first) + " created " +
                   std::to_string(it->second.second) + ", now revision " +
                   std::to_string(i.revision) + " created " + std::to_string(i.created_ms),
               {i.name});
        it->second = {i.revision, i.created_ms};
      } else if (fresh && i.id <= max_before) {
        Record("id_reused", step_,
               "new instance " + i.name + " has an id not above " + std::to_string(max_before) +
                   ", the highest seen before",
               {i.name});
      }
      max_id_seen_ = std::max(max_id_seen_, i.id);
    }
  }

  struct Problem {
    std::string what;
    std::string instance;
    pid_t pid = 0;  // the process concerned, if any
  };
  // One pass over /proc against the store: every problem seen, by kind.
  std::map<std::string, std::vector<Problem>> ProcessProblems(const Snapshot& snap) {
    std::map<std::string, std::vector<Problem>> out;
    std::map<std::string, const InstanceRecord*> rows;
    for (const auto& i : snap.instances) rows[i.name] = &i;
    auto procs = h_.ControllerProcesses();
    std::set<std::pair<pid_t, uint64_t>> running;
    for (const auto& p : procs) running.insert({p.pid, p.start_time});
    for (const auto& p : procs) {
      auto row = rows.find(p.instance);
      const std::string who = "pid " + std::to_string(p.pid) + " (" + p.instance + ", ppid " +
                              std::to_string(p.ppid) + ", pgrp " + std::to_string(p.pgrp) +
                              ", session " + std::to_string(p.session) + ")";
      if (row == rows.end()) {
        out["orphaned"].push_back(
            {who + " runs, but the store has no such instance", p.instance, p.pid});
        continue;
      }
      const InstanceRecord& r = *row->second;
      if (!IsLive(r.state)) {
        out["orphaned"].push_back({who + " runs, but " + r.name + " is " +
                                       std::string(InstanceStateName(r.state)) + " (" + r.reason +
                                       ")",
                                   p.instance, p.pid});
        continue;
      }
      if (r.state == InstanceState::kPending || r.state == InstanceState::kDraining) continue;
      auto [pid, start] = ParseHandle(r.handle);
      if (p.pid == pid && p.start_time == start) continue;  // the instance itself
      const bool leader_runs = running.count({pid, start}) > 0;
      if (leader_runs && (p.pgrp == pid || p.session == pid || DescendsFrom(p.pid, pid))) continue;
      if (p.session == p.pid && leader_runs) {
        out["duplicated"].push_back(
            {who + " runs as " + r.name + " beside its recorded process " + r.handle, p.instance,
             p.pid});
      } else if (!leader_runs) {
        out["pid_mismatch"].push_back({who + " runs as " + r.name + ", whose row (" +
                                           std::string(InstanceStateName(r.state)) + ") says " +
                                           r.handle + ", which is not running",
                                       p.instance, p.pid});
      } else {
        out["orphaned"].push_back(
            {who + " carries " + r.name + "'s identity outside its process tree (" + r.handle + ")",
             p.instance, p.pid});
      }
    }
    for (const InstanceRecord* i : snap.Live()) {
      if (i->state == InstanceState::kPending || i->state == InstanceState::kDraining) continue;
      auto [pid, start] = ParseHandle(i->handle);
      if (running.count({pid, start}) == 0) {
        out["lost"].push_back({i->name + " is " + std::string(InstanceStateName(i->state)) +
                                   " in the store (handle \"" + i->handle +
                                   "\") but that process is not running",
                               i->name, pid});
      }
    }
    return out;
  }

  // Waits (bounded: a stop takes at most stop-grace) for /proc and the store to agree, then
  // records whatever still disagrees. A problem is recorded once, not again at every later
  // iteration; orphans are killed once recorded, so that each finding stands on its own.
  void CheckProcesses() {
    std::map<std::string, std::vector<Problem>> problems;
    auto fresh = [&] {
      for (const auto& [kind, list] : problems) {
        for (const auto& p : list) {
          if (!reported_.count({kind, p.instance, p.pid})) return true;
        }
      }
      return false;
    };
    // A stop takes at most --stop-grace (1 s) and its exit is recorded right after; 5 s is ample.
    const auto deadline = SteadyClock::now() + 5s;
    do {
      Snapshot snap = Read();
      if (!snap.ok) {
        problems = {{"store_unreadable", {{snap.error, "", 0}}}};
      } else {
        problems = ProcessProblems(snap);
      }
      if (!fresh()) break;
      std::this_thread::sleep_for(200ms);
    } while (SteadyClock::now() < deadline);
    for (const auto& [kind, list] : problems) {
      for (const auto& p : list) {
        if (!reported_.insert({kind, p.instance, p.pid}).second) continue;
        Record(kind, step_, p.what + " (still so 5 s after convergence)", {p.instance});
        if (kind == "orphaned" && p.pid > 0) ::kill(p.pid, SIGKILL);
      }
    }
  }

  // A restart stops what runs with kiln's identity while its row is final (unknown_instance_
  // stopped). When that row says the process exited or was stopped, either the store recorded an
  // exit that did not happen (issue 9.2) or a process of the instance escaped its stop (9.3): it
  // ran untracked until this restart, which the /proc check, run after it, cannot see any more.
  void CheckRecoveredExits() {
    auto store = h_.Store();
    if (!store) return;
    auto events =
        store->ReadEvents({.after_seq = last_event_seq_, .service = kService, .limit = 100000});
    if (!events.ok()) return;
    for (const EventRecord& ev : *events) {
      last_event_seq_ = std::max(last_event_seq_, ev.seq);
      if (ev.kind != EventKind::kUnknownInstanceStopped) continue;
      auto row = store->GetInstance(ev.instance);
      if (!row.ok()) continue;  // pruned: nothing to say what it claimed
      const std::string& why = row->reason;
      if (why.rfind("exited", 0) == 0 || why.rfind("killed by", 0) == 0 ||
          why.rfind("stopped: ", 0) == 0) {
        Record("untracked_until_restart", step_,
               ev.instance + " is " + std::string(InstanceStateName(row->state)) + " (\"" + why +
                   "\"), yet a process with its identity still ran, untracked, until this restart "
                   "stopped it as unknown (a spurious exit, or a process that escaped its stop)",
               {ev.instance});
      }
    }
  }

  // GetService agrees with the store.
  void CheckApi() {
    std::string mismatch;
    const auto deadline = SteadyClock::now() + 3s;
    do {
      mismatch = ApiMismatch();
      if (mismatch.empty()) return;
      std::this_thread::sleep_for(200ms);
    } while (SteadyClock::now() < deadline);
    Record("api_mismatch", step_, mismatch);
  }

  std::string ApiMismatch() {
    auto stub =
        pb::Kiln::NewStub(grpc::CreateChannel(h_.UnixAddr(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    pb::GetServiceRequest q;
    q.set_name(kService);
    pb::GetServiceResponse r;
    grpc::Status st = stub->GetService(&ctx, q, &r);
    if (!st.ok()) return "GetService failed: " + st.error_message();
    Snapshot snap = Read();
    if (!snap.ok) return "store: " + snap.error;
    const pb::ServiceSummary& sum = r.service().summary();
    std::ostringstream why;
    auto expect = [&](const char* what, int64_t api, int64_t store) {
      if (api != store) why << what << ": API says " << api << ", store " << store << "; ";
    };
    expect("target_revision", sum.target_revision(), snap.Target());
    expect("desired_revision", sum.desired_revision(), snap.service.desired_revision);
    expect("pinned_revision", sum.pinned_revision(), snap.service.pinned_revision);
    expect("replicas", sum.replicas(), declared_.replicas);
    expect("available", sum.available(), declared_.replicas);
    expect("live", sum.live(), static_cast<int64_t>(snap.Live().size()));
    const RevisionRecord* rev = snap.Revision(snap.Target());
    if (rev && sum.version() != VersionOf(*rev)) {
      why << "version: API says " << sum.version() << ", store " << VersionOf(*rev) << "; ";
    }
    std::map<std::string, int64_t> api_pids, store_pids;
    for (const auto& i : r.service().instances()) api_pids[i.id()] = i.pid();
    for (const InstanceRecord* i : snap.Live()) store_pids[i->name] = ParseHandle(i->handle).first;
    if (api_pids != store_pids) {
      why << "instances: API has";
      for (const auto& [n, p] : api_pids) why << " " << n << "/" << p;
      why << ", store has";
      for (const auto& [n, p] : store_pids) why << " " << n << "/" << p;
      why << "; ";
    }
    std::map<int64_t, int> api_counts, store_counts;
    for (const auto& c : r.service().revisions()) {
      if (c.total() > 0) api_counts[c.revision()] = c.total();
    }
    for (const InstanceRecord* i : snap.Live()) store_counts[i->revision]++;
    if (api_counts != store_counts) {
      why << "per-revision counts: API has";
      for (const auto& [n, c] : api_counts) why << " r" << n << "=" << c;
      why << ", store has";
      for (const auto& [n, c] : store_counts) why << " r" << n << "=" << c;
      why << "; ";
    }
    return why.str();
  }

  // ------------------------------------------------------------------------------------------
  // Bookkeeping

  std::string HashSeen(int64_t revision) const {
    auto it = revisions_seen_.find(revision);
    return it == revisions_seen_.end() ? "" : it->second.template_hash;
  }
  std::string VersionSeen(int64_t revision) const {
    auto it = revisions_seen_.find(revision);
    return it == revisions_seen_.end() ? "" : VersionOf(it->second);
  }

  static std::vector<std::string> NamesIn(const std::string& text) {
    std::vector<std::string> out;
    static const std::regex re(std::string(kService) + "-\\d+");
    for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator();
         ++it) {
      out.push_back(it->str());
    }
    return out;
  }

  static std::string Tail(const std::string& text, size_t lines = 15) {
    size_t at = text.size();
    for (size_t n = 0; n <= lines && at > 0; ++n) at = text.rfind('\n', at - 1);
    return at == std::string::npos ? text : text.substr(at + 1);
  }

  // Lines of every kilnd run's log (oldest run first) that mention one of `instances`.
  std::string LogsAbout(const std::vector<std::string>& instances) const {
    if (instances.empty()) return "";
    std::vector<fs::path> logs;
    for (const auto& entry : fs::directory_iterator(h_.tmp().path())) {
      const std::string f = entry.path().filename().string();
      if (f.rfind("kilnd-", 0) == 0 && entry.path().extension() == ".err")
        logs.push_back(entry.path());
    }
    // kilnd-<pid>-<counter>.err: order by counter, that is by start.
    auto counter = [](const fs::path& p) {
      std::string stem = p.stem().string();
      return std::stoi(stem.substr(stem.rfind('-') + 1));
    };
    std::sort(logs.begin(), logs.end(), [&](auto& a, auto& b) { return counter(a) < counter(b); });
    std::string out;
    int kept = 0;
    for (const auto& log : logs) {
      std::istringstream in(ReadFile(log));
      std::string line;
      while (std::getline(in, line)) {
        for (const auto& name : instances) {
          if (!name.empty() && Mentions(line, name)) {
            if (++kept <= 60)
              out += "    [run " + std::to_string(counter(log)) + "] " + line + "\n";
            break;
          }
        }
      }
    }
    if (kept > 60) out += "    ... " + std::to_string(kept - 60) + " more lines\n";
    return out;
  }

  void Record(const std::string& kind, const std::string& step, const std::string& detail,
              const std::vector<std::string>& instances = {}) {
    Violation v{iteration_, kind, step, detail, LogsAbout(instances)};
    std::cerr << "chaos VIOLATION " << kind << " at iteration " << iteration_ << " (seed "
              << s_.seed << "): " << detail << std::endl;
    violations_.push_back(std::move(v));
  }

  void Keep() {
    std::error_code ec;
    const fs::path dest = fs::path(s_.keep_dir) / ("seed-" + std::to_string(s_.seed));
    for (auto it = fs::recursive_directory_iterator(h_.tmp().path(), ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (!it->is_regular_file()) continue;
      fs::path to = dest / fs::relative(it->path(), h_.tmp().path());
      fs::create_directories(to.parent_path(), ec);
      fs::copy_file(it->path(), to, fs::copy_options::overwrite_existing, ec);
    }
    std::cerr << "chaos: state and logs kept in " << dest << std::endl;
  }

  struct Current {
    int64_t revision = 0;
    std::string hash;
    std::string version;
    bool pinned = false;
  };

  Settings s_;
  std::mt19937_64 rng_;
  KilndHarness h_;
  Declared declared_;
  Current current_;
  std::string step_;
  int iteration_ = 0;
  int done_ = 0;
  std::map<std::string, int> counts_;
  std::set<std::pair<int64_t, std::string>> available_;  // (revision, hash) seen converged
  std::map<int64_t, RevisionRecord> revisions_seen_;
  std::map<int64_t, std::pair<int64_t, int64_t>> ids_seen_;  // id -> (revision, created_ms)
  int64_t max_id_seen_ = 0;
  std::set<std::tuple<std::string, std::string, pid_t>> reported_;  // (kind, instance, pid)
  std::vector<Violation> violations_;
  SteadyClock::duration elapsed_{};
  int unknown_stopped_ = 0;
  int64_t last_event_seq_ = 0;
};

TEST_CASE(
    "chaos: SIGKILL of kilnd during rollouts, scaling and rollbacks orphans, duplicates "
    "and loses nothing, and it converges",
    "[chaos]") {
  Settings settings = Settings::FromEnv();
  std::cerr << "chaos: seed " << settings.seed << " (set KILN_CHAOS_SEED to repeat), "
            << settings.iterations << " iterations" << std::endl;
  ChaosRun run(settings);
  run.Go();
  const std::string report = run.Report();
  std::cout << report << std::endl;
  INFO(report);
  CHECK(run.done() == settings.iterations);
  CHECK(run.violations().empty());
}

// The checks themselves can fail: each kind of problem, made by hand, is seen.
TEST_CASE("chaos: the /proc checks see an orphan, a duplicate and a lost instance", "[chaos]") {
  Settings settings;
  settings.seed = 1;
  settings.iterations = 0;  // the cold start and its checks only
  ChaosRun run(settings);
  run.Go();
  INFO(run.Report());
  REQUIRE(run.violations().empty());
  KilndHarness& h = run.harness();
  CHECK(run.ProcessProblemsForTest().empty());

  auto live = h.Live(kService);
  REQUIRE(live.size() == 3);
  h.Kill9();  // nothing changes the store from here on
  const std::string id = "KILN_CONTROLLER=" + ControllerIdForStateDir(h.state());
  // Unknown to the store.
  Child orphan({"/usr/bin/env", id, "KILN_INSTANCE=web-999999", "/bin/sleep", "60"},
               h.tmp().path());
  // A second session leader running as a live instance.
  Child twin(
      {"/usr/bin/setsid", "/usr/bin/env", id, "KILN_INSTANCE=" + live[1].name, "/bin/sleep", "60"},
      h.tmp().path());
  // A live instance whose process is gone.
  const pid_t victim = ParseHandle(live[2].handle).first;
  REQUIRE(victim > 0);
  ::kill(-victim, SIGKILL);

  std::map<std::string, std::vector<std::string>> problems;
  auto has = [&](const std::string& kind, const std::string& text) {
    for (const auto& what : problems[kind]) {
      if (what.find(text) != std::string::npos) return true;
    }
    return false;
  };
  CHECK(WaitFor(
      [&] {
        problems = run.ProcessProblemsForTest();
        return has("orphaned", "web-999999") && has("duplicated", live[1].name) &&
               has("lost", live[2].name);
      },
      10s));
  for (const auto& [kind, list] : problems) {
    for (const auto& what : list) UNSCOPED_INFO(kind << ": " << what);
  }
  CHECK(problems.size() == 3);
}

}  // namespace
}  // namespace kiln::testing
