// kilnd hands nothing of its own to the instances it starts, and restarts on the same ports
// while they run: after SIGTERM and after SIGKILL. Also: the descriptor limit it raises.

#include <linux/kcmp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <fstream>
#include <set>
#include <sstream>

#include "tests/integration/http_client.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

int HttpStatus(int port, const std::string& target) { return HttpRequest(port, target).status; }

std::map<int, std::string> OpenFds(pid_t pid) {
  std::map<int, std::string> out;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    std::error_code ec2;
    auto target = std::filesystem::read_symlink(e.path(), ec2);
    if (!ec2) out[std::atoi(e.path().filename().c_str())] = target.string();
  }
  return out;
}

// socket inode -> local TCP port, for every TCP socket in the network namespace of `pid`.
std::map<std::string, int> TcpSocketPorts(pid_t pid) {
  std::map<std::string, int> out;
  for (const char* table : {"tcp", "tcp6"}) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/net/" + table);
    std::string line;
    std::getline(f, line);  // header
    while (std::getline(f, line)) {
      std::istringstream in(line);
      std::string sl, local, remote, st, queues, tr, retr, uid, timeout, inode;
      in >> sl >> local >> remote >> st >> queues >> tr >> retr >> uid >> timeout >> inode;
      size_t colon = local.rfind(':');
      if (colon == std::string::npos) continue;
      out["socket:[" + inode + "]"] =
          static_cast<int>(std::stoi(local.substr(colon + 1), nullptr, 16));
    }
  }
  return out;
}

// What `instance` (pid, running on `port`) holds that it did not open itself: descriptors it
// shares with kilnd (kcmp), kilnd's files (the store, other instances' logs), kilnd's kinds of
// descriptor (inotify, pidfds, unix sockets) and TCP sockets on any port but its own.
std::string Leaks(pid_t instance, const std::string& name, int port, pid_t kilnd,
                  const std::filesystem::path& state) {
  std::string problems;
  const auto fds = OpenFds(instance);
  const auto kilnd_fds = OpenFds(kilnd);
  const auto tcp_ports = TcpSocketPorts(instance);
  const std::string own_log = (state / "logs" / (name + ".log")).string();
  for (const auto& [fd, target] : fds) {
    std::string where = name;
    where.append(" fd ").append(std::to_string(fd)).append(" -> ").append(target).append(": ");
    for (const auto& [kfd, ktarget] : kilnd_fds) {
      long same = ::syscall(SYS_kcmp, instance, kilnd, KCMP_FILE, fd, kfd);
      if (same == 0) problems += where + "is kilnd's fd " + std::to_string(kfd) + "; ";
    }
    if (target.rfind(state.string(), 0) == 0 && target != own_log)
      problems += where + "a file of kilnd's; ";
    if (target.find("inotify") != std::string::npos || target.find("pidfd") != std::string::npos) {
      problems += where + "kilnd's kind of descriptor; ";
    }
    if (target.rfind("socket:", 0) == 0) {
      auto it = tcp_ports.find(target);
      std::error_code gone;
      const auto now = std::filesystem::read_symlink(
          "/proc/" + std::to_string(instance) + "/fd/" + std::to_string(fd), gone);
      if (it == tcp_ports.end() && (gone || now.string() != target)) {
        continue;  // a probe's connection, closed since the descriptors were listed
      }
      if (it == tcp_ports.end()) {
        problems += where + "a socket that is not TCP (kilnd's unix socket?); ";
      } else if (it->second != port) {
        problems += where + "a TCP socket on port " + std::to_string(it->second) +
                    ", not the instance's " + std::to_string(port) + "; ";
      }
    }
  }
  return problems;
}

std::string AllLeaks(KilndHarness& h, const std::string& service) {
  std::string problems;
  for (const auto& i : h.Live(service)) {
    pid_t pid = static_cast<pid_t>(std::atoi(i.handle.c_str() + 4));
    problems += Leaks(pid, i.name, static_cast<int>(i.port), h.kilnd().pid(), h.state());
  }
  return problems;
}

TEST_CASE(
    "instances hold no descriptor of kilnd's, and kilnd restarts on the same ports while they run",
    "[restart]") {
  KilndHarness h;
  h.Declare("web", "1.0", 2, kPolicy);
  h.Start({"--grpc-listen", "127.0.0.1:0"});
  REQUIRE(h.WaitReady());
  const int http_port = h.HttpPort();
  const int grpc_port = h.TcpPort();
  REQUIRE(http_port > 0);
  REQUIRE(grpc_port > 0);
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 2; }));
  // Traffic on every listener first, so that kilnd holds connections and readers as it runs.
  REQUIRE(HttpStatus(http_port, "/api/v1/services") == 200);
  REQUIRE(Run({BinPath("kilnctl"), "--addr", "127.0.0.1:" + std::to_string(grpc_port), "status"})
              .exit_code == 0);
  // Instances started after the listeners and the traffic: what could have leaked did.
  h.Declare("web", "2.0", 2, kPolicy);
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }, 60s));
  std::string leaks = AllLeaks(h, "web");
  INFO(leaks);
  CHECK(leaks.empty());
  const auto instances = h.InstanceProcesses();
  REQUIRE(instances.size() == 2);

  const std::string http_listen = "127.0.0.1:" + std::to_string(http_port);
  const std::vector<std::string> same_grpc = {"--grpc-listen",
                                              "127.0.0.1:" + std::to_string(grpc_port)};
  for (const char* how : {"SIGTERM", "SIGKILL"}) {
    INFO("after " << how);
    if (std::string(how) == "SIGTERM") {
      h.kilnd().Signal(SIGTERM);
      REQUIRE(h.kilnd().Wait(20s) == 0);
    } else {
      h.Kill9();
    }
    CHECK(h.InstanceProcesses() == instances);  // kilnd down never means service down
    h.Start(same_grpc, http_listen);
    INFO(h.kilnd().Stderr());
    REQUIRE(h.WaitReady());
    CHECK(h.kilnd().WaitForStderr("start-up recovery done adopted=2 lost=0", 30s));
    CHECK(h.HttpPort() == http_port);
    CHECK(HttpStatus(http_port, "/healthz") == 200);
    CHECK(HttpStatus(http_port, "/api/v1/services") == 200);
    RunResult st =
        Run({BinPath("kilnctl"), "--addr", "127.0.0.1:" + std::to_string(grpc_port), "status"});
    INFO(st.out << st.err);
    CHECK(st.exit_code == 0);
    CHECK(st.out.find("web") != std::string::npos);
    // The same instances, adopted, and still nothing of the new kilnd's in them.
    CHECK(h.InstanceProcesses() == instances);
    leaks = AllLeaks(h, "web");
    INFO(leaks);
    CHECK(leaks.empty());
  }
}

TEST_CASE("kilnd's own descriptors are all close-on-exec", "[restart]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start({"--grpc-listen", "127.0.0.1:0"});
  REQUIRE(h.WaitReady());
  const int http_port = h.HttpPort();
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  // An HTTP connection kilnd holds open while we look.
  asio::io_context io;
  tcp::socket held(io);
  held.connect(
      tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(http_port)));
  std::string problems;
  CHECK(WaitFor(
      [&] {
        problems.clear();
        int sockets = 0;
        for (const auto& [fd, target] : OpenFds(h.kilnd().pid())) {
          if (fd <= 2) continue;
          std::ifstream info("/proc/" + std::to_string(h.kilnd().pid()) + "/fdinfo/" +
                             std::to_string(fd));
          std::string key, flags;
          while (info >> key >> flags && key != "flags:") {
          }
          sockets += target.rfind("socket:", 0) == 0;
          // fdinfo's flags are octal; O_CLOEXEC is 02000000.
          if (key != "flags:") continue;  // closed meanwhile
          if ((std::stoul(flags, nullptr, 8) & 02000000) == 0) {
            problems += "fd " + std::to_string(fd) + " -> " + target + " is not close-on-exec; ";
          }
        }
        // The HTTP and gRPC listeners, the unix socket and the held connection at least.
        return sockets >= 4 && problems.empty();
      },
      10s));
  INFO(problems);
  CHECK(problems.empty());
}

TEST_CASE("kilnd raises its soft descriptor limit to the hard one", "[restart]") {
  TempDir tmp;
  std::filesystem::create_directories(tmp / "m");
  Child kilnd(
      {"/bin/sh", "-c",
       "ulimit -S -n 256 && exec " + BinPath("kilnd") + " --manifests " + (tmp / "m").string() +
           " --state " + (tmp / "state").string() + " --http-listen ''"},
      tmp.path());
  REQUIRE(kilnd.WaitForStderr("kilnd ready", 30s));
  std::string log = kilnd.Stderr();
  INFO(log);
  size_t at = log.find("descriptor limit soft_before=256 soft=");
  REQUIRE(at != std::string::npos);
  const std::string rest =
      log.substr(at + std::string("descriptor limit soft_before=256 soft=").size());
  const std::string soft = rest.substr(0, rest.find(' '));
  const size_t hard_at = rest.find("hard=");
  REQUIRE(hard_at != std::string::npos);
  CHECK(soft == rest.substr(hard_at + 5, rest.find_first_of(" \n", hard_at) - hard_at - 5));
  std::ifstream limits("/proc/" + std::to_string(kilnd.pid()) + "/limits");
  std::string line;
  while (std::getline(limits, line) && line.rfind("Max open files", 0) != 0) {
  }
  CHECK(line.find(" " + soft + " ") != std::string::npos);
  CHECK(line.find(" 256 ") == std::string::npos);
  kilnd.Signal(SIGTERM);
  CHECK(kilnd.Wait(20s) == 0);
}

}  // namespace
}  // namespace kiln::testing
