#pragma once

// One direction of a forwarded connection: bytes read from one socket are written to the other
// until the first reaches end of stream; then the second is shut down for writing (half-close),
// so a client that shuts down its sending side still gets the whole reply.

#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <functional>
#include <memory>

#include "common/status.h"

namespace kiln {

class Pump {
 public:
  // Called once: with no error after end of stream and the half-close, or with the error that
  // stopped the direction (operation_aborted when a socket was closed under it).
  using Done = std::function<void(boost::system::error_code)>;
  // Told the bytes written to the output as they go, for the counters.
  using Counter = std::function<void(size_t)>;

  virtual ~Pump() = default;
  // REQUIRES: both sockets connected and non-blocking, and they outlive every pending handler;
  // `owner` (held by each pending handler) is what keeps them and this pump alive.
  virtual void Start(const std::shared_ptr<void>& owner, Done done) = 0;
};

// Zero-copy: splice(2) from the input socket into a pipe and from the pipe to the output socket,
// so the bytes never enter user space. At most one pipe's capacity (64 KiB on Linux) is in
// flight per direction. Fails only when the pipe cannot be made (out of descriptors).
StatusOr<std::unique_ptr<Pump>> MakeSplicePump(boost::asio::ip::tcp::socket& in,
                                               boost::asio::ip::tcp::socket& out,
                                               Pump::Counter counter);

// Through a user-space buffer of kBufferedPumpBytes: for where a pipe cannot be had.
inline constexpr size_t kBufferedPumpBytes = 16 << 10;
std::unique_ptr<Pump> MakeBufferedPump(boost::asio::ip::tcp::socket& in,
                                       boost::asio::ip::tcp::socket& out, Pump::Counter counter);

}  // namespace kiln
