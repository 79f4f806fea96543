// The data plane under load: the same 4 backends reached directly (the client round-robins over
// their ports: the baseline), through the Kiln proxy (the kiln_proxy library in a child process
// of its own, so its CPU and RSS are its own) and through HAProxy (mode tcp, roundrobin; as
// packaged, and with its own splicing on), all in one run. Short connections (one HTTP request each
// to kiln-testsvc), bulk throughput (loopback backends that stream without end), proxy CPU per GB
// and memory per idle connection. Prints figures and ratios against HAProxy; never fails on a time,
// and skips HAProxy when it is missing.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "common/logging.h"
#include "common/unique_fd.h"
#include "proxy/proxy.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int kBackends = 4;
constexpr int kShortClients = 64;
constexpr auto kShortWarmup = 300ms;
constexpr auto kShortMeasure = 5000ms;  // in ms: it is divided by kShortRounds
// The short phase runs in this many rounds; each round measures every path for
// kShortMeasure / kShortRounds, one after the other, so the ratios between paths can be taken
// round by round: a change in the machine's other load between rounds cancels out.
constexpr int kShortRounds = 8;
constexpr auto kBulkWarmup = 500ms;
constexpr auto kBulkMeasure = 2s;
constexpr int kIdleConnections = 1000;
// Load generator threads: one per core. The proxy, the backends and the generator share the
// machine's cores, as they would on a host where a proxy sits beside its instances.
const int kLoadThreads = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
const std::string kBin = KILN_BIN_DIR;
const char kRequest[] = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

// ---- processes and /proc ---------------------------------------------------------------------

// A child process killed (SIGKILL) and reaped when this goes out of scope.
class Child {
 public:
  Child() = default;
  explicit Child(pid_t pid) : pid_(pid) {}
  Child(Child&& o) noexcept : pid_(std::exchange(o.pid_, -1)) {}
  Child& operator=(Child&& o) noexcept {
    Stop();
    pid_ = std::exchange(o.pid_, -1);
    return *this;
  }
  ~Child() { Stop(); }
  pid_t pid() const { return pid_; }
  void Stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

long RssKiB(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return 0;
}

// Established TCP sockets whose local port is one of `ports` (the backends' side of the
// connections a proxy made to them).
int EstablishedTo(const std::vector<int>& ports) {
  std::ifstream f("/proc/net/tcp");
  std::string line;
  std::getline(f, line);  // header
  int n = 0;
  while (std::getline(f, line)) {
    unsigned local_port = 0, state = 0;
    // "  sl  local_address rem_address   st ...": "0: 0100007F:1F90 0100007F:D2C4 01"
    if (std::sscanf(line.c_str(), " %*d: %*8x:%x %*8x:%*x %x", &local_port, &state) != 2) continue;
    if (state == 1 &&
        std::find(ports.begin(), ports.end(), static_cast<int>(local_port)) != ports.end()) {
      ++n;
    }
  }
  return n;
}

// A loopback port nobody listens on right now (bound, read back and released).
int FreePort() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    throw std::runtime_error(std::string("free port: ") + std::strerror(errno));
  }
  return ntohs(a.sin_port);
}

// A blocking connect to 127.0.0.1:port; an invalid fd if it is refused.
UniqueFd Connect(int port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return UniqueFd();
  return fd;
}

bool WaitListening(int port, Clock::duration timeout) {
  for (auto end = Clock::now() + timeout; Clock::now() < end;) {
    if (Connect(port)) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

void RaiseFdLimit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

void WriteInts(int fd, const std::vector<int>& v) {
  if (::write(fd, v.data(), v.size() * sizeof(int)) < 0) std::perror("proxy_bench: report");
}

std::vector<int> ReadInts(int fd, size_t n) {
  std::vector<int> v(n, 0);
  size_t want = n * sizeof(int), got = 0;
  auto* p = reinterpret_cast<char*>(v.data());
  while (got < want) {
    ssize_t r = ::read(fd, p + got, want - got);
    if (r <= 0) throw std::runtime_error("a child exited before it reported its ports");
    got += static_cast<size_t>(r);
  }
  return v;
}

// Forks a child that runs `body(report_fd)` and never returns into the bench's code. It dies
// with the bench (PR_SET_PDEATHSIG). REQUIRES: no thread has been started yet.
template <typename Body>
std::pair<Child, UniqueFd> Fork(Body&& body) {
  std::array<int, 2> p{};
  if (::pipe2(p.data(), O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::close(p[0]);
    // Never back into the bench's frames: their destructors would stop the bench's children.
    try {
      body(p[1]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "proxy_bench child: %s\n", e.what());
      ::_exit(1);
    }
    ::_exit(0);
  }
  ::close(p[1]);
  return {Child(pid), UniqueFd(p[0])};
}

// ---- the backends ----------------------------------------------------------------------------

// kBackends listeners that stream zeros to every connection until the peer goes away; a thread
// per connection (there are at most 8 at once, plus the readiness probes).
void RunBulkBackends(int report_fd) {
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<int> ports;
  std::vector<int> listeners;
  for (int i = 0; i < kBackends; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 128) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      ::_exit(2);
    }
    listeners.push_back(fd);
    ports.push_back(ntohs(a.sin_port));
  }
  WriteInts(report_fd, ports);
  ::close(report_fd);
  static const std::vector<char> zeros(1 << 20, 0);
  std::vector<std::thread> acceptors;
  acceptors.reserve(listeners.size());
  for (int fd : listeners) {
    acceptors.emplace_back([fd] {
      for (;;) {
        int c = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        std::thread([c] {
          while (::send(c, zeros.data(), zeros.size(), MSG_NOSIGNAL) > 0) {
          }
          ::close(c);
        }).detach();
      }
    });
  }
  for (auto& t : acceptors) t.join();
}

std::vector<Endpoint> Endpoints(const std::vector<int>& ports) {
  std::vector<Endpoint> out;
  for (size_t i = 0; i < ports.size(); ++i) {
    out.push_back({"i" + std::to_string(i), "127.0.0.1", ports[i], 1});
  }
  return out;
}

// The Kiln data plane: one io thread, routes "web" and "bulk"; reports both bound ports.
void RunKilnProxy(int report_fd, const std::vector<int>& web, const std::vector<int>& bulk) {
  RaiseFdLimit();
  SetupLogging(LogFormat::kText, LogLevel::kWarn);
  asio::io_context io;
  Proxy proxy(io);
  proxy.Apply({ServiceRoute{"web", "127.0.0.1", 0, Endpoints(web)},
               ServiceRoute{"bulk", "127.0.0.1", 0, Endpoints(bulk)}});
  std::vector<int> bound = {0, 0};
  for (const auto& r : proxy.Snapshot().routes) {
    (r.service == "web" ? bound[0] : bound[1]) = r.bound_port;
  }
  WriteInts(report_fd, bound);
  ::close(report_fd);
  auto guard = asio::make_work_guard(io);
  io.run();
}

std::optional<std::string> FindHaproxy() {
  for (const char* dir : {"/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"}) {
    fs::path p = fs::path(dir) / "haproxy";
    if (::access(p.c_str(), X_OK) == 0) return p.string();
  }
  return std::nullopt;
}

// nbthread 1: the Kiln proxy runs one io thread, so each proxy gets one event loop; on this
// machine a second HAProxy thread would also take CPU from the load generator and the backends.
// `splice`: `option splice-auto`, HAProxy's own zero-copy forwarding (off by default).
std::string HaproxyConfig(bool splice, int web_port, const std::vector<int>& web, int bulk_port,
                          const std::vector<int>& bulk) {
  std::ostringstream c;
  c << "global\n  nbthread 1\n  maxconn 4096\n\n"
    << "defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n"
    << "  timeout server 60s\n"
    << (splice ? "  option splice-auto\n" : "") << "\n";
  auto pair = [&](const char* name, int port, const std::vector<int>& servers) {
    c << "frontend " << name << "\n  bind 127.0.0.1:" << port << "\n  default_backend " << name
      << "\n\nbackend " << name << "\n  balance roundrobin\n";
    for (size_t i = 0; i < servers.size(); ++i) {
      c << "  server s" << i << " 127.0.0.1:" << servers[i] << "\n";
    }
    c << "\n";
  };
  pair("web", web_port, web);
  pair("bulk", bulk_port, bulk);
  return c.str();
}

// ---- the load generator ----------------------------------------------------------------------

// Where one request or stream goes: a proxy's single port, or the backends in round-robin.
class Target {
 public:
  explicit Target(std::vector<int> ports) : ports_(std::move(ports)) {}
  tcp::endpoint Next() {
    int port = ports_[next_.fetch_add(1, std::memory_order_relaxed) % ports_.size()];
    return {asio::ip::address_v4::loopback(), static_cast<uint16_t>(port)};
  }

 private:
  std::vector<int> ports_;
  std::atomic<size_t> next_{0};
};

struct Window {
  Clock::time_point begin, end;  // completions inside count
};

// One closed-loop client: connect, send a Connection: close request, read to end of stream,
// check the status line, again until the window has passed. One io_context (and so one thread)
// runs it, so the figures it writes need no lock.
class ShortClient : public std::enable_shared_from_this<ShortClient> {
 public:
  struct Figures {
    std::vector<double> latency_us;
    uint64_t errors = 0;
  };
  ShortClient(asio::io_context& io, Target& target, Window window, Figures& figures)
      : io_(io), target_(target), window_(window), figures_(figures), socket_(io) {}

  void Next() {
    if (Clock::now() >= window_.end) return;
    socket_ = tcp::socket(io_);
    response_.clear();
    start_ = Clock::now();
    socket_.async_connect(target_.Next(), [self = shared_from_this()](error_code ec) {
      if (ec) return self->Done(false);
      asio::async_write(self->socket_, asio::buffer(kRequest, sizeof kRequest - 1),
                        [self](error_code wec, size_t) {
                          if (wec) return self->Done(false);
                          self->Read();
                        });
    });
  }

 private:
  void Read() {
    socket_.async_read_some(asio::buffer(buffer_),
                            [self = shared_from_this()](error_code ec, size_t n) {
                              if (ec == asio::error::eof) {
                                return self->Done(self->response_.rfind("HTTP/1.1 200 ", 0) == 0);
                              }
                              if (ec) return self->Done(false);
                              self->response_.append(self->buffer_.data(), n);
                              self->Read();
                            });
  }

  void Done(bool ok) {
    auto now = Clock::now();
    error_code ignored;
    socket_.close(ignored);
    if (now >= window_.begin && now < window_.end) {
      if (ok) {
        figures_.latency_us.push_back(
            std::chrono::duration<double, std::micro>(now - start_).count());
      } else {
        ++figures_.errors;
      }
    }
    Next();
  }

  asio::io_context& io_;
  Target& target_;
  Window window_;
  Figures& figures_;
  tcp::socket socket_;
  Clock::time_point start_;
  std::string response_;
  std::array<char, 1024> buffer_{};
};

// What the slices of one path's short-connection phase add up to.
struct ShortTally {
  std::vector<double> latency_us;  // of the requests completed inside the measured windows
  uint64_t errors = 0;
  double measured_s = 0;
  double proxy_cpu_s = 0;
  // Per round (slice): requests per second and p99 latency in ms.
  std::vector<double> round_rps;
  std::vector<double> round_p99_ms;
};

// The q-quantile of `v` (sorted here).
double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(static_cast<double>(v.size()) * q))];
}

// kShortClients clients over kLoadThreads threads for kShortWarmup + `measure`; `proxy` (0: none)
// has its CPU read at the edges of the measured window.
void RunShortSlice(const std::vector<int>& ports, pid_t proxy, Clock::duration measure,
                   ShortTally& tally) {
  Target target(ports);
  auto now = Clock::now();
  Window window{now + kShortWarmup, now + kShortWarmup + measure};
  std::vector<std::unique_ptr<asio::io_context>> ios;
  ios.reserve(kLoadThreads);
  std::vector<ShortClient::Figures> figures(kLoadThreads);
  for (int t = 0; t < kLoadThreads; ++t) {
    ios.push_back(std::make_unique<asio::io_context>(1));
  }
  for (int c = 0; c < kShortClients; ++c) {
    int t = c % kLoadThreads;
    auto client = std::make_shared<ShortClient>(*ios[t], target, window, figures[t]);
    asio::post(*ios[t], [client] { client->Next(); });
  }
  std::vector<std::thread> threads;
  threads.reserve(ios.size());
  for (auto& io : ios) threads.emplace_back([&io] { io->run(); });
  std::this_thread::sleep_until(window.begin);
  double cpu0 = proxy ? bench::CpuSeconds(proxy) : 0;
  std::this_thread::sleep_until(window.end);
  double cpu1 = proxy ? bench::CpuSeconds(proxy) : 0;
  for (auto& th : threads) th.join();
  std::vector<double> slice;
  for (auto& f : figures) {
    slice.insert(slice.end(), f.latency_us.begin(), f.latency_us.end());
    tally.errors += f.errors;
  }
  tally.round_rps.push_back(static_cast<double>(slice.size()) / bench::Seconds(measure));
  tally.round_p99_ms.push_back(Quantile(slice, 0.99) / 1000);
  tally.latency_us.insert(tally.latency_us.end(), slice.begin(), slice.end());
  tally.measured_s += bench::Seconds(measure);
  tally.proxy_cpu_s += cpu1 - cpu0;
}

// One long connection that reads whatever its backend streams until told to stop.
class BulkReader : public std::enable_shared_from_this<BulkReader> {
 public:
  BulkReader(asio::io_context& io, std::atomic<uint64_t>& bytes, std::atomic<bool>& stop,
             std::atomic<uint64_t>& errors)
      : socket_(io), bytes_(bytes), stop_(stop), errors_(errors), buffer_(256 << 10) {}

  void Start(const tcp::endpoint& to) {
    socket_.async_connect(to, [self = shared_from_this()](error_code ec) {
      if (ec) return self->Fail();
      self->Read();
    });
  }

 private:
  void Read() {
    socket_.async_read_some(asio::buffer(buffer_),
                            [self = shared_from_this()](error_code ec, size_t n) {
                              if (self->stop_.load(std::memory_order_relaxed)) {
                                error_code ignored;
                                self->socket_.close(ignored);
                                return;
                              }
                              if (ec) return self->Fail();
                              self->bytes_.fetch_add(n, std::memory_order_relaxed);
                              self->Read();
                            });
  }
  void Fail() {
    errors_.fetch_add(1);
    error_code ignored;
    socket_.close(ignored);
  }

  tcp::socket socket_;
  std::atomic<uint64_t>& bytes_;
  std::atomic<bool>& stop_;
  std::atomic<uint64_t>& errors_;
  std::vector<char> buffer_;
};

struct BulkTally {
  double bytes = 0;  // moved inside the measured windows
  double seconds = 0;
  double proxy_cpu_s = 0;
  uint64_t errors = 0;  // streams that ended before they were stopped
};

// `connections` long connections for kBulkWarmup + `measure`, reading what the backends stream.
void RunBulkSlice(const std::vector<int>& ports, int connections, pid_t proxy,
                  Clock::duration measure, BulkTally& tally) {
  Target target(ports);
  std::atomic<uint64_t> bytes{0}, errors{0};
  std::atomic<bool> stop{false};
  int nthreads = std::min(connections, kLoadThreads);
  std::vector<std::unique_ptr<asio::io_context>> ios;
  ios.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) ios.push_back(std::make_unique<asio::io_context>(1));
  for (int c = 0; c < connections; ++c) {
    auto reader = std::make_shared<BulkReader>(*ios[c % nthreads], bytes, stop, errors);
    reader->Start(target.Next());
  }
  std::vector<std::thread> threads;
  threads.reserve(ios.size());
  for (auto& io : ios) threads.emplace_back([&io] { io->run(); });
  std::this_thread::sleep_for(kBulkWarmup);
  uint64_t b0 = bytes.load();
  double cpu0 = proxy ? bench::CpuSeconds(proxy) : 0;
  auto t0 = Clock::now();
  std::this_thread::sleep_for(measure);
  uint64_t b1 = bytes.load();
  double cpu1 = proxy ? bench::CpuSeconds(proxy) : 0;
  auto t1 = Clock::now();
  stop = true;
  for (auto& th : threads) th.join();
  tally.bytes += static_cast<double>(b1 - b0);
  tally.seconds += bench::Seconds(t1 - t0);
  tally.proxy_cpu_s += cpu1 - cpu0;
  tally.errors += errors.load();
}

// RSS of `proxy` with kIdleConnections idle client connections open through it (each with its
// connection to a backend made) minus its RSS with none, per connection, in KiB.
std::optional<double> MemoryPerConnection(int port, pid_t proxy, const std::vector<int>& backends,
                                          int* upstream_seen) {
  // Connections to the backends, waited for to reach `n` (or less, when `at_least` is false).
  auto wait_for = [&](int n, bool at_least) {
    int now = EstablishedTo(backends);
    for (auto end = Clock::now() + 5s; Clock::now() < end && (at_least ? now < n : now > n);) {
      std::this_thread::sleep_for(50ms);
      now = EstablishedTo(backends);
    }
    return now;
  };
  const int before_upstream = wait_for(0, false);  // the last row's connections have closed
  const long before = RssKiB(proxy);
  std::vector<UniqueFd> idle;
  idle.reserve(kIdleConnections);
  for (int i = 0; i < kIdleConnections; ++i) {
    UniqueFd fd = Connect(port);
    if (!fd) return std::nullopt;
    idle.push_back(std::move(fd));
  }
  // The proxy holds an upstream connection for each of them.
  *upstream_seen = wait_for(before_upstream + kIdleConnections, true) - before_upstream;
  std::this_thread::sleep_for(200ms);
  const long with = RssKiB(proxy);
  idle.clear();
  wait_for(before_upstream, false);
  return static_cast<double>(with - before) / kIdleConnections;
}

// ---- the run ---------------------------------------------------------------------------------

// One way to reach the backends, and what was measured of it.
struct Row {
  std::string name;
  std::vector<int> web_ports, bulk_ports;  // the proxy's port, or the 4 backends (direct)
  pid_t proxy = 0;                         // 0: direct
  std::string why_not;                     // why it was skipped; "" if it ran
  ShortTally short_conn;
  BulkTally bulk1, bulk8;
  std::optional<double> kib_per_conn;
  int idle_upstream = 0;

  double Rps() const {
    return static_cast<double>(short_conn.latency_us.size()) / short_conn.measured_s;
  }
  double LatencyMs(double q) const {
    const auto& v = short_conn.latency_us;
    return v.empty()
               ? 0
               : v[std::min(v.size() - 1, static_cast<size_t>(static_cast<double>(v.size()) * q))] /
                     1000;
  }
  static double MBps(const BulkTally& t) { return t.seconds > 0 ? t.bytes / 1e6 / t.seconds : 0; }
  static double CpuPerGB(const BulkTally& t) {
    return t.bytes > 0 ? t.proxy_cpu_s / (t.bytes / 1e9) : 0;
  }
};

std::string Fixed(double v, int decimals, bool show) {
  if (!show) return "-";
  char out[32];
  std::snprintf(out, sizeof out, "%.*f", decimals, v);
  return out;
}

void PrintTable(const std::vector<Row>& rows) {
  std::printf("\n%-14s | %-46s | %-26s | %-26s | %s\n", "",
              "short: 64 clients, 1 request per connection", "bulk: 1 connection",
              "bulk: 8 connections", "idle");
  std::printf("%-14s | %8s %8s %8s %6s %10s | %9s %14s | %9s %14s | %s\n", "path", "req/s",
              "p50 ms", "p99 ms", "errors", "CPU us/req", "MB/s", "proxy CPU s/GB", "MB/s",
              "proxy CPU s/GB", "KiB/conn");
  for (const auto& r : rows) {
    if (!r.why_not.empty()) {
      std::printf("%-14s | skipped: %s\n", r.name.c_str(), r.why_not.c_str());
      continue;
    }
    const bool proxied = r.proxy != 0;
    const double reqs = static_cast<double>(r.short_conn.latency_us.size());
    std::printf("%-14s | %8.0f %8.2f %8.2f %6llu %10s | %9.0f %14s | %9.0f %14s | %s\n",
                r.name.c_str(), r.Rps(), r.LatencyMs(0.5), r.LatencyMs(0.99),
                static_cast<unsigned long long>(r.short_conn.errors),
                Fixed(reqs > 0 ? r.short_conn.proxy_cpu_s * 1e6 / reqs : 0, 1, proxied).c_str(),
                Row::MBps(r.bulk1), Fixed(Row::CpuPerGB(r.bulk1), 3, proxied).c_str(),
                Row::MBps(r.bulk8), Fixed(Row::CpuPerGB(r.bulk8), 3, proxied).c_str(),
                Fixed(r.kib_per_conn.value_or(0), 2, r.kib_per_conn.has_value()).c_str());
    if (r.bulk1.errors + r.bulk8.errors > 0) {
      std::printf("%-14s   bulk streams that ended early: %llu\n", "",
                  static_cast<unsigned long long>(r.bulk1.errors) +
                      static_cast<unsigned long long>(r.bulk8.errors));
    }
    if (r.kib_per_conn && r.idle_upstream < kIdleConnections) {
      std::printf("%-14s   only %d of %d idle connections reached a backend\n", "", r.idle_upstream,
                  kIdleConnections);
    }
  }
}

// Issue 11's goals, the Kiln proxy against each HAProxy row that ran.
void PrintRatios(const Row& kiln, const std::vector<const Row*>& others) {
  if (!kiln.why_not.empty() || others.empty()) return;
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  std::printf("\nkiln / haproxy (issue 11's goals)");
  for (const Row* o : others) std::printf(" | vs %-24s", o->name.c_str());
  std::printf("\n");
  struct Goal {
    const char* what;
    std::function<double(const Row&)> figure;
    bool higher_is_better;
    double bound;
    // Figures per round of the short phase: the ratio is then the median of the rounds' ratios
    // (each round's paths ran back to back), shown with its range.
    std::function<const std::vector<double>&(const Row&)> rounds;
  };
  const std::vector<Goal> goals = {
      {"req/s (>= 1.0x)", [](const Row& r) { return r.Rps(); }, true, 1.0,
       [](const Row& r) -> const std::vector<double>& { return r.short_conn.round_rps; }},
      {"p99 latency (<= 1.1x)", [](const Row& r) { return r.LatencyMs(0.99); }, false, 1.1,
       [](const Row& r) -> const std::vector<double>& { return r.short_conn.round_p99_ms; }},
      {"MB/s, 1 conn (>= 0.9x)", [](const Row& r) { return Row::MBps(r.bulk1); }, true, 0.9},
      {"MB/s, 8 conns (>= 0.9x)", [](const Row& r) { return Row::MBps(r.bulk8); }, true, 0.9},
      {"CPU/GB, 8 conns", [](const Row& r) { return Row::CpuPerGB(r.bulk8); }, false, 0},
      {"KiB per idle conn", [](const Row& r) { return r.kib_per_conn.value_or(0); }, false, 0},
  };
  for (const auto& g : goals) {
    std::printf("  %-31s", g.what);
    for (const Row* o : others) {
      double x = ratio(g.figure(kiln), g.figure(*o));
      std::string range;
      if (g.rounds) {
        const std::vector<double>& a = g.rounds(kiln);
        const std::vector<double>& b = g.rounds(*o);
        std::vector<double> per_round;
        for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
          per_round.push_back(ratio(a[i], b[i]));
        }
        if (!per_round.empty()) {
          x = Quantile(per_round, 0.5);
          char r[40];
          std::snprintf(r, sizeof r, " (%.2f-%.2f)", Quantile(per_round, 0),
                        Quantile(per_round, 1));
          range = r;
        }
      }
      const char* verdict = "";
      if (g.bound > 0) {
        verdict = (g.higher_is_better ? x >= g.bound : x <= g.bound) ? " met" : " NOT met";
      }
      char cell[64];
      std::snprintf(cell, sizeof cell, "%.2fx%s%s", x, range.c_str(), verdict);
      std::printf(" | %-27s", cell);
    }
    std::printf("\n");
  }
  std::printf(
      "  (req/s and p99: the median of the %d rounds' ratios, each round's paths measured back to "
      "back, and their range; the other rows: totals over the phase)\n",
      kShortRounds);
}

// Forked rather than spawned so that it dies with the bench (Fork's PR_SET_PDEATHSIG).
Child StartTestsvc(int port, const fs::path& log) {
  const std::string bin = kBin + "/kiln-testsvc";
  const std::string port_arg = std::to_string(port);
  const std::string log_path = log.string();
  return Fork([&](int) {
           int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
           ::dup2(fd, 1);
           ::dup2(fd, 2);
           ::execl(bin.c_str(), "kiln-testsvc", "--port", port_arg.c_str(), "--version-string",
                   "bench", nullptr);
           ::_exit(127);
         })
      .first;
}

// A HAProxy child on two free ports; its Row is skipped (with the reason) if it does not listen.
struct Haproxy {
  Child child;
  int web_port = 0, bulk_port = 0;
  fs::path log;
};

Haproxy StartHaproxy(const std::string& binary, bool splice, const std::vector<int>& web,
                     const std::vector<int>& bulk, const fs::path& dir) {
  Haproxy h;
  h.web_port = FreePort();
  h.bulk_port = FreePort();
  const std::string stem = splice ? "haproxy-splice" : "haproxy";
  const std::string cfg = (dir / (stem + ".cfg")).string();
  h.log = dir / (stem + ".log");
  {
    std::ofstream out(cfg);
    out << HaproxyConfig(splice, h.web_port, web, h.bulk_port, bulk);
  }
  const std::string log = h.log.string();
  h.child = Fork([&](int) {
              int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
              ::dup2(fd, 1);
              ::dup2(fd, 2);
              ::execl(binary.c_str(), "haproxy", "-db", "-f", cfg.c_str(), nullptr);
              ::_exit(127);
            }).first;
  return h;
}

// Runs `phase` on every row that runs, in order and then in reverse (A B C C B A), so a drift in
// the machine's other load weighs on every row alike.
template <typename Phase>
void Interleaved(std::vector<Row>& rows, Phase&& phase) {
  for (auto& r : rows) {
    if (r.why_not.empty()) phase(r);
  }
  for (auto it = rows.rbegin(); it != rows.rend(); ++it) {
    if (it->why_not.empty()) phase(*it);
  }
}

int Main() {
  RaiseFdLimit();
  ::signal(SIGPIPE, SIG_IGN);
  bench::PrintMachine();
  std::printf(
      "proxy benchmark: %d kiln-testsvc backends (short) and %d streaming backends (bulk) on "
      "loopback; load generator: Boost.Asio, %d threads in this process; the proxies, the "
      "backends and the load generator share the machine's %ld cores\n",
      kBackends, kBackends, kLoadThreads, sysconf(_SC_NPROCESSORS_ONLN));
  fs::path dir = fs::temp_directory_path() / ("kiln-proxy-bench-" + std::to_string(getpid()));
  fs::create_directories(dir);

  // Every child is started here, before the first thread of this process.
  std::vector<Child> testsvc;
  std::vector<int> web;
  for (int i = 0; i < kBackends; ++i) {
    web.push_back(FreePort());
    testsvc.push_back(StartTestsvc(web.back(), dir / "testsvc.log"));
  }
  auto [bulk_child, bulk_report] = Fork([](int fd) { RunBulkBackends(fd); });
  const std::vector<int> bulk = ReadInts(bulk_report.get(), kBackends);
  auto [kiln_child, kiln_report] = Fork([&](int fd) { RunKilnProxy(fd, web, bulk); });
  const std::vector<int> kiln_ports = ReadInts(kiln_report.get(), 2);
  const std::optional<std::string> haproxy = FindHaproxy();
  std::vector<Haproxy> haproxies;
  if (haproxy) {
    haproxies.push_back(StartHaproxy(*haproxy, false, web, bulk, dir));
    haproxies.push_back(StartHaproxy(*haproxy, true, web, bulk, dir));
  }

  for (int port : web) {
    if (!WaitListening(port, 10s)) throw std::runtime_error("kiln-testsvc did not listen");
  }
  if (kiln_ports[0] == 0 || kiln_ports[1] == 0) {
    throw std::runtime_error("the Kiln proxy did not bind its listeners");
  }
  std::vector<Row> rows;
  rows.push_back({.name = "direct", .web_ports = web, .bulk_ports = bulk});
  rows.push_back({.name = "kiln",
                  .web_ports = {kiln_ports[0]},
                  .bulk_ports = {kiln_ports[1]},
                  .proxy = kiln_child.pid()});
  for (const char* name : {"haproxy", "haproxy+splice"}) {
    Row r{.name = name};
    if (!haproxy) {
      r.why_not = "haproxy is not installed (scripts/install-deps --bench installs it)";
    } else {
      Haproxy& h = haproxies[rows.size() - 2];
      if (WaitListening(h.web_port, 5s) && WaitListening(h.bulk_port, 5s)) {
        r.web_ports = {h.web_port};
        r.bulk_ports = {h.bulk_port};
        r.proxy = h.child.pid();
      } else {
        std::ifstream in(h.log);
        std::string first_line;
        std::getline(in, first_line);
        r.why_not = "haproxy did not start: " + first_line;
        h.child.Stop();
      }
    }
    rows.push_back(std::move(r));
  }
  if (haproxy) {
    std::printf(
        "haproxy: %s, mode tcp, balance roundrobin, nbthread 1 (the Kiln proxy is one io "
        "thread); haproxy+splice adds `option splice-auto`\n",
        haproxy->c_str());
  }

  // Memory first, against each proxy's start-up RSS, before the other phases grow its heap.
  for (auto& r : rows) {
    if (r.why_not.empty() && r.proxy) {
      r.kib_per_conn = MemoryPerConnection(r.web_ports[0], r.proxy, web, &r.idle_upstream);
    }
  }
  for (int round = 0; round < kShortRounds / 2; ++round) {
    Interleaved(rows, [](Row& r) {
      RunShortSlice(r.web_ports, r.proxy, kShortMeasure / kShortRounds, r.short_conn);
    });
  }
  Interleaved(rows,
              [](Row& r) { RunBulkSlice(r.bulk_ports, 1, r.proxy, kBulkMeasure / 2, r.bulk1); });
  Interleaved(rows,
              [](Row& r) { RunBulkSlice(r.bulk_ports, 8, r.proxy, kBulkMeasure / 2, r.bulk8); });
  for (auto& r : rows) std::sort(r.short_conn.latency_us.begin(), r.short_conn.latency_us.end());

  auto ms = [](Clock::duration d) {
    return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
  };
  std::printf(
      "short: %lld ms measured per path in %d slices (rounds of every path in turn, the next round "
      "in reverse order), each after %lld ms of warm-up; bulk (backend -> client): %lld ms the "
      "same way, each slice after %lld ms; CPU: "
      "the proxy process's utime+stime; idle: RSS with %d idle connections through the proxy "
      "minus its start-up RSS (user memory only: kernel socket and pipe buffers are not in RSS)\n",
      ms(kShortMeasure), kShortRounds, ms(kShortWarmup), ms(kBulkMeasure), ms(kBulkWarmup),
      kIdleConnections);
  PrintTable(rows);
  std::vector<const Row*> others;
  for (size_t i = 2; i < rows.size(); ++i) {
    if (rows[i].why_not.empty()) others.push_back(&rows[i]);
  }
  PrintRatios(rows[1], others);

  haproxies.clear();
  kiln_child.Stop();
  bulk_child.Stop();
  testsvc.clear();
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}

}  // namespace
}  // namespace kiln

int main() { return kiln::bench::RunMain("proxy_bench", kiln::Main); }
