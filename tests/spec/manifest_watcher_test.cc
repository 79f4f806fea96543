#include "spec/manifest_watcher.h"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <cstdio>

#include "tests/fakes/simulated_time_source.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::SimulatedTimeSource;
using testing::TempDir;
using testing::WriteFile;

// inotify is real I/O; the debounce and retry timers run on simulated time.
struct WatchFixture {
  WatchFixture() {
    std::filesystem::create_directories(dir());
    watcher =
        std::make_unique<ManifestWatcher>(io, time, dir(), Duration(50), [this] { ++reloads; });
    watcher->Start();
    io.run_for(20ms);
  }
  std::filesystem::path dir() const { return tmp / "m"; }
  // Reads what inotify has (real time, 10 ms), then lets `step` of simulated time pass for the
  // debounce, until `n` reloads happened or `timeout` of real time passed.
  bool RunUntil(int n, std::chrono::milliseconds timeout = 3s, Duration step = Duration(50)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (reloads < n && std::chrono::steady_clock::now() < deadline) {
      io.run_for(10ms);
      time.AdvanceAndRun(step, io);
    }
    return reloads >= n;
  }

  TempDir tmp;
  SimulatedTimeSource time;
  boost::asio::io_context io;
  std::unique_ptr<ManifestWatcher> watcher;
  int reloads = 0;
};

TEST_CASE("create, modify, rename and delete each cause a reload", "[watcher]") {
  WatchFixture f;
  WriteFile(f.dir() / "a.yaml", "x");
  REQUIRE(f.RunUntil(1));
  WriteFile(f.tmp / "staged.yaml", "y");
  REQUIRE(std::rename((f.tmp / "staged.yaml").c_str(), (f.dir() / "b.yaml").c_str()) == 0);
  REQUIRE(f.RunUntil(2));
  std::filesystem::remove(f.dir() / "a.yaml");
  REQUIRE(f.RunUntil(3));
}

TEST_CASE("a complete file is read after 5 ms, a write in progress after the debounce",
          "[watcher]") {
  WatchFixture f;
  // Written and closed: complete.
  WriteFile(f.dir() / "a.yaml", "x");
  f.io.run_for(20ms);
  f.time.AdvanceAndRun(4ms, f.io);
  CHECK(f.reloads == 0);
  f.time.AdvanceAndRun(1ms, f.io);
  CHECK(f.reloads == 1);
  // Still open for writing: waits for 50 ms of quiet.
  FILE* open_file = std::fopen((f.dir() / "b.yaml").c_str(), "w");
  REQUIRE(open_file != nullptr);
  std::fputs("y", open_file);
  std::fflush(open_file);
  f.io.run_for(20ms);
  f.time.AdvanceAndRun(49ms, f.io);
  CHECK(f.reloads == 1);
  f.time.AdvanceAndRun(1ms, f.io);
  CHECK(f.reloads == 2);
  std::fclose(open_file);
}

TEST_CASE("a burst of changes is one reload", "[watcher]") {
  WatchFixture f;
  for (int i = 0; i < 20; ++i) WriteFile(f.dir() / ("f" + std::to_string(i) + ".yaml"), "x");
  REQUIRE(f.RunUntil(1));
  f.io.run_for(20ms);
  f.time.AdvanceAndRun(200ms, f.io);
  CHECK(f.reloads <= 2);
}

TEST_CASE("a directory removed and created again is watched again", "[watcher]") {
  WatchFixture f;
  std::filesystem::remove_all(f.dir());
  REQUIRE(f.RunUntil(1));
  std::filesystem::create_directories(f.dir());
  f.time.AdvanceAndRun(1500ms, f.io);  // the retry finds it again
  int before = f.reloads;
  WriteFile(f.dir() / "back.yaml", "x");
  CHECK(f.RunUntil(before + 1));
}

TEST_CASE("a missing directory is retried every second of simulated time", "[watcher]") {
  TempDir tmp;
  SimulatedTimeSource time;
  boost::asio::io_context io;
  int reloads = 0;
  ManifestWatcher watcher(io, time, tmp / "later", Duration(50), [&] { ++reloads; });
  watcher.Start();
  io.run_for(10ms);
  CHECK(time.ArmedTimers() == 1);  // the retry
  std::filesystem::create_directories(tmp / "later");
  time.AdvanceAndRun(999ms, io);
  CHECK(reloads == 0);
  time.AdvanceAndRun(1ms, io);  // retried: watched, and read in case files came with it
  time.AdvanceAndRun(50ms, io);
  CHECK(reloads == 1);
  CHECK(time.ArmedTimers() == 0);  // watching: no retry armed
  WriteFile(tmp / "later/a.yaml", "x");
  io.run_for(20ms);
  time.AdvanceAndRun(5ms, io);
  CHECK(reloads == 2);
}

}  // namespace
}  // namespace kiln
