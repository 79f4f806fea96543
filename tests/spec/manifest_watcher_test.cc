#include "spec/manifest_watcher.h"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <cstdio>

#include "tests/test_util.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;
using testing::TempDir;
using testing::WriteFile;

struct WatchFixture {
  WatchFixture() {
    std::filesystem::create_directories(dir());
    watcher = std::make_unique<ManifestWatcher>(io, dir(), Duration(50), [this] { ++reloads; });
    watcher->Start();
    io.run_for(20ms);
  }
  std::filesystem::path dir() const { return tmp / "m"; }
  // Runs the loop until `n` reloads happened or the timeout passed.
  bool RunUntil(int n, std::chrono::milliseconds timeout = 3s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (reloads < n && std::chrono::steady_clock::now() < deadline) io.run_for(10ms);
    return reloads >= n;
  }

  TempDir tmp;
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

TEST_CASE("a burst of changes is one reload", "[watcher]") {
  WatchFixture f;
  for (int i = 0; i < 20; ++i) WriteFile(f.dir() / ("f" + std::to_string(i) + ".yaml"), "x");
  REQUIRE(f.RunUntil(1));
  f.io.run_for(200ms);
  CHECK(f.reloads <= 2);
}

TEST_CASE("a directory removed and created again is watched again", "[watcher]") {
  WatchFixture f;
  std::filesystem::remove_all(f.dir());
  REQUIRE(f.RunUntil(1));
  std::filesystem::create_directories(f.dir());
  f.io.run_for(1500ms);  // the retry finds it again
  int before = f.reloads;
  WriteFile(f.dir() / "back.yaml", "x");
  CHECK(f.RunUntil(before + 1));
}

}  // namespace
}  // namespace kiln
