// One direction of forwarding between two real loopback connections: copying only, splicing
// from the start, and copying that switches to splice(2) at the threshold.

#include "proxy/pump.h"

#include <catch2/catch.hpp>

#include "tests/proxy/proxy_test_util.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using namespace std::chrono_literals;
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

// A pump from `from.far` to `to.far` on its own io thread.
struct PumpUnderTest {
  explicit PumpUnderTest(size_t splice_after, bool skip_half_close = false)
      : from(t.io()), to(t.io()) {
    t.Run([&] {
      from.far.non_blocking(true);
      to.far.non_blocking(true);
      pump = MakePump(
          from.far, to.far, [this](size_t n) { counted += n; }, splice_after);
      if (skip_half_close) pump->SkipHalfClose();
      pump->Start(std::make_shared<int>(0),
                  [this](boost::system::error_code ec) { done.set_value(ec); });
      return 0;
    });
  }
  ~PumpUnderTest() {
    t.Run([&] {
      pump.reset();
      return 0;
    });
  }
  PumpUnderTest(const PumpUnderTest&) = delete;
  PumpUnderTest& operator=(const PumpUnderTest&) = delete;

  bool splicing() {
    return t.Run([&] { return pump->splicing(); });
  }

  IoThread t;
  Pair from;
  Pair to;
  std::atomic<size_t> counted{0};
  std::promise<boost::system::error_code> done;
  std::unique_ptr<Pump> pump;
};

std::string Payload(size_t n) {
  std::string payload(n, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7 + i / 4096);
  return payload;
}

TEST_CASE("a pump moves every byte and half-closes at the end of its input", "[proxy][pump]") {
  size_t splice_after = GENERATE(size_t{0}, kNeverSplice, kSpliceAfterBytes);
  CAPTURE(splice_after);
  PumpUnderTest p(splice_after);

  // 4 MiB: many times a pipe's capacity and the copy buffer, and read only after a pause, so
  // the pump finds its output full (and holds what it read) more than once.
  const std::string payload = Payload(4 << 20);
  bool sent = false;
  std::thread writer([&] {
    sent =
        testing::SendAll(p.from.near.get(), payload) && ::shutdown(p.from.near.get(), SHUT_WR) == 0;
  });
  std::this_thread::sleep_for(100ms);
  std::optional<std::string> got = testing::ReadAll(p.to.near.get());
  writer.join();
  CHECK(sent);
  REQUIRE(got.has_value());
  CHECK(got->size() == payload.size());
  CHECK(*got == payload);
  CHECK_FALSE(p.done.get_future().get());
  CHECK(p.counted.load() == payload.size());
  // Past the threshold it splices; below it, and when told never, it copies.
  CHECK(p.splicing() == (splice_after != kNeverSplice));
}

TEST_CASE("a short transfer is copied without a pipe and half-closed", "[proxy][pump]") {
  PumpUnderTest p(kSpliceAfterBytes);
  const std::string payload = Payload(1000);
  REQUIRE(testing::SendAll(p.from.near.get(), payload));
  CHECK(testing::ReadExactly(p.to.near.get(), payload.size()) == payload);
  // The half-close from the input reaches the output once everything before it has.
  REQUIRE(::shutdown(p.from.near.get(), SHUT_WR) == 0);
  CHECK(testing::ReadAll(p.to.near.get()) == "");
  CHECK_FALSE(p.done.get_future().get());
  CHECK(p.counted.load() == payload.size());
  CHECK_FALSE(p.splicing());
}

TEST_CASE("bytes and the end of input that arrive before the pump starts are not lost",
          "[proxy][pump]") {
  // The reactor is edge-triggered: what came before Start raises no new readiness. Start reads
  // before it waits; StartWaiting waits at once, and relies on the wait re-arming the socket.
  bool wait_first = GENERATE(false, true);
  CAPTURE(wait_first);
  IoThread t;
  Pair from(t.io());
  Pair to(t.io());
  const std::string payload = Payload(5000);
  REQUIRE(testing::SendAll(from.near.get(), payload));
  REQUIRE(::shutdown(from.near.get(), SHUT_WR) == 0);
  // The io thread waits in the reactor, which sees the readiness (and drops it: nothing waits
  // on the socket yet) before the pump exists.
  std::this_thread::sleep_for(100ms);
  std::promise<boost::system::error_code> done;
  std::future<boost::system::error_code> ended = done.get_future();
  std::unique_ptr<Pump> pump;
  t.Run([&] {
    from.far.non_blocking(true);
    to.far.non_blocking(true);
    pump = MakePump(from.far, to.far, [](size_t) {});
    auto owner = std::make_shared<int>(0);
    auto on_done = [&](boost::system::error_code ec) { done.set_value(ec); };
    if (wait_first) {
      pump->StartWaiting(owner, on_done);
    } else {
      pump->Start(owner, on_done);
    }
    return 0;
  });
  CHECK(testing::ReadAll(to.near.get()) == payload);
  REQUIRE(ended.wait_for(10s) == std::future_status::ready);
  CHECK_FALSE(ended.get());
  t.Run([&] {
    pump.reset();
    return 0;
  });
}

TEST_CASE("a pump told the other direction ended leaves its output open at the end",
          "[proxy][pump]") {
  PumpUnderTest p(kSpliceAfterBytes, /*skip_half_close=*/true);
  REQUIRE(testing::SendAll(p.from.near.get(), "last words"));
  REQUIRE(::shutdown(p.from.near.get(), SHUT_WR) == 0);
  CHECK_FALSE(p.done.get_future().get());
  CHECK(testing::ReadExactly(p.to.near.get(), 10) == "last words");
  // No end of stream: the output is the caller's to close.
  char c = 0;
  CHECK(::recv(p.to.near.get(), &c, 1, MSG_DONTWAIT) == -1);
  CHECK((errno == EAGAIN || errno == EWOULDBLOCK));
}

}  // namespace
}  // namespace kiln
