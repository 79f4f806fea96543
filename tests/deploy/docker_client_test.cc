// The Docker client against a small engine stand-in on a unix socket: one thread per connection,
// each answer held back a little, counting how many calls are in flight at once.

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

// clang-format off
#include <utility>  // first: Asio 1.74's awaitable.hpp uses std::exchange without including it
// clang-format on

#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "deploy/docker_client.h"
#include "tests/test_util.h"

namespace kiln::docker {
namespace {

using namespace std::chrono_literals;

// Answers every request 200 with an Api-Version header after `delay`; counts the most requests
// (other than /_ping) it was answering at one time.
class SlowEngine {
 public:
  explicit SlowEngine(const std::string& path, std::chrono::milliseconds delay)
      : path_(path), delay_(delay) {
    listener_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    path.copy(a.sun_path, sizeof a.sun_path - 1);
    REQUIRE(::bind(listener_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(listener_.get(), 128) == 0);
    acceptor_ = std::thread([this] { Accept(); });
  }
  ~SlowEngine() {
    stop_ = true;
    ::shutdown(listener_.get(), SHUT_RDWR);
    acceptor_.join();
    std::lock_guard lock(mu_);
    for (auto& t : handlers_) t.join();
  }
  SlowEngine(const SlowEngine&) = delete;
  SlowEngine& operator=(const SlowEngine&) = delete;

  int most_at_once() const { return most_; }
  int calls() const { return calls_; }

 private:
  void Accept() {
    while (!stop_) {
      int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      std::lock_guard lock(mu_);
      handlers_.emplace_back([this, fd] { Serve(UniqueFd(fd)); });
    }
  }
  void Serve(UniqueFd fd) {
    std::string request;
    char buf[4096];
    while (request.find("\r\n\r\n") == std::string::npos) {
      ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n <= 0) return;
      request.append(buf, static_cast<size_t>(n));
    }
    const bool ping = request.rfind("GET /_ping ", 0) == 0;
    if (!ping) {
      ++calls_;
      int now = ++current_;
      for (int seen = most_; now > seen && !most_.compare_exchange_weak(seen, now);) {
      }
      std::this_thread::sleep_for(delay_);
      --current_;
    }
    const std::string body = ping ? "OK" : "{}";
    const std::string answer =
        "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: " + std::to_string(body.size()) +
        "\r\nConnection: close\r\n\r\n" + body;
    (void)!::write(fd.get(), answer.data(), answer.size());
  }

  std::string path_;
  std::chrono::milliseconds delay_;
  UniqueFd listener_;
  std::thread acceptor_;
  std::mutex mu_;  // guards handlers_
  std::vector<std::thread> handlers_;
  std::atomic<bool> stop_{false};
  std::atomic<int> current_{0}, most_{0}, calls_{0};
};

TEST_CASE("the docker client keeps at most max_in_flight calls on an engine and runs them all",
          "[docker_client]") {
  testing::TempDir tmp;
  const std::string path = (tmp.path() / "engine.sock").string();
  SlowEngine engine(path, 100ms);
  Client client(Client::Options{.endpoint = *ParseEndpoint("unix://" + path),
                                .timeout = std::chrono::seconds(5),
                                .max_in_flight = 3});
  boost::asio::io_context io;
  int ok = 0;
  for (int i = 0; i < 12; ++i) {
    boost::asio::co_spawn(
        io,
        [&]() -> boost::asio::awaitable<void> {
          StatusOr<Response> r = co_await client.Call(Method::kPost, "/containers/create");
          if (r.ok() && r->status == 200) ++ok;
        },
        boost::asio::detached);
  }
  io.run();
  CHECK(ok == 12);
  CHECK(engine.calls() == 12);
  // The 100 ms answers overlap up to the limit, never past it.
  CHECK(engine.most_at_once() <= 3);
  CHECK(engine.most_at_once() >= 2);

  // CallSync takes no turn (it runs while the event loop is blocked) and still works.
  StatusOr<Response> sync = client.CallSync(Method::kGet, "/info");
  REQUIRE(sync.ok());
  CHECK(sync->status == 200);
}

}  // namespace
}  // namespace kiln::docker
