#pragma once

// One direction of a forwarded connection: bytes read from one socket are written to the other
// until the first reaches end of stream; then the second is shut down for writing (half-close),
// so a client that shuts down its sending side still gets the whole reply.
//
// A direction starts by copying through user space (recv(2) and send(2): two system calls for a
// short request or reply, and no pipe to make and close) and switches to zero-copy splice(2)
// through a pipe of its own once it has moved `splice_after` bytes, like HAProxy's splice-auto:
// short connections never make a pipe, long transfers do not copy.
//
// A pump makes no system call it can know is useless: the sockets are in an edge-triggered epoll
// set (proxy/poller.h), and each PumpSocket keeps what the last event said until a call says
// otherwise. A read shorter than asked emptied the socket; after the peer's shutdown
// (EPOLLRDHUP) it also means end of stream, without another read to see it.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>

#include "common/unique_fd.h"

namespace kiln {

// A socket of a forwarded connection (non-blocking) and its readiness as far as known.
struct PumpSocket {
  UniqueFd fd;
  bool readable = false;
  bool writable = false;
  bool peer_closed = false;  // the peer shut down its side: what is queued is all there is
  // The peer sent TCP urgent data (EPOLLPRI). A read stops short at the urgent mark with bytes
  // still queued behind it, so from then on only EAGAIN says the socket is empty and only a
  // read of 0 says it ended. Sticky: such connections (telnet, FTP aborts) are rare.
  bool urgent = false;

  // Takes in an epoll event mask. An error makes both ways "ready": the next call reports it.
  void Note(uint32_t epoll_events);
};

// User-space copies go through a buffer of this size: one shared by the thread's pumps for what
// is sent as soon as it is read, and one of the pump's own, only while the output cannot take
// what was read (freed once it has), so an idle or flowing connection holds no buffer.
inline constexpr size_t kPumpBufferBytes = 16 << 10;
// The default switch to splice(2): HAProxy's splice-auto threshold, a pipe's default capacity.
inline constexpr size_t kSpliceAfterBytes = 64 << 10;
inline constexpr size_t kNeverSplice = std::numeric_limits<size_t>::max();

class Pump {
 public:
  enum class Result {
    kBlocked,  // waits for the input to be readable or the output writable
    kYield,    // moved its share for this turn and has more: run it again later
    kEnded,    // end of input passed on (the output half-closed unless SkipHalfClose)
    kFailed,   // a system call failed: error() says which errno
  };

  // `counter` is told the bytes written to the output. `splice_after`: bytes moved by copying
  // before switching to splice; 0 splices from the start, kNeverSplice never does. If a pipe
  // cannot be made (out of descriptors) the pump logs it and goes on copying.
  // REQUIRES: `in`, `out` and `counter` outlive the pump.
  Pump(PumpSocket& in, PumpSocket& out, uint64_t* counter, size_t splice_after = kSpliceAfterBytes);
  ~Pump();
  Pump(const Pump&) = delete;
  Pump& operator=(const Pump&) = delete;

  // Moves what the sockets allow, a bounded number of rounds so one fast connection cannot hold
  // the thread. After kEnded or kFailed it returns the same again and does nothing.
  Result Run();

  // The opposite direction has ended and the caller closes both sockets when this one ends: at
  // end of input nothing is half-closed, which the close does as well (a system call saved).
  void SkipHalfClose() { half_close_ = false; }
  bool splicing() const { return static_cast<bool>(pipe_read_); }
  bool ended() const { return result_ == Result::kEnded; }
  int error() const { return error_; }

 private:
  enum class Next { kAgain, kBlocked, kStop };
  Next CopyOnce();
  Next SpliceOnce();
  bool SwitchToSplice();
  Next End();
  Next Fail(int err);
  void Sent(size_t n);

  PumpSocket& in_;
  PumpSocket& out_;
  uint64_t* counter_;
  size_t splice_after_;
  Result result_ = Result::kBlocked;
  int error_ = 0;
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

}  // namespace kiln
