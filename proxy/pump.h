#pragma once

// One direction of a forwarded connection: bytes read from one socket are written to the other
// until the first reaches end of stream; then the second is shut down for writing (half-close),
// so a client that shuts down its sending side still gets the whole reply.
//
// A direction starts by copying through user space (recv(2) and send(2): two system calls for a
// short request or reply, and no pipe to make and close) and switches to zero-copy splice(2)
// through a pipe of its own once it has moved `splice_after` bytes, like HAProxy's splice-auto:
// short connections never make a pipe, long transfers do not copy.

#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <functional>
#include <limits>
#include <memory>

namespace kiln {

class Pump {
 public:
  // Called once: with no error after end of stream and the half-close (unless SkipHalfClose),
  // or with the error that stopped the direction (operation_aborted when a socket was closed
  // under it).
  using Done = std::function<void(boost::system::error_code)>;
  // Told the bytes written to the output as they go, for the counters.
  using Counter = std::function<void(size_t)>;

  virtual ~Pump() = default;
  // REQUIRES: both sockets connected and non-blocking, and they outlive every pending handler;
  // `owner` (held by each pending handler) is what keeps them and this pump alive. Reads at once
  // (the input may hold bytes already) before it waits for the input.
  virtual void Start(const std::shared_ptr<void>& owner, Done done) = 0;
  // Start, but waiting for the input first: for a direction that has nothing to move yet (a
  // reply before its request has gone), where a read would only say EAGAIN. Bytes that came
  // before are not lost: Asio's wait re-arms the descriptor (EPOLL_CTL_MOD), which reports what
  // is already there.
  virtual void StartWaiting(const std::shared_ptr<void>& owner, Done done) = 0;
  // The opposite direction has ended and the caller closes both sockets when this one ends: at
  // end of input `done` is called without the half-close, which the close does as well (a
  // system call saved per connection).
  virtual void SkipHalfClose() = 0;
  // Whether the pump has switched to splice(2) (a pipe is held).
  virtual bool splicing() const = 0;
};

// User-space copies go through a buffer of this size: one shared by the thread's pumps for what
// is sent as soon as it is read, and one of the pump's own, only while the output cannot take
// what was read (freed once it has), so an idle or flowing connection holds no buffer.
inline constexpr size_t kPumpBufferBytes = 16 << 10;
// The default switch to splice(2): HAProxy's splice-auto threshold, a pipe's default capacity.
inline constexpr size_t kSpliceAfterBytes = 64 << 10;
inline constexpr size_t kNeverSplice = std::numeric_limits<size_t>::max();

// `splice_after`: bytes moved by copying before switching to splice; 0 splices from the start,
// kNeverSplice never does. If a pipe cannot be made (out of descriptors) the pump logs it and
// goes on copying.
std::unique_ptr<Pump> MakePump(boost::asio::ip::tcp::socket& in, boost::asio::ip::tcp::socket& out,
                               Pump::Counter counter, size_t splice_after = kSpliceAfterBytes);

}  // namespace kiln
