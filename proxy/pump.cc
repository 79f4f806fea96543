#include "proxy/pump.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <utility>

#include "common/unique_fd.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

error_code LastError() { return {errno, boost::system::system_category()}; }

class SplicePump final : public Pump {
 public:
  SplicePump(tcp::socket& in, tcp::socket& out, UniqueFd pipe_read, UniqueFd pipe_write,
             Counter counter)
      : in_(in),
        out_(out),
        pipe_read_(std::move(pipe_read)),
        pipe_write_(std::move(pipe_write)),
        counter_(std::move(counter)) {}

  void Start(const std::shared_ptr<void>& owner, Done done) override {
    done_ = std::move(done);
    Step(owner);
  }

 private:
  // Rounds of read-then-write before yielding to other connections, so one fast connection
  // cannot hold the io thread.
  static constexpr int kRoundsPerTurn = 16;
  // Asked of one splice into the pipe: the pipe's default capacity.
  static constexpr size_t kChunkBytes = 64 << 10;

  void Step(const std::shared_ptr<void>& owner) {
    for (int round = 0; round < kRoundsPerTurn; ++round) {
      if (in_pipe_ > 0) {
        ssize_t n = ::splice(pipe_read_.get(), nullptr, out_.native_handle(), nullptr, in_pipe_,
                             SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
          in_pipe_ -= static_cast<size_t>(n);
          counter_(static_cast<size_t>(n));
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
          out_.async_wait(tcp::socket::wait_write, [this, owner](error_code ec) {
            if (ec) return Finish(ec);
            Step(owner);
          });
          return;
        }
        return Finish(n == 0 ? asio::error::connection_reset : LastError());
      }
      if (eof_) {
        error_code ec;
        out_.shutdown(tcp::socket::shutdown_send, ec);
        return Finish(ec);
      }
      // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
      ssize_t n = ::splice(in_.native_handle(), nullptr, pipe_write_.get(), nullptr, kChunkBytes,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        in_pipe_ = static_cast<size_t>(n);
        continue;
      }
      if (n == 0) {
        eof_ = true;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        in_.async_wait(tcp::socket::wait_read, [this, owner](error_code ec) {
          if (ec) return Finish(ec);
          Step(owner);
        });
        return;
      }
      return Finish(LastError());
    }
    asio::post(in_.get_executor(), [this, owner] { Step(owner); });
  }

  void Finish(error_code ec) {
    if (done_) std::exchange(done_, nullptr)(ec);
  }

  tcp::socket& in_;
  tcp::socket& out_;
  UniqueFd pipe_read_;
  UniqueFd pipe_write_;
  Counter counter_;
  Done done_;
  size_t in_pipe_ = 0;  // bytes read from `in_` and not yet written to `out_`
  bool eof_ = false;    // `in_` reached end of stream
};

class BufferedPump final : public Pump {
 public:
  BufferedPump(tcp::socket& in, tcp::socket& out, Counter counter)
      : in_(in), out_(out), counter_(std::move(counter)) {}

  void Start(const std::shared_ptr<void>& owner, Done done) override {
    done_ = std::move(done);
    Read(owner);
  }

 private:
  void Read(const std::shared_ptr<void>& owner) {
    in_.async_read_some(asio::buffer(buffer_), [this, owner](error_code ec, size_t n) {
      if (ec == asio::error::eof) {
        error_code shut;
        out_.shutdown(tcp::socket::shutdown_send, shut);
        return Finish(shut);
      }
      if (ec) return Finish(ec);
      asio::async_write(out_, asio::buffer(buffer_.data(), n),
                        [this, owner](error_code wec, size_t written) {
                          if (wec) return Finish(wec);
                          counter_(written);
                          Read(owner);
                        });
    });
  }

  void Finish(error_code ec) {
    if (done_) std::exchange(done_, nullptr)(ec);
  }

  tcp::socket& in_;
  tcp::socket& out_;
  Counter counter_;
  Done done_;
  std::array<char, kBufferedPumpBytes> buffer_{};
};

}  // namespace

StatusOr<std::unique_ptr<Pump>> MakeSplicePump(tcp::socket& in, tcp::socket& out,
                                               Pump::Counter counter) {
  std::array<int, 2> fds{};
  if (::pipe2(fds.data(), O_CLOEXEC | O_NONBLOCK) != 0) return ErrnoError(errno, "pipe2");
  return std::unique_ptr<Pump>(std::make_unique<SplicePump>(in, out, UniqueFd(fds[0]),
                                                            UniqueFd(fds[1]), std::move(counter)));
}

std::unique_ptr<Pump> MakeBufferedPump(tcp::socket& in, tcp::socket& out, Pump::Counter counter) {
  return std::make_unique<BufferedPump>(in, out, std::move(counter));
}

}  // namespace kiln
