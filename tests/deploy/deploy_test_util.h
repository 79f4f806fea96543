#pragma once

// Shared set-up for tests of deploy/: an io_context to run, the artifact store, and the path
// of kiln-testsvc.

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <functional>
#include <thread>

#include "deploy/artifact_store.h"
#include "tests/test_util.h"

namespace kiln::testing {

inline std::string TestServicePath() { return std::string(KILN_BIN_DIR) + "/kiln-testsvc"; }

// Runs the io_context until `done()` or the timeout; returns done().
inline bool RunUntil(boost::asio::io_context& io, const std::function<bool()>& done,
                     std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    io.restart();
    if (io.run_for(std::chrono::milliseconds(5)) == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  return done();
}

}  // namespace kiln::testing
