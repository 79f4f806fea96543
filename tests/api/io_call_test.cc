// RunOnIo: the gRPC -> reconciler-thread hop gives up safely.

#include "api/io_call.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

namespace kiln {
namespace {

using namespace std::chrono_literals;

TEST_CASE("a call still queued at its deadline is cancelled and never runs", "[io_call]") {
  boost::asio::io_context io;  // not running: the reconciler's thread is busy
  auto runs = std::make_shared<std::atomic<int>>(0);
  {
    std::string request = "web";  // owned by the caller, gone when it returns
    StatusOr<int> r = RunOnIo<int>(
        io,
        [runs, request]() -> StatusOr<int> { return ++*runs + static_cast<int>(request.size()); },
        Duration(50), nullptr);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kUnavailable);
    CHECK(r.status().message() == "kilnd is busy; the call was not run, try again");
  }
  // The reconciler's thread gets to the queue later: the cancelled call does nothing.
  CHECK(io.run() == 1);
  CHECK(runs->load() == 0);
}

TEST_CASE("a mutating call retried after a timeout is applied once", "[io_call]") {
  boost::asio::io_context io;
  auto rollbacks = std::make_shared<std::atomic<int>>(0);
  auto rollback = [rollbacks]() -> StatusOr<int> { return ++*rollbacks; };
  StatusOr<int> first = RunOnIo<int>(io, rollback, Duration(20), nullptr);
  CHECK(first.status().code() == StatusCode::kUnavailable);
  // The client retries once the thread is free again.
  auto guard = boost::asio::make_work_guard(io);
  std::thread reconciler([&] { io.run(); });
  StatusOr<int> retried = RunOnIo<int>(io, rollback, Duration(30'000), nullptr);
  guard.reset();
  reconciler.join();
  REQUIRE(retried.ok());
  CHECK(*retried == 1);
  CHECK(rollbacks->load() == 1);
}

TEST_CASE("a call that has started is waited for past the deadline, and its result returned",
          "[io_call]") {
  boost::asio::io_context io;
  auto guard = boost::asio::make_work_guard(io);
  std::thread reconciler([&] { io.run(); });
  std::atomic<bool> started{false};
  // Started well within its 2 s in the queue, then runs longer than that.
  StatusOr<int> r = RunOnIo<int>(
      io,
      [&started]() -> StatusOr<int> {
        started = true;
        std::this_thread::sleep_for(2500ms);
        return 7;
      },
      Duration(2'000), nullptr);
  guard.reset();
  reconciler.join();
  REQUIRE(started);
  REQUIRE(r.ok());
  CHECK(*r == 7);
}

TEST_CASE("stopping cancels a queued call", "[io_call]") {
  boost::asio::io_context io;
  auto runs = std::make_shared<std::atomic<int>>(0);
  StatusOr<int> r = RunOnIo<int>(
      io, [runs]() -> StatusOr<int> { return ++*runs; }, Duration(30'000), [] { return true; });
  CHECK(r.status().message() == "kilnd is shutting down; the call was not run");
  io.run();
  CHECK(runs->load() == 0);
}

}  // namespace
}  // namespace kiln
