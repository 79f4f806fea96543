#pragma once

// Real sockets on 127.0.0.1 for the data-plane tests: an echo backend on its own thread, and
// blocking clients with a receive timeout so that a broken proxy fails a test instead of hanging.

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "common/unique_fd.h"

namespace kiln::testing {

// Runs an io_context on its own thread until destroyed.
class IoThread {
 public:
  IoThread() : work_(io_.get_executor()), thread_([this] { io_.run(); }) {}
  ~IoThread() {
    work_.reset();
    io_.stop();
    thread_.join();
  }
  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;

  boost::asio::io_context& io() { return io_; }

  // Runs `f` on the io thread and returns its result.
  template <class F>
  auto Run(F f) -> decltype(f()) {
    std::packaged_task<decltype(f())()> task(std::move(f));
    auto result = task.get_future();
    boost::asio::post(io_, [&task] { task(); });
    return result.get();
  }

 private:
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread thread_;
};

// Echoes every byte it receives as it arrives; when the client ends its side, writes "|NAME" and
// closes. So a request "x" sent with a half-close is answered "x|NAME": which backend answered.
class EchoBackend {
 public:
  explicit EchoBackend(std::string name)
      : name_(std::move(name)),
        acceptor_(thread_.io(), {boost::asio::ip::make_address("127.0.0.1"), 0}) {
    thread_.Run([this] {
      Accept();
      return 0;
    });
  }
  ~EchoBackend() {
    thread_.Run([this] {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
      return 0;
    });
  }
  EchoBackend(const EchoBackend&) = delete;
  EchoBackend& operator=(const EchoBackend&) = delete;

  const std::string& name() const { return name_; }
  int port() const { return acceptor_.local_endpoint().port(); }
  int accepted() const { return accepted_.load(); }

 private:
  struct Connection : std::enable_shared_from_this<Connection> {
    Connection(boost::asio::ip::tcp::socket s, std::string n)
        : socket(std::move(s)), name(std::move(n)) {}
    void Read() {
      socket.async_read_some(boost::asio::buffer(buffer),
                             [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                               if (ec == boost::asio::error::eof) return self->Finish();
                               if (ec) return;
                               boost::asio::async_write(
                                   self->socket, boost::asio::buffer(self->buffer.data(), n),
                                   [self](boost::system::error_code wec, size_t) {
                                     if (!wec) self->Read();
                                   });
                             });
    }
    void Finish() {
      tail = "|" + name;
      boost::asio::async_write(socket, boost::asio::buffer(tail),
                               [self = shared_from_this()](boost::system::error_code, size_t) {
                                 boost::system::error_code ignored;
                                 self->socket.shutdown(boost::asio::socket_base::shutdown_send,
                                                       ignored);
                                 self->socket.close(ignored);
                               });
    }
    boost::asio::ip::tcp::socket socket;
    std::string name;
    std::string tail;
    std::array<char, 16384> buffer{};
  };

  void Accept() {
    acceptor_.async_accept(
        [this](boost::system::error_code ec, boost::asio::ip::tcp::socket socket) {
          if (ec) return;
          ++accepted_;
          std::make_shared<Connection>(std::move(socket), name_)->Read();
          Accept();
        });
  }

  std::string name_;
  IoThread thread_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::atomic<int> accepted_{0};
};

// A port on 127.0.0.1 where nothing listens (bound, then closed): connects to it are refused.
inline int RefusingPort() {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor a(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

// A blocking client connection; every receive gives up after 10 s.
inline UniqueFd Connect(int port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  timeval tv{.tv_sec = 10, .tv_usec = 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
  return fd;
}

inline bool SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Reads until end of stream; nullopt on an error or the timeout.
inline std::optional<std::string> ReadAll(int fd) {
  std::string out;
  std::array<char, 16384> buf{};
  for (;;) {
    ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    if (n == 0) return out;
    if (n < 0) return std::nullopt;
    out.append(buf.data(), static_cast<size_t>(n));
  }
}

// Reads exactly `n` bytes; nullopt on an error, end of stream or the timeout.
inline std::optional<std::string> ReadExactly(int fd, size_t n) {
  std::string out(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, out.data() + got, n - got, 0);
    if (r <= 0) return std::nullopt;
    got += static_cast<size_t>(r);
  }
  return out;
}

// One request on a new connection: sends `body`, shuts down the sending side, reads the reply to
// the end. Returns the name of the backend that answered, or nullopt when the reply is not
// `body|NAME` (a failed request).
inline std::optional<std::string> Request(int port, const std::string& body) {
  UniqueFd fd = Connect(port);
  if (!fd || !SendAll(fd.get(), body) || ::shutdown(fd.get(), SHUT_WR) != 0) return std::nullopt;
  std::optional<std::string> reply = ReadAll(fd.get());
  if (!reply || reply->size() <= body.size() + 1 || reply->compare(0, body.size(), body) != 0 ||
      (*reply)[body.size()] != '|') {
    return std::nullopt;
  }
  return reply->substr(body.size() + 1);
}

// Polls `done` until it holds or `timeout` passes.
inline bool Eventually(const std::function<bool()>& done,
                       std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

}  // namespace kiln::testing
