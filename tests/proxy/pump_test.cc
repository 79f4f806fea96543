// One direction of forwarding between two real loopback connections: copying only, splicing
// from the start, and copying that switches to splice(2) at the threshold.

#include "proxy/pump.h"

#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <optional>

#include "proxy/poller.h"
#include "tests/proxy/proxy_test_util.h"

namespace kiln {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using namespace std::chrono_literals;
using testing::IoThread;

// A connected pair of sockets: `near` is what the test holds, `far` (non-blocking) what the pump
// holds.
struct Pair {
  explicit Pair(asio::io_context& io) {
    tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    near = testing::Connect(a.local_endpoint().port());
    far.fd.reset(::accept4(a.native_handle(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    REQUIRE(far.fd);
  }
  UniqueFd near;
  PumpSocket far;
};

// Drives a pump from `from.far` to `to.far` the way a proxied connection does: both sockets in
// a Poller, the pump run on each event until it ends.
class Driver final : public Pollable {
 public:
  Driver(Poller& poller, Pair& from, Pair& to, size_t splice_after, bool skip_half_close)
      : poller_(poller), from_(from), to_(to), pump_(from.far, to.far, &counted_, splice_after) {
    if (skip_half_close) pump_.SkipHalfClose();
  }
  // Adds the sockets (the kernel reports what is already there) and runs the pump.
  void Start() {
    REQUIRE(poller_.Add(from_.far.fd.get(), this, 0).ok());
    REQUIRE(poller_.Add(to_.far.fd.get(), this, 1).ok());
  }
  void OnReady(unsigned tag, uint32_t events) override {
    (tag == 0 ? from_.far : to_.far).Note(events);
    if (finished_) return;
    switch (pump_.Run()) {
      case Pump::Result::kBlocked:
        return;
      case Pump::Result::kYield:
        poller_.Again(this, 0);
        return;
      case Pump::Result::kEnded:
        finished_ = true;
        done.set_value(0);
        return;
      case Pump::Result::kFailed:
        finished_ = true;
        done.set_value(pump_.error());
        return;
    }
  }
  const Pump& pump() const { return pump_; }
  uint64_t counted() const { return counted_; }

  std::promise<int> done;  // 0, or the errno that stopped the pump

 private:
  Poller& poller_;
  Pair& from_;
  Pair& to_;
  uint64_t counted_ = 0;
  Pump pump_;
  bool finished_ = false;
};

// A pump on its own io thread.
struct PumpUnderTest {
  explicit PumpUnderTest(size_t splice_after, bool skip_half_close = false)
      : from(t.io()), to(t.io()) {
    t.Run([&] {
      poller.emplace(t.io());
      driver.emplace(*poller, from, to, splice_after, skip_half_close);
      ended = driver->done.get_future();
      driver->Start();
      return 0;
    });
  }
  ~PumpUnderTest() {
    t.Run([&] {
      driver.reset();
      poller.reset();
      return 0;
    });
  }
  PumpUnderTest(const PumpUnderTest&) = delete;
  PumpUnderTest& operator=(const PumpUnderTest&) = delete;

  bool splicing() {
    return t.Run([&] { return driver->pump().splicing(); });
  }
  uint64_t counted() {
    return t.Run([&] { return driver->counted(); });
  }

  IoThread t;
  Pair from;
  Pair to;
  std::optional<Poller> poller;
  std::optional<Driver> driver;
  std::future<int> ended;
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
  CHECK(p.ended.get() == 0);
  CHECK(p.counted() == payload.size());
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
  CHECK(p.ended.get() == 0);
  CHECK(p.counted() == payload.size());
  CHECK_FALSE(p.splicing());
}

TEST_CASE("bytes and the end of input that arrive before the pump starts are not lost",
          "[proxy][pump]") {
  // The set is edge-triggered: what came before the sockets were added raises no new edge
  // later, so adding them must report it.
  IoThread t;
  Pair from(t.io());
  Pair to(t.io());
  const std::string payload = Payload(5000);
  REQUIRE(testing::SendAll(from.near.get(), payload));
  REQUIRE(::shutdown(from.near.get(), SHUT_WR) == 0);
  std::this_thread::sleep_for(100ms);
  std::optional<Poller> poller;
  std::optional<Driver> driver;
  std::future<int> ended = t.Run([&] {
    poller.emplace(t.io());
    driver.emplace(*poller, from, to, kSpliceAfterBytes, false);
    std::future<int> f = driver->done.get_future();
    driver->Start();
    return f;
  });
  CHECK(testing::ReadAll(to.near.get()) == payload);
  REQUIRE(ended.wait_for(10s) == std::future_status::ready);
  CHECK(ended.get() == 0);
  t.Run([&] {
    driver.reset();
    poller.reset();
    return 0;
  });
}

TEST_CASE("a pump told the other direction ended leaves its output open at the end",
          "[proxy][pump]") {
  PumpUnderTest p(kSpliceAfterBytes, /*skip_half_close=*/true);
  REQUIRE(testing::SendAll(p.from.near.get(), "last words"));
  REQUIRE(::shutdown(p.from.near.get(), SHUT_WR) == 0);
  CHECK(p.ended.get() == 0);
  CHECK(testing::ReadExactly(p.to.near.get(), 10) == "last words");
  // No end of stream: the output is the caller's to close.
  char c = 0;
  CHECK(::recv(p.to.near.get(), &c, 1, MSG_DONTWAIT) == -1);
  CHECK((errno == EAGAIN || errno == EWOULDBLOCK));
}

}  // namespace
}  // namespace kiln
