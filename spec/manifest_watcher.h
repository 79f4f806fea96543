#pragma once

// Watches the manifest directory with inotify on Asio and calls back, debounced, once a burst of
// changes has settled: create, modify, delete, rename (editors' save-by-rename, `git checkout`).
// A burst that ends with a complete file (closed after writing, renamed in, removed) is read
// after 5 ms of quiet; one that ends mid-write waits for `debounce` of quiet.
// A directory that is missing or replaced is watched again once it is back.

#include <filesystem>
#include <functional>
#include <memory>

#include "common/clock.h"
#include "common/time_source.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class ManifestWatcher {
 public:
  // The debounce and retry timers come from `time` (which must outlive the watcher); inotify
  // reads are real I/O on `io`.
  ManifestWatcher(boost::asio::io_context& io, TimeSource& time, std::filesystem::path dir,
                  Duration debounce, std::function<void()> on_change);
  ~ManifestWatcher();

  // Starts watching. Without inotify (or the directory), retries every second.
  void Start();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln
