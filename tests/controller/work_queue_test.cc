#include "controller/work_queue.h"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

#include "tests/fakes/simulated_time_source.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::SimulatedTimeSource;

TEST_CASE("a name queued twice runs once", "[queue]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  std::vector<std::string> ran;
  WorkQueue q(
      io, time, {},
      [&](const std::string& n) {
        ran.push_back(n);
        return Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  q.Add("web");
  q.Add("api");
  q.Add("web");
  CHECK(q.Depth() == 2);
  io.run();
  CHECK(ran == std::vector<std::string>{"web", "api"});
}

TEST_CASE("errors back off exponentially per service", "[queue]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  int runs = 0;
  std::vector<SteadyTime> at;
  WorkQueue::Options o;
  o.backoff_base = Duration(5);
  o.backoff_cap = Duration(40);
  WorkQueue q(
      io, time, o,
      [&](const std::string&) {
        at.push_back(time.SteadyNow());
        return ++runs < 6 ? UnavailableError("store busy") : Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  CHECK(q.NextBackoffForTest("web") == Duration(5));
  q.Add("web");
  time.AdvanceAndRun(1s, io);
  CHECK(runs == 6);
  CHECK(q.Retries() == 5);
  // 5, 10, 20, 40, 40 ms apart (capped).
  const int64_t expected[] = {5, 10, 20, 40, 40};
  for (int i = 0; i < 5; ++i) {
    auto gap = std::chrono::duration_cast<std::chrono::milliseconds>(at[i + 1] - at[i]).count();
    CHECK(gap >= expected[i]);
    CHECK(gap == expected[i]);  // simulated time: exactly
  }
  CHECK(q.NextBackoffForTest("web") == Duration(5));  // success forgets the failures
}

TEST_CASE("AddAfter fires once, and an earlier request wins", "[queue]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  std::vector<std::string> ran;
  std::vector<SteadyTime> at;
  WorkQueue q(
      io, time, {},
      [&](const std::string& n) {
        ran.push_back(n);
        at.push_back(time.SteadyNow());
        return Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  auto start = time.SteadyNow();
  q.AddAfter("web", Duration(200));
  q.AddAfter("web", Duration(20));
  time.AdvanceAndRun(19ms, io);
  CHECK(ran.empty());  // not before its time
  time.AdvanceAndRun(81ms, io);
  CHECK(ran == std::vector<std::string>{"web"});
  REQUIRE(at.size() == 1);
  CHECK(at[0] - start >= 20ms);
  CHECK(at[0] - start == 20ms);
  time.AdvanceAndRun(1s, io);  // the later request was replaced, not kept
  CHECK(ran == std::vector<std::string>{"web"});
}

TEST_CASE("resync enqueues every known name", "[queue]") {
  SimulatedTimeSource time;
  boost::asio::io_context io;
  std::vector<std::string> ran;
  WorkQueue::Options o;
  o.resync = Duration(30);
  WorkQueue q(
      io, time, o,
      [&](const std::string& n) {
        ran.push_back(n);
        return Status::Ok();
      },
      [] {
        return std::vector<std::string>{"a", "b"};
      });
  q.Start();
  time.AdvanceAndRun(29ms, io);
  CHECK(ran.empty());
  time.AdvanceAndRun(51ms, io);  // at 30 and 60 ms
  CHECK(ran.size() >= 2);
  CHECK(ran[0] == "a");
  CHECK(ran[1] == "b");
  CHECK(ran == std::vector<std::string>{"a", "b", "a", "b"});
}

}  // namespace
}  // namespace kiln
