#include "common/time_source.h"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "tests/fakes/simulated_time_source.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::SimulatedTimeSource;

TEST_CASE("simulated timers fire in deadline order, on their io_context", "[time]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  const SteadyTime start = time.SteadyNow();
  std::vector<std::pair<std::string, Duration>> fired;
  auto record = [&](const std::string& name) {
    return [&, name] {
      fired.emplace_back(name, std::chrono::duration_cast<Duration>(time.SteadyNow() - start));
    };
  };
  auto late = time.MakeTimer(io);
  auto early = time.MakeTimer(io);
  auto tie = time.MakeTimer(io);
  late->ExpireAfter(Duration(30), record("late"));
  early->ExpireAfter(Duration(10), record("early"));
  tie->ExpireAfter(Duration(30), record("tie"));
  CHECK(time.ArmedTimers() == 3);
  CHECK(late->Expiry() == start + 30ms);

  time.Advance(Duration(20));
  CHECK(fired.empty());  // posted, not run: they run on the io_context's thread
  CHECK(early->Armed());
  io.run();
  REQUIRE(fired.size() == 1);
  CHECK(fired[0].first == "early");
  CHECK_FALSE(early->Armed());

  time.AdvanceAndRun(Duration(10), io);  // each runs at its own deadline
  REQUIRE(fired.size() == 3);
  CHECK(fired[1] == std::pair<std::string, Duration>{"late", Duration(30)});
  CHECK(fired[2] == std::pair<std::string, Duration>{"tie", Duration(30)});
  CHECK(time.ArmedTimers() == 0);
  CHECK(time.SystemNow() - SimulatedTimeSource().SystemNow() == 30ms);
}

TEST_CASE("a cancelled, re-armed or destroyed simulated timer does not fire", "[time]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  std::vector<std::string> fired;
  auto a = time.MakeTimer(io);
  auto b = time.MakeTimer(io);
  auto c = time.MakeTimer(io);
  auto d = time.MakeTimer(io);
  a->ExpireAfter(Duration(10), [&] { fired.emplace_back("a"); });
  a->Cancel();
  b->ExpireAfter(Duration(10), [&] { fired.emplace_back("b first"); });
  b->ExpireAfter(Duration(50), [&] { fired.emplace_back("b again"); });
  c->ExpireAfter(Duration(10), [&] { fired.emplace_back("c"); });
  c.reset();
  d->ExpireAfter(Duration(10), [&] { fired.emplace_back("d"); });
  time.Advance(Duration(20));  // d's callback is posted...
  d->Cancel();                 // ...and cancelled before it ran
  io.run();
  io.restart();
  CHECK(fired.empty());
  time.AdvanceAndRun(Duration(30), io);
  CHECK(fired == std::vector<std::string>{"b again"});
}

TEST_CASE("a callback may re-arm its timer within one AdvanceAndRun", "[time]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  auto t = time.MakeTimer(io);
  int ticks = 0;
  std::function<void()> tick = [&] {
    ++ticks;
    t->ExpireAfter(Duration(10), tick);
  };
  t->ExpireAfter(Duration(10), tick);
  time.AdvanceAndRun(Duration(55), io);
  CHECK(ticks == 5);
  CHECK(t->Expiry() == time.SteadyNow() + 5ms);
}

TEST_CASE("real timers fire on the io_context and can be cancelled or re-armed", "[time]") {
  RealTimeSource time;
  boost::asio::io_context io;
  std::vector<std::string> fired;
  auto a = time.MakeTimer(io);
  auto b = time.MakeTimer(io);
  auto c = time.MakeTimer(io);
  const SteadyTime start = time.SteadyNow();
  a->ExpireAfter(Duration(1), [&] { fired.emplace_back("a"); });
  b->ExpireAfter(Duration(1), [&] { fired.emplace_back("b"); });
  b->Cancel();
  c->ExpireAfter(Duration(1), [&] { fired.emplace_back("c first"); });
  c->ExpireAfter(Duration(2), [&] { fired.emplace_back("c again"); });
  CHECK(a->Armed());
  CHECK_FALSE(b->Armed());
  io.run();
  CHECK(fired == std::vector<std::string>{"a", "c again"});
  CHECK(time.SteadyNow() - start >= 2ms);
  CHECK_FALSE(a->Armed());
  CHECK_FALSE(c->Armed());
}

}  // namespace
}  // namespace kiln
