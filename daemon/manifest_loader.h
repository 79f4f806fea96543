#pragma once

// Manifest loads off the event thread: reading files and hashing artifacts (seconds for a large
// artifact) never holds up the reconciler.

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "common/status.h"
#include "spec/manifest.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

class ArtifactStore;

// Hashes artifacts once per (path, size, mtime, inode): manifest reloads do not re-read
// unchanged binaries. One entry per path, so the cache stays as large as the manifests' paths.
// Hashing is copying into the content-addressed store (ArtifactStore::Put hashes while it
// copies): the reconciler's later Put of the same digest then finds it stored and reads
// nothing, so no artifact is ever read on the event thread in the common case.
// Used by the manifest loader's thread only.
class CachingHasher {
 public:
  explicit CachingHasher(ArtifactStore& store) : store_(store) {}

  StatusOr<std::string> operator()(const std::filesystem::path& p);

 private:
  ArtifactStore& store_;
  using Stamp = std::tuple<off_t, int64_t, ino_t>;
  std::map<std::string, std::pair<Stamp, std::string>> cache_;
};

// Runs manifest loads (reading files, hashing artifacts: seconds for a large artifact) on a
// thread of its own, never on the event thread, and hands each result to `apply` on the event
// thread. One load at a time; requests that arrive during a load are folded into one more load
// after it, so the last change is always read.
class BackgroundLoader {
 public:
  BackgroundLoader(boost::asio::io_context& io, std::function<ManifestSet()> load,
                   std::function<void(ManifestSet)> apply);
  ~BackgroundLoader();
  BackgroundLoader(const BackgroundLoader&) = delete;
  BackgroundLoader& operator=(const BackgroundLoader&) = delete;

  // Any thread.
  void Request();

 private:
  void Run();

  boost::asio::io_context& io_;
  std::function<ManifestSet()> load_;
  std::function<void(ManifestSet)> apply_;
  std::mutex mu_;  // guards pending_ and stopping_
  std::condition_variable cv_;
  bool pending_ = false;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once everything above is initialised
};

// Logs what a manifest load found: each service with its template hash. A load that finds what
// the last one found (a missing directory is read again every second) logs nothing.
void LogManifestSet(const ManifestSet& set, std::string& last_logged);

}  // namespace kiln
