// The gRPC API under load: GetService and ListServices at 100 services x 10 instances with 16
// concurrent clients, beside an empty RPC (grpc.health.v1.Health/Check) on the same kilnd in the
// same run, so the ratio shows what kiln's own work costs above gRPC's. Never fails on a time.

#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "bench/bench_util.h"
#include "common/clock.h"
#include "deploy/proc.h"
#include "deploy/process_driver.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "storage/sqlite_state_store.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
namespace pb = ::kiln::v1;
constexpr int kServices = 100;
constexpr int kReplicas = 10;
constexpr int kClients = 16;
constexpr auto kPhase = std::chrono::seconds(3);
const std::string kBin = KILN_BIN_DIR;

struct Result {
  double rps = 0, p50_us = 0, p99_us = 0;
  int errors = 0;
};

// Runs `call` from kClients threads, each on its own channel, for kPhase.
Result Load(const std::string& addr,
            const std::function<bool(std::shared_ptr<grpc::Channel>&)>& call) {
  std::vector<std::vector<double>> lat(kClients);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  threads.reserve(kClients);
  auto deadline = std::chrono::steady_clock::now() + kPhase;
  for (int t = 0; t < kClients; ++t) {
    threads.emplace_back([&, t] {
      grpc::ChannelArguments args;
      args.SetInt("grpc.channel_id", t);  // a channel (connection) per client
      auto channel = grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), args);
      while (std::chrono::steady_clock::now() < deadline) {
        auto begin = std::chrono::steady_clock::now();
        bool ok = call(channel);
        lat[t].push_back(
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - begin)
                .count());
        if (!ok) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  Result r;
  r.rps = all.size() / std::chrono::duration<double>(kPhase).count();
  r.p50_us = all[all.size() / 2];
  r.p99_us = all[static_cast<size_t>(all.size() * 0.99)];
  r.errors = errors;
  return r;
}

bool HealthCheck(std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1), response;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, nullptr);
  void* tag;
  bool ok;
  cq.Next(&tag, &ok);
  return status.ok();
}

int Main() {
  bench::PrintMachine();
  fs::path dir = fs::temp_directory_path() / ("kiln-api-bench-" + std::to_string(getpid()));
  fs::create_directories(dir / "m");
  {
    std::ofstream m(dir / "m/services.yaml");
    for (int i = 0; i < kServices; ++i) {
      m << "name: svc-" << i << "\nversion: \"1\"\nreplicas: " << kReplicas
        << "\nartifact: {path: " << kBin
        << "/kiln-testsvc}\nhealth: {tcp: {}, interval: 5s}\n---\n";
    }
  }
  std::vector<std::string> args = {kBin + "/kilnd",
                                   "--manifests",
                                   (dir / "m").string(),
                                   "--state",
                                   (dir / "state").string(),
                                   "--port-range",
                                   "24000-25999",
                                   "--log-level",
                                   "warn",
                                   "--http-listen",
                                   ""};
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, (dir / "kilnd.log").c_str(), O_WRONLY | O_CREAT,
                                   0644);
  char* envp[] = {nullptr};
  pid_t kilnd = -1;
  posix_spawn(&kilnd, argv[0], &actions, nullptr, argv.data(), envp);
  posix_spawn_file_actions_destroy(&actions);

  // Wait until all 1,000 instances are healthy.
  RealClock clock;
  bool ready = false;
  for (int i = 0; i < 1200 && !ready; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto s = SqliteStateStore::Open(
        {.path = (dir / "state/kiln.db").string(), .clock = &clock, .read_only = true});
    if (!s.ok()) continue;
    auto live = (*s)->ListLiveInstances();
    ready = live.ok() && live->size() == static_cast<size_t>(kServices) * kReplicas &&
            std::all_of(live->begin(), live->end(),
                        [](auto& x) { return x.state == InstanceState::kHealthy; });
  }
  const std::string addr = "unix:" + (dir / "state/kiln.sock").string();
  if (ready) {
    Result empty = Load(addr, HealthCheck);
    Result get = Load(addr, [](std::shared_ptr<grpc::Channel>& ch) {
      static thread_local int n = 0;
      pb::GetServiceRequest q;
      q.set_name("svc-" + std::to_string(n++ % kServices));
      pb::GetServiceResponse r;
      grpc::ClientContext ctx;
      return pb::Kiln::NewStub(ch)->GetService(&ctx, q, &r).ok() &&
             r.service().instances_size() == kReplicas;
    });
    Result list = Load(addr, [](std::shared_ptr<grpc::Channel>& ch) {
      pb::ListServicesResponse r;
      grpc::ClientContext ctx;
      return pb::Kiln::NewStub(ch)->ListServices(&ctx, {}, &r).ok() &&
             r.services_size() == kServices;
    });
    std::printf(
        "gRPC over the unix socket, %d services x %d instances, %d concurrent clients, %llds per "
        "call:\n",
        kServices, kReplicas, kClients, static_cast<long long>(kPhase.count()));
    auto row = [&](const char* name, const Result& r) {
      std::printf(
          "  %-28s %8.0f req/s  p50 %7.0f us  p99 %7.0f us  (%.1fx the empty RPC's p50)%s\n", name,
          r.rps, r.p50_us, r.p99_us, r.p50_us / empty.p50_us, r.errors ? "  ERRORS" : "");
    };
    row("empty RPC (Health/Check)", empty);
    row("GetService", get);
    row("ListServices", list);
  } else {
    std::printf("kilnd did not converge; see %s\n", (dir / "kilnd.log").c_str());
  }
  ::kill(kilnd, SIGKILL);
  ::waitpid(kilnd, nullptr, 0);
  bench::KillInstancesOf(dir / "state");
  std::error_code ec;
  if (ready) fs::remove_all(dir, ec);
  return ready ? 0 : 1;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("api_bench", kiln::Main); }
