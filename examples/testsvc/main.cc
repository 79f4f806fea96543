// kiln-testsvc: a small HTTP service that tests, benchmarks and `make run`'s examples run as
// instances. It listens on $PORT (or --port) and answers:
//   GET /healthz  200 "ok" (503 once --unhealthy-after has passed)
//   GET /         200 "<version>\n"
// Flags make it misbehave on purpose: become unhealthy, exit with a code, ignore SIGTERM, take a
// while before it listens, or leave processes of its own behind (a child that ignores SIGTERM, a
// child in a session of its own). --check-fds only reports whether it inherited any descriptor
// beyond 0-2 (exit 0: none). --log-every prints a numbered line ("kiln-testsvc 1.0 line 7") that
// often, for tests of instance logs.

#include <dirent.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <thread>

#include "common/duration.h"

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

struct Config {
  std::string version = "dev";
  std::string host = "127.0.0.1";
  int port = 0;
  std::optional<kiln::Duration> unhealthy_after;
  std::optional<kiln::Duration> exit_after;
  int exit_code = 1;
  bool ignore_sigterm = false;
  kiln::Duration start_delay{0};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const Config& config) : stream_(std::move(socket)), config_(config) {}
  void Start() { Read(); }

 private:
  void Read() {
    req_ = {};
    stream_.expires_after(std::chrono::seconds(30));
    http::async_read(stream_, buffer_, req_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (!ec) self->Respond();
                     });
  }

  void Respond() {
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(req_.version());
    res->keep_alive(req_.keep_alive());
    res->set(http::field::content_type, "text/plain");
    res->set(http::field::server, "kiln-testsvc");
    std::string_view target(req_.target().data(), req_.target().size());
    if (target == "/healthz") {
      bool unhealthy =
          config_.unhealthy_after &&
          std::chrono::steady_clock::now() - config_.started >= *config_.unhealthy_after;
      res->result(unhealthy ? http::status::service_unavailable : http::status::ok);
      res->body() = unhealthy ? "unhealthy\n" : "ok\n";
    } else if (target == "/") {
      res->result(http::status::ok);
      res->body() = config_.version + "\n";
    } else {
      res->result(http::status::not_found);
      res->body() = "not found\n";
    }
    res->prepare_payload();
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, size_t) {
                        if (ec) return;
                        if (res->keep_alive()) {
                          self->Read();
                        } else {
                          beast::error_code ignored;
                          self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                        }
                      });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> req_;
  const Config& config_;
};

void Accept(tcp::acceptor& acceptor, const Config& config) {
  acceptor.async_accept([&acceptor, &config](beast::error_code ec, tcp::socket socket) {
    if (!ec) std::make_shared<Session>(std::move(socket), config)->Start();
    Accept(acceptor, config);
  });
}

// Forks a child that sleeps until it is killed. It keeps the environment (KILN_*) and, unless
// it starts a session of its own, the session and process group.
void ForkSleeper(bool ignore_sigterm, bool new_session) {
  pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("kiln-testsvc: fork");
    std::exit(2);
  }
  if (pid > 0) {
    std::cout << "kiln-testsvc: child " << pid << (ignore_sigterm ? " ignoring SIGTERM" : "")
              << (new_session ? " in a session of its own" : "") << std::endl;
    return;
  }
  if (ignore_sigterm) std::signal(SIGTERM, SIG_IGN);
  if (new_session) ::setsid();
  for (;;) ::pause();
}

// Exit 0 when only 0, 1 and 2 are open; else the others are listed on stderr.
int CheckFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return 2;
  int extra = 0;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name == "." || name == ".." || name == "0" || name == "1" || name == "2") continue;
    if (std::atoi(name.c_str()) == ::dirfd(dir)) continue;
    char target[512] = {};
    ssize_t n = ::readlink(("/proc/self/fd/" + name).c_str(), target, sizeof target - 1);
    std::cerr << "kiln-testsvc: inherited fd " << name << " -> " << (n > 0 ? target : "?") << "\n";
    ++extra;
  }
  ::closedir(dir);
  return extra == 0 ? 0 : 1;
}

std::optional<kiln::Duration> ParseFlagDuration(const std::string& flag, const std::string& text) {
  if (text.empty()) return std::nullopt;
  auto d = kiln::ParseDuration(text);
  if (!d.ok()) {
    std::cerr << "kiln-testsvc: " << flag << ": " << d.status().message() << "\n";
    std::exit(2);
  }
  return *d;
}

int Run(int argc, char** argv) {
  Config config;
  std::string unhealthy_after, exit_after, start_delay, log_every;
  CLI::App app("kiln-testsvc: a small HTTP service for kiln's tests and examples", "kiln-testsvc");
  app.add_option("--version-string", config.version, "what GET / answers");
  app.add_option("--host", config.host, "address to listen on");
  app.add_option("--port", config.port, "port to listen on (default: $PORT)");
  app.add_option("--unhealthy-after", unhealthy_after, "answer /healthz with 503 after this long");
  app.add_option("--exit-after", exit_after, "exit after this long");
  app.add_option("--exit-code", config.exit_code, "exit code for --exit-after");
  app.add_flag("--ignore-sigterm", config.ignore_sigterm, "ignore SIGTERM (only SIGKILL stops it)");
  app.add_option("--start-delay", start_delay, "wait this long before listening");
  app.add_option("--log-every", log_every, "print a numbered line to stdout this often");
  bool child_ignoring_sigterm = false, child_setsid = false, check_fds = false;
  app.add_flag("--child-ignoring-sigterm", child_ignoring_sigterm,
               "fork a child that ignores SIGTERM and sleeps");
  app.add_flag("--child-setsid", child_setsid,
               "fork a child that starts its own session and sleeps");
  app.add_flag("--check-fds", check_fds, "exit 0 if only descriptors 0-2 were inherited, else 1");
  CLI11_PARSE(app, argc, argv);
  if (check_fds) return CheckFds();
  if (child_ignoring_sigterm) ForkSleeper(/*ignore_sigterm=*/true, /*new_session=*/false);
  if (child_setsid) ForkSleeper(/*ignore_sigterm=*/false, /*new_session=*/true);
  config.unhealthy_after = ParseFlagDuration("--unhealthy-after", unhealthy_after);
  config.exit_after = ParseFlagDuration("--exit-after", exit_after);
  config.start_delay = ParseFlagDuration("--start-delay", start_delay).value_or(kiln::Duration(0));
  if (config.port == 0) {
    const char* env = std::getenv("PORT");
    if (env == nullptr || std::atoi(env) <= 0) {
      std::cerr << "kiln-testsvc: no port: set $PORT or --port\n";
      return 2;
    }
    config.port = std::atoi(env);
  }
  if (config.ignore_sigterm) std::signal(SIGTERM, SIG_IGN);

  asio::io_context io;
  asio::signal_set signals(io);
  if (!config.ignore_sigterm) signals.add(SIGTERM);
  signals.add(SIGINT);
  signals.async_wait([&](beast::error_code ec, int) {
    if (!ec) io.stop();
  });
  asio::steady_timer exit_timer(io);
  if (config.exit_after) {
    exit_timer.expires_after(*config.exit_after);
    exit_timer.async_wait([&](beast::error_code ec) {
      if (ec) return;
      std::cout << "kiln-testsvc: exiting with code " << config.exit_code << " as asked"
                << std::endl;
      std::_Exit(config.exit_code);
    });
  }

  asio::steady_timer log_timer(io);
  const std::optional<kiln::Duration> log_interval = ParseFlagDuration("--log-every", log_every);
  uint64_t log_line = 0;
  std::function<void()> log_next = [&] {
    log_timer.expires_after(*log_interval);
    log_timer.async_wait([&](beast::error_code ec) {
      if (ec) return;
      // One write(2) per line (std::endl flushes): a line is never split across a rotation.
      std::cout << "kiln-testsvc " << config.version << " line " << ++log_line << std::endl;
      log_next();
    });
  };
  if (log_interval) log_next();

  // The delay runs on the event loop so that --exit-after and signals still work meanwhile.
  tcp::acceptor acceptor(io);
  asio::steady_timer delay(io);
  delay.expires_after(config.start_delay);
  delay.async_wait([&](beast::error_code ec) {
    if (ec) return;
    beast::error_code err;
    tcp::endpoint ep(asio::ip::make_address(config.host, err), static_cast<uint16_t>(config.port));
    if (!err) acceptor.open(ep.protocol(), err);
    if (!err) acceptor.set_option(asio::socket_base::reuse_address(true), err);
    if (!err) acceptor.bind(ep, err);
    if (!err) acceptor.listen(asio::socket_base::max_listen_connections, err);
    if (err) {
      std::cerr << "kiln-testsvc: cannot listen on " << config.host << ":" << config.port << ": "
                << err.message() << std::endl;
      std::_Exit(3);
    }
    std::cout << "kiln-testsvc " << config.version << " listening on " << config.host << ":"
              << config.port << std::endl;
    Accept(acceptor, config);
  });
  io.run();
  std::cout << "kiln-testsvc: stopped" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kiln-testsvc: " << e.what() << std::endl;
    return 1;
  }
}
