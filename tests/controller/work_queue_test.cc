#include "controller/work_queue.h"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

namespace kiln {
namespace {

using namespace std::chrono_literals;

TEST_CASE("a name queued twice runs once", "[queue]") {
  boost::asio::io_context io;
  std::vector<std::string> ran;
  WorkQueue q(
      io, {},
      [&](const std::string& n) {
        ran.push_back(n);
        return Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  q.Add("web");
  q.Add("api");
  q.Add("web");
  CHECK(q.Depth() == 2);
  io.run_for(50ms);
  CHECK(ran == std::vector<std::string>{"web", "api"});
}

TEST_CASE("errors back off exponentially per service", "[queue]") {
  boost::asio::io_context io;
  int runs = 0;
  std::vector<std::chrono::steady_clock::time_point> at;
  WorkQueue::Options o;
  o.backoff_base = Duration(5);
  o.backoff_cap = Duration(40);
  WorkQueue q(
      io, o,
      [&](const std::string&) {
        at.push_back(std::chrono::steady_clock::now());
        return ++runs < 6 ? UnavailableError("store busy") : Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  CHECK(q.NextBackoffForTest("web") == Duration(5));
  q.Add("web");
  io.run_for(1s);
  CHECK(runs == 6);
  CHECK(q.Retries() == 5);
  // 5, 10, 20, 40, 40 ms apart (capped), at least.
  const int64_t expected[] = {5, 10, 20, 40, 40};
  for (int i = 0; i < 5; ++i) {
    auto gap = std::chrono::duration_cast<std::chrono::milliseconds>(at[i + 1] - at[i]).count();
    CHECK(gap >= expected[i]);
  }
  CHECK(q.NextBackoffForTest("web") == Duration(5));  // success forgets the failures
}

TEST_CASE("AddAfter fires once, and an earlier request wins", "[queue]") {
  boost::asio::io_context io;
  std::vector<std::string> ran;
  WorkQueue q(
      io, {},
      [&](const std::string& n) {
        ran.push_back(n);
        return Status::Ok();
      },
      [] { return std::vector<std::string>{}; });
  auto start = std::chrono::steady_clock::now();
  q.AddAfter("web", Duration(200));
  q.AddAfter("web", Duration(20));
  io.run_for(100ms);
  CHECK(ran == std::vector<std::string>{"web"});
  CHECK(std::chrono::steady_clock::now() - start >= 20ms);
}

TEST_CASE("resync enqueues every known name", "[queue]") {
  boost::asio::io_context io;
  std::vector<std::string> ran;
  WorkQueue::Options o;
  o.resync = Duration(30);
  WorkQueue q(
      io, o,
      [&](const std::string& n) {
        ran.push_back(n);
        return Status::Ok();
      },
      [] {
        return std::vector<std::string>{"a", "b"};
      });
  q.Start();
  io.run_for(80ms);
  CHECK(ran.size() >= 2);
  CHECK(ran[0] == "a");
  CHECK(ran[1] == "b");
}

}  // namespace
}  // namespace kiln
