// One direction of forwarding between two real loopback connections, for both ways of moving
// the bytes (splice through a pipe, and the buffered fallback).

#include "proxy/pump.h"

#include <catch2/catch.hpp>

#include "tests/proxy/proxy_test_util.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using testing::IoThread;

// A connected pair of sockets: `near` is what the test holds, `far` what the pump holds.
struct Pair {
  explicit Pair(asio::io_context& io) : far(io) {
    tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    near = testing::Connect(a.local_endpoint().port());
    a.accept(far);
  }
  UniqueFd near;
  tcp::socket far;
};

TEST_CASE("a pump moves every byte and half-closes at the end of its input", "[proxy][pump]") {
  bool splice = GENERATE(true, false);
  CAPTURE(splice);
  IoThread t;
  Pair from(t.io());
  Pair to(t.io());
  std::atomic<size_t> counted{0};
  std::promise<boost::system::error_code> done;
  std::unique_ptr<Pump> pump;
  t.Run([&] {
    from.far.non_blocking(true);
    to.far.non_blocking(true);
    Pump::Counter counter = [&](size_t n) { counted += n; };
    if (splice) {
      StatusOr<std::unique_ptr<Pump>> made = MakeSplicePump(from.far, to.far, counter);
      pump = std::move(*made);
    } else {
      pump = MakeBufferedPump(from.far, to.far, counter);
    }
    pump->Start(std::make_shared<int>(0),
                [&](boost::system::error_code ec) { done.set_value(ec); });
    return 0;
  });

  // 4 MiB: many times a pipe's capacity, so the pump waits on a full output more than once.
  std::string payload(4 << 20, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7 + i / 4096);
  bool sent = false;
  std::thread writer([&] {
    sent = testing::SendAll(from.near.get(), payload) && ::shutdown(from.near.get(), SHUT_WR) == 0;
  });
  std::optional<std::string> got = testing::ReadAll(to.near.get());
  writer.join();
  CHECK(sent);
  REQUIRE(got.has_value());
  CHECK(got->size() == payload.size());
  CHECK(*got == payload);
  CHECK_FALSE(done.get_future().get());
  CHECK(counted.load() == payload.size());
  t.Run([&] {
    pump.reset();
    return 0;
  });
}

}  // namespace
}  // namespace kiln
