#include "proxy/pump.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <boost/asio/post.hpp>
#include <cerrno>
#include <cstring>
#include <utility>

#include "common/logging.h"
#include "common/unique_fd.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

error_code LastError() { return {errno, boost::system::system_category()}; }
bool WouldBlock() { return errno == EAGAIN || errno == EWOULDBLOCK; }

// What a pump reads into and sends from at once. Every use is a recv then sends within one call
// on one thread, so the thread's pumps can share it; what cannot be sent at once is copied to the
// pump's own buffer.
char* Scratch() {
  thread_local std::array<char, kPumpBufferBytes> scratch;
  return scratch.data();
}

class AdaptivePump final : public Pump {
 public:
  AdaptivePump(tcp::socket& in, tcp::socket& out, Counter counter, size_t splice_after)
      : in_(in), out_(out), counter_(std::move(counter)), splice_after_(splice_after) {}

  void Start(const std::shared_ptr<void>& owner, Done done) override {
    done_ = std::move(done);
    Step(owner);
  }
  void StartWaiting(const std::shared_ptr<void>& owner, Done done) override {
    done_ = std::move(done);
    WaitInput(owner);
  }
  void SkipHalfClose() override { half_close_ = false; }
  bool splicing() const override { return static_cast<bool>(pipe_read_); }

 private:
  // Rounds of read-then-write before yielding to other connections, so one fast connection
  // cannot hold the io thread.
  static constexpr int kRoundsPerTurn = 16;
  // Asked of one splice into the pipe: the pipe's default capacity.
  static constexpr size_t kChunkBytes = 64 << 10;

  enum class Next { kAgain, kWaitInput, kWaitOutput, kStop };

  void Step(const std::shared_ptr<void>& owner) {
    for (int round = 0; round < kRoundsPerTurn; ++round) {
      switch (splicing() ? SpliceOnce() : CopyOnce()) {
        case Next::kAgain:
          continue;
        case Next::kWaitInput:
          WaitInput(owner);
          return;
        case Next::kWaitOutput:
          out_.async_wait(tcp::socket::wait_write, [this, owner](error_code ec) {
            if (ec) return Finish(ec);
            Step(owner);
          });
          return;
        case Next::kStop:
          return;
      }
    }
    asio::post(in_.get_executor(), [this, owner] { Step(owner); });
  }

  // The reactor is edge-triggered, but each wait re-arms the descriptor (Asio 1.74 makes an
  // EPOLL_CTL_MOD for it, and the kernel then reports readiness that is already there), so a
  // wait does not need EAGAIN before it: bytes or an end of stream that came since the last read
  // end it at once. (The tests that start a pump on bytes sent before it prove this holds.)
  void WaitInput(const std::shared_ptr<void>& owner) {
    in_.async_wait(tcp::socket::wait_read, [this, owner](error_code ec) {
      if (ec) return Finish(ec);
      Step(owner);
    });
  }

  // One round through user space: what is held from before goes first, then one read and
  // as much of it as the output takes.
  Next CopyOnce() {
    const int out = out_.native_handle();
    if (held_ < held_bytes_) {
      ssize_t n =
          ::send(out, held_buffer_.get() + held_, held_bytes_ - held_, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) return Next::kAgain;
        if (WouldBlock()) return Next::kWaitOutput;
        return Fail(LastError());
      }
      Sent(static_cast<size_t>(n));
      held_ += static_cast<size_t>(n);
      if (held_ == held_bytes_) {
        held_buffer_.reset();
        held_ = held_bytes_ = 0;
      }
      return Next::kAgain;
    }
    if (eof_) return End();
    if (moved_ >= splice_after_ && SwitchToSplice()) return Next::kAgain;

    char* buffer = Scratch();
    ssize_t n = ::recv(in_.native_handle(), buffer, kPumpBufferBytes, MSG_DONTWAIT);
    if (n == 0) {
      eof_ = true;
      return Next::kAgain;
    }
    if (n < 0) {
      if (errno == EINTR) return Next::kAgain;
      if (WouldBlock()) return Next::kWaitInput;
      return Fail(LastError());
    }
    const auto got = static_cast<size_t>(n);
    size_t sent = 0;
    while (sent < got) {
      ssize_t m = ::send(out, buffer + sent, got - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (m > 0) {
        sent += static_cast<size_t>(m);
        continue;
      }
      if (m < 0 && errno == EINTR) continue;
      if (m < 0 && WouldBlock()) break;
      Sent(sent);
      return Fail(m == 0 ? asio::error::connection_reset : LastError());
    }
    Sent(sent);
    // Read again even after a short read: an end of stream that came with the last bytes (a
    // reply and its close) is then passed on now, not after another round through the reactor.
    if (sent == got) return Next::kAgain;
    // The output is full: keep the rest (at most one buffer) and read no more until it is sent.
    held_buffer_ = std::make_unique_for_overwrite<char[]>(kPumpBufferBytes);
    std::memcpy(held_buffer_.get(), buffer + sent, got - sent);
    held_ = 0;
    held_bytes_ = got - sent;
    return Next::kWaitOutput;
  }

  // Makes the pipe; false (and copying for good) when it cannot be had.
  bool SwitchToSplice() {
    std::array<int, 2> fds{};
    if (::pipe2(fds.data(), O_CLOEXEC | O_NONBLOCK) != 0) {
      LogWarn("no pipe for zero-copy forwarding; copying through a buffer",
              {{"error", std::strerror(errno)}});
      splice_after_ = kNeverSplice;
      return false;
    }
    pipe_read_.reset(fds[0]);
    pipe_write_.reset(fds[1]);
    return true;
  }

  // One round of zero-copy: empty the pipe into the output, else fill it from the input.
  Next SpliceOnce() {
    if (in_pipe_ > 0) {
      ssize_t n = ::splice(pipe_read_.get(), nullptr, out_.native_handle(), nullptr, in_pipe_,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        in_pipe_ -= static_cast<size_t>(n);
        Sent(static_cast<size_t>(n));
        return Next::kAgain;
      }
      if (n < 0 && errno == EINTR) return Next::kAgain;
      if (n < 0 && WouldBlock()) return Next::kWaitOutput;
      return Fail(n == 0 ? asio::error::connection_reset : LastError());
    }
    if (eof_) return End();
    // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
    ssize_t n = ::splice(in_.native_handle(), nullptr, pipe_write_.get(), nullptr, kChunkBytes,
                         SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      in_pipe_ = static_cast<size_t>(n);
      return Next::kAgain;
    }
    if (n == 0) {
      eof_ = true;
      return Next::kAgain;
    }
    if (errno == EINTR) return Next::kAgain;
    if (WouldBlock()) return Next::kWaitInput;
    return Fail(LastError());
  }

  // End of input with everything sent: half-close the output unless the caller closes it.
  Next End() {
    error_code ec;
    if (half_close_) out_.shutdown(tcp::socket::shutdown_send, ec);
    Finish(ec);
    return Next::kStop;
  }

  Next Fail(error_code ec) {
    Finish(ec);
    return Next::kStop;
  }

  void Sent(size_t n) {
    if (n == 0) return;
    moved_ += n;
    counter_(n);
  }

  void Finish(error_code ec) {
    if (done_) std::exchange(done_, nullptr)(ec);
  }

  tcp::socket& in_;
  tcp::socket& out_;
  Counter counter_;
  size_t splice_after_;
  Done done_;
  size_t moved_ = 0;  // bytes written to `out_`
  bool eof_ = false;  // `in_` reached end of stream
  bool half_close_ = true;
  // Copying: bytes read and not yet written, [held_, held_bytes_) of held_buffer_.
  std::unique_ptr<char[]> held_buffer_;
  size_t held_ = 0;
  size_t held_bytes_ = 0;
  // Splicing: the pipe, and the bytes in it.
  UniqueFd pipe_read_;
  UniqueFd pipe_write_;
  size_t in_pipe_ = 0;
};

}  // namespace

std::unique_ptr<Pump> MakePump(tcp::socket& in, tcp::socket& out, Pump::Counter counter,
                               size_t splice_after) {
  return std::make_unique<AdaptivePump>(in, out, std::move(counter), splice_after);
}

}  // namespace kiln
