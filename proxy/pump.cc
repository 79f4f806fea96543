#include "proxy/pump.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

#include "common/logging.h"

namespace kiln {
namespace {

bool WouldBlock(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

// What a pump reads into and sends from at once. Every use is a recv then sends within one call
// on one thread, so the thread's pumps can share it; what cannot be sent at once is copied to the
// pump's own buffer.
char* Scratch() {
  thread_local std::array<char, kPumpBufferBytes> scratch;
  return scratch.data();
}

// Rounds of read-then-write in one Run.
constexpr int kRoundsPerTurn = 16;
// Asked of one splice into the pipe: the pipe's default capacity.
constexpr size_t kChunkBytes = 64 << 10;

}  // namespace

void PumpSocket::Note(uint32_t epoll_events) {
  if ((epoll_events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) readable = true;
  if ((epoll_events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0) writable = true;
  // After an error the queue may not be all there was: only a clean shutdown counts.
  if ((epoll_events & EPOLLRDHUP) != 0 && (epoll_events & EPOLLERR) == 0) peer_closed = true;
  if ((epoll_events & EPOLLPRI) != 0) urgent = readable = true;
}

Pump::Pump(PumpSocket& in, PumpSocket& out, uint64_t* counter, size_t splice_after)
    : in_(in), out_(out), counter_(counter), splice_after_(splice_after) {}

Pump::~Pump() = default;

Pump::Result Pump::Run() {
  if (result_ == Result::kEnded || result_ == Result::kFailed) return result_;
  for (int round = 0; round < kRoundsPerTurn; ++round) {
    switch (splicing() ? SpliceOnce() : CopyOnce()) {
      case Next::kAgain:
        continue;
      case Next::kBlocked:
        return result_ = Result::kBlocked;
      case Next::kStop:
        return result_;
    }
  }
  return result_ = Result::kYield;
}

// One round through user space: what is held from before goes first, then one read and as much
// of it as the output takes.
Pump::Next Pump::CopyOnce() {
  const int out = out_.fd.get();
  if (held_ < held_bytes_) {
    if (!out_.writable) return Next::kBlocked;
    ssize_t n =
        ::send(out, held_buffer_.get() + held_, held_bytes_ - held_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) return Next::kAgain;
      if (WouldBlock(errno)) {
        out_.writable = false;
        return Next::kBlocked;
      }
      return Fail(errno);
    }
    Sent(static_cast<size_t>(n));
    held_ += static_cast<size_t>(n);
    if (held_ < held_bytes_) {
      out_.writable = false;  // a short send: the output is full
      return Next::kBlocked;
    }
    held_buffer_.reset();
    held_ = held_bytes_ = 0;
    return Next::kAgain;
  }
  if (eof_) return End();
  if (moved_ >= splice_after_ && SwitchToSplice()) return Next::kAgain;
  if (!in_.readable || !out_.writable) return Next::kBlocked;

  char* buffer = Scratch();
  ssize_t n = ::recv(in_.fd.get(), buffer, kPumpBufferBytes, MSG_DONTWAIT);
  if (n == 0) {
    eof_ = true;
    return Next::kAgain;
  }
  if (n < 0) {
    if (errno == EINTR) return Next::kAgain;
    if (WouldBlock(errno)) {
      in_.readable = false;
      return Next::kBlocked;
    }
    return Fail(errno);
  }
  const auto got = static_cast<size_t>(n);
  if (got < kPumpBufferBytes && !in_.urgent) {
    // The socket is empty now: the next bytes raise a new edge. After the peer's shutdown
    // nothing more comes, so this was the end of stream too.
    in_.readable = false;
    if (in_.peer_closed) eof_ = true;
  }
  size_t sent = 0;
  while (sent < got) {
    ssize_t m = ::send(out, buffer + sent, got - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (m > 0) {
      sent += static_cast<size_t>(m);
      continue;
    }
    if (m < 0 && errno == EINTR) continue;
    if (m < 0 && WouldBlock(errno)) break;
    Sent(sent);
    return Fail(m == 0 ? ECONNRESET : errno);
  }
  Sent(sent);
  if (sent == got) return Next::kAgain;
  // The output is full: keep the rest (at most one buffer) and read no more until it is sent.
  out_.writable = false;
  held_buffer_ = std::make_unique_for_overwrite<char[]>(kPumpBufferBytes);
  std::memcpy(held_buffer_.get(), buffer + sent, got - sent);
  held_ = 0;
  held_bytes_ = got - sent;
  return Next::kBlocked;
}

// Makes the pipe; false (and copying for good) when it cannot be had.
bool Pump::SwitchToSplice() {
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

// One round of zero-copy: empty the pipe into the output, else fill it from the input. A short
// splice says nothing of the socket (the pipe may have been what was full): only EAGAIN clears
// readiness here.
Pump::Next Pump::SpliceOnce() {
  if (in_pipe_ > 0) {
    if (!out_.writable) return Next::kBlocked;
    ssize_t n = ::splice(pipe_read_.get(), nullptr, out_.fd.get(), nullptr, in_pipe_,
                         SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      in_pipe_ -= static_cast<size_t>(n);
      Sent(static_cast<size_t>(n));
      return Next::kAgain;
    }
    if (n < 0 && errno == EINTR) return Next::kAgain;
    if (n < 0 && WouldBlock(errno)) {
      out_.writable = false;
      return Next::kBlocked;
    }
    return Fail(n == 0 ? ECONNRESET : errno);
  }
  if (eof_) return End();
  if (!in_.readable) return Next::kBlocked;
  // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
  ssize_t n = ::splice(in_.fd.get(), nullptr, pipe_write_.get(), nullptr, kChunkBytes,
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
  if (WouldBlock(errno)) {
    in_.readable = false;
    return Next::kBlocked;
  }
  return Fail(errno);
}

// End of input with everything sent: half-close the output unless the caller closes it. A
// shutdown that fails (the peer is gone) ends the direction just the same.
Pump::Next Pump::End() {
  if (half_close_) ::shutdown(out_.fd.get(), SHUT_WR);
  result_ = Result::kEnded;
  return Next::kStop;
}

Pump::Next Pump::Fail(int err) {
  error_ = err;
  result_ = Result::kFailed;
  return Next::kStop;
}

void Pump::Sent(size_t n) {
  moved_ += n;
  *counter_ += n;
}

}  // namespace kiln
