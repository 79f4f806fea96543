// The Docker driver through a real kilnd against a real dockerd started here (the tests' own
// engine, tests/deploy/docker_engine.h), in one run:
//   - cold converge of 100 containers of one image service, against a plain loop of the same
//     Engine API calls (create, start, inspect to read the published port) from one client;
//     "up" means the container's published port accepts TCP connections (kilnd: every instance
//     healthy in its store, which its TCP probe decides);
//   - the time from `docker kill` of a container to its replacement accepting connections,
//     over several one-replica services (the crash-loop back-off replaces a service's first
//     failure at once, a second one of the same service only after 10 s).
// Never fails on a time; skips with the reason when dockerd cannot start.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "common/clock.h"
#include "common/unique_fd.h"
#include "storage/sqlite_state_store.h"
#include "tests/deploy/docker_engine.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using docker::Method;
constexpr int kContainers = 100;
constexpr int kKills = 7;

const std::string kBin = KILN_BIN_DIR;

bool WaitAllAccept(std::set<int> waiting, std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  while (!waiting.empty() && Clock::now() < deadline) {
    for (auto it = waiting.begin(); it != waiting.end();)
      it = bench::Accepts(*it) ? waiting.erase(it) : std::next(it);
    if (!waiting.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return waiting.empty();
}

// The plain loop: what a script calling the Engine API would do for 100 containers, one call
// after the other. Seconds until all accept, or -1.
double PlainLoop(testing::DockerEngine& engine, const std::string& image) {
  docker::Client& client = engine.client();
  nlohmann::json body = {
      {"Image", image},
      {"Cmd", {"/kiln-testsvc", "--host", "0.0.0.0"}},
      {"Env", {"PORT=8080"}},
      {"ExposedPorts", {{"8080/tcp", nlohmann::json::object()}}},
      {"Labels", {{"kiln.bench", "plain"}}},
      {"HostConfig",
       {{"PortBindings", {{"8080/tcp", {{{"HostIp", "127.0.0.1"}, {"HostPort", ""}}}}}}}}};
  std::set<int> ports;
  std::vector<std::string> ids;
  const auto begin = Clock::now();
  for (int i = 0; i < kContainers; ++i) {
    StatusOr<docker::Response> created = client.CallSync(
        Method::kPost, "/containers/create?name=plain-" + std::to_string(i), body.dump());
    if (!created.ok() || created->status != 201) {
      std::fprintf(stderr, "plain loop: create failed: %s\n",
                   created.ok() ? docker::ErrorMessage(*created).c_str()
                                : created.status().ToString().c_str());
      return -1;
    }
    const std::string id = nlohmann::json::parse(created->body)["Id"].get<std::string>();
    ids.push_back(id);
    StatusOr<docker::Response> started =
        client.CallSync(Method::kPost, "/containers/" + id + "/start");
    StatusOr<docker::Response> inspected =
        client.CallSync(Method::kGet, "/containers/" + id + "/json");
    if (!started.ok() || started->status != 204 || !inspected.ok() || inspected->status != 200) {
      std::fprintf(stderr, "plain loop: start or inspect of %s failed\n", id.c_str());
      return -1;
    }
    nlohmann::json j = nlohmann::json::parse(inspected->body);
    ports.insert(
        std::stoi(j["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"].get<std::string>()));
  }
  const bool up = WaitAllAccept(ports, std::chrono::seconds(300));
  const double took = bench::Seconds(Clock::now() - begin);
  for (const auto& id : ids) {
    (void)client.CallSync(Method::kDelete, "/containers/" + id + "?force=1");  // Stop() clears all
  }
  return up ? took : -1;
}

std::string Manifest(const std::string& name, int replicas, const std::string& image) {
  return "name: " + name + "\nversion: \"1\"\nreplicas: " + std::to_string(replicas) +
         "\nimage: kiln-bench/svc@" + image +
         "\nport: 8080\ncommand: [\"/kiln-testsvc\", \"--host\", \"0.0.0.0\"]\n"
         "health: {tcp: {}, interval: 200ms, timeout: 1s}\n"
         "update: {strategy: rolling, max_surge: 25%, max_unavailable: 0}\n";
}

// Every live instance of `service` healthy, and `count` of them.
bool Converged(StateReader& store, const std::string& service, int count) {
  auto live = store.ListInstances(service, false);
  return live.ok() && static_cast<int>(live->size()) == count &&
         std::all_of(live->begin(), live->end(),
                     [](const InstanceRecord& i) { return i.state == InstanceState::kHealthy; });
}

struct KilndRun {
  double cold = -1;
  double cpu = 0;
  std::vector<double> kill_to_accept;
};

KilndRun Kilnd(testing::DockerEngine& engine, const std::string& image, const fs::path& dir) {
  KilndRun r;
  fs::create_directories(dir / "m");
  testing::WriteFile(dir / "m/bench.yaml", Manifest("bench", kContainers, image));
  for (int k = 0; k < kKills; ++k) {
    testing::WriteFile(dir / "m" / ("kill-" + std::to_string(k) + ".yaml"),
                       Manifest("kill-" + std::to_string(k), 1, image));
  }
  const auto begin = Clock::now();
  pid_t kilnd = bench::Spawn(
      {kBin + "/kilnd", "--manifests", (dir / "m").string(), "--state", (dir / "state").string(),
       "--docker-host", engine.endpoint(), "--log-level", "warn", "--http-listen", ""},
      {"PATH=/usr/bin:/bin"}, (dir / "kilnd.log").string());
  RealClock clock;
  std::optional<std::unique_ptr<SqliteStateStore>> store;
  const auto deadline = Clock::now() + std::chrono::seconds(600);
  while (Clock::now() < deadline) {
    if (!store) {
      auto opened = SqliteStateStore::Open(
          {.path = (dir / "state/kiln.db").string(), .clock = &clock, .read_only = true});
      if (opened.ok()) store = std::move(*opened);
    }
    if (store && Converged(**store, "bench", kContainers)) {
      r.cold = bench::Seconds(Clock::now() - begin);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  r.cpu = bench::CpuSeconds(kilnd);
  for (int k = 0; r.cold > 0 && k < kKills; ++k) {
    const std::string service = "kill-" + std::to_string(k);
    while (Clock::now() < deadline && !Converged(**store, service, 1))
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto live = (*store)->ListInstances(service, false);
    if (!live.ok() || live->size() != 1) break;
    const std::string old = live->front().name;
    nlohmann::json containers = engine.Containers("kiln.instance=" + old);
    if (containers.empty()) break;
    const auto killed = Clock::now();
    if (!engine.Kill(containers[0]["Id"].get<std::string>())) break;
    bool replaced = false;
    while (!replaced && Clock::now() < killed + std::chrono::seconds(60)) {
      auto now = (*store)->ListInstances(service, false);
      for (const InstanceRecord& i : now.ok() ? *now : std::vector<InstanceRecord>{}) {
        if (i.name != old && i.port > 0 && bench::Accepts(static_cast<int>(i.port)))
          replaced = true;
      }
      if (!replaced) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (replaced) r.kill_to_accept.push_back(bench::Seconds(Clock::now() - killed));
  }
  ::kill(kilnd, SIGKILL);
  ::waitpid(kilnd, nullptr, 0);
  return r;
}

int Main() {
  bench::PrintMachine();
  testing::DockerEngine engine;
  if (std::string why = engine.Start(); !why.empty()) {
    std::printf("docker: skipped, cannot start a Docker engine: %s\n", why.c_str());
    return 0;
  }
  const std::string image = engine.ImportTestImage("1");
  if (image.empty()) {
    std::printf("docker: skipped, cannot import the test image\n");
    return 0;
  }
  const double plain = PlainLoop(engine, image);
  const fs::path dir =
      fs::temp_directory_path() / ("kiln-docker-bench-" + std::to_string(getpid()));
  fs::remove_all(dir);
  KilndRun k = Kilnd(engine, image, dir);
  std::printf("docker: cold converge of %d containers, one engine\n", kContainers);
  std::printf("  plain API loop (create+start+inspect): %.2f s\n", plain);
  std::printf(
      "  kilnd (to all healthy):                %.2f s (%.2fx the loop), kilnd CPU %.2f s\n",
      k.cold, plain > 0 && k.cold > 0 ? k.cold / plain : 0.0, k.cpu);
  if (!k.kill_to_accept.empty()) {
    std::printf("docker: docker kill -> replacement accepting connections, %zu kills\n",
                k.kill_to_accept.size());
    std::printf("  median %.0f ms, min %.0f ms, max %.0f ms\n",
                1000 * bench::Median(k.kill_to_accept),
                1000 * *std::min_element(k.kill_to_accept.begin(), k.kill_to_accept.end()),
                1000 * *std::max_element(k.kill_to_accept.begin(), k.kill_to_accept.end()));
  } else {
    std::printf("docker: no kill measured (kilnd did not converge; see %s/kilnd.log)\n",
                dir.c_str());
    return 1;
  }
  engine.Stop();
  fs::remove_all(dir);
  return k.cold > 0 && plain > 0 ? 0 : 1;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("kiln_bench_docker", kiln::Main); }
