#pragma once

// Instances' log files: STATE/logs/<instance>.log, which the instance's stdout and stderr are
// appended to (O_APPEND, opened before exec: kilnd is never in the write path, so an instance
// keeps logging while kilnd is down), and its rotated copies <instance>.log.1 (the newest) to
// <instance>.log.<max_files - 1>. Reading them as lines, following them as they grow, rotating
// them by size, and removing them with the instance's row.

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace kiln {

std::filesystem::path InstanceLogPath(const std::filesystem::path& log_dir,
                                      std::string_view instance);
// The n-th rotated copy (1: the newest).
std::filesystem::path RotatedLogPath(const std::filesystem::path& log_dir,
                                     std::string_view instance, int n);

// Removes an instance's log and every rotated copy of it; files already gone are fine.
Status RemoveInstanceLogs(const std::filesystem::path& log_dir, std::string_view instance);

// One instance's log as lines, across its rotated copies, followed as it grows and as it is
// rotated. Lines longer than kMaxLineBytes are cut into pieces of that size.
// Not thread-safe: one reader per stream.
class LogReader {
 public:
  static constexpr size_t kMaxLineBytes = size_t{16} * 1024;

  LogReader(std::filesystem::path log_dir, std::string instance);

  // Positions the reader at the start of the last `tail` lines kept (0: every line kept, from
  // the oldest rotated copy). Rotated copies last written before `since_unix_ms` are skipped
  // (0: none): a line has no time of its own, the file it is in has.
  Status Seek(int64_t tail, int64_t since_unix_ms);

  // The complete lines written since the last call, at most about `max_bytes` of them (call
  // again while it returns lines). With `flush`, also a last line without its newline (the
  // instance is over: nothing will complete it).
  std::vector<std::string> Read(size_t max_bytes, bool flush);

 private:
  struct Segment {
    UniqueFd fd;
    uint64_t offset = 0;
  };
  // Rotated copies opened when the reader was positioned or when it saw a rotation: each is
  // read to its end, oldest first, before the live file. Held open, so a later rotation
  // renaming them does not lose them.
  std::deque<Segment> backlog_;
  Segment live_;           // the live file; not open until it exists
  ino_t rotated_ino_ = 0;  // of <instance>.log.1 when last looked at (0: none)
  std::string partial_;    // the start of a line whose newline has not come yet

  void NoticeRotation();
  void TakeLines(const char* data, size_t n, std::vector<std::string>& lines);

  std::filesystem::path log_dir_;
  std::string instance_;
};

// Caps every instance log in a directory: a file larger than `max_bytes` is copied to
// <name>.1 (older copies shift to .2, ... and the one beyond `max_files - 1` is dropped) and
// then truncated to zero, every `interval`, on a thread of its own.
//
// Copy-truncate, because the instance holds its log open with O_APPEND and kilnd is not in the
// write path (an instance must keep logging while kilnd is down, and kilnd must never block an
// instance on a write): the instance's next write after the truncation lands at the new end of
// file, offset 0. What it can lose: the bytes the instance writes between the end of the copy and
// the truncation (microseconds, one write or so), and, with `max_files` 1, the whole file. A log
// may also exceed `max_bytes` by what is written within one interval, and keeps growing while
// kilnd is down (it is capped at the next check). Both are the price of never making an instance
// wait for kilnd; the alternative, a pipe through kilnd, would stop or block the instance's
// output whenever kilnd is down.
class LogRotator {
 public:
  struct Options {
    std::filesystem::path log_dir;
    uint64_t max_bytes = 10 << 20;
    int max_files = 3;  // the live file and up to max_files - 1 rotated copies
    std::chrono::milliseconds interval{1000};
  };
  explicit LogRotator(Options options);
  ~LogRotator();  // stops the thread
  LogRotator(const LogRotator&) = delete;
  LogRotator& operator=(const LogRotator&) = delete;

  // One pass over the directory, on the caller's thread. Returns how many files it rotated.
  int RotateOnce();

 private:
  void Run();

  Options options_;
  std::mutex mu_;  // guards stopping_
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

// Rotates one log file as LogRotator does, if it is larger than `max_bytes`. True when it did.
StatusOr<bool> RotateLogIfLarger(const std::filesystem::path& log, uint64_t max_bytes,
                                 int max_files);

}  // namespace kiln
