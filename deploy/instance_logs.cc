#include "deploy/instance_logs.h"

#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <shared_mutex>

#include "common/logging.h"

namespace kiln {
namespace fs = std::filesystem;
namespace {

// Rotation (copy, shift, truncate) is one step for every reader in this process: a reader holds
// it shared while it reads, the rotator exclusively while it rotates, so a reader never sees the
// live file truncated without its copy in place.
std::shared_mutex& RotationMutex() {
  static std::shared_mutex mu;
  return mu;
}

constexpr size_t kBlock = size_t{64} * 1024;

UniqueFd OpenForRead(const fs::path& p) {
  return UniqueFd(::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
}

// The n-th rotated copy of a log file by its path.
fs::path CopyPath(const fs::path& log, int n) { return log.string() + "." + std::to_string(n); }

}  // namespace

fs::path InstanceLogPath(const fs::path& log_dir, std::string_view instance) {
  return log_dir / (std::string(instance) + ".log");
}

fs::path RotatedLogPath(const fs::path& log_dir, std::string_view instance, int n) {
  return CopyPath(InstanceLogPath(log_dir, instance), n);
}

Status RemoveInstanceLogs(const fs::path& log_dir, std::string_view instance) {
  std::unique_lock lock(RotationMutex());
  const fs::path log = InstanceLogPath(log_dir, instance);
  std::error_code ec;
  fs::remove(log.string() + ".1.tmp", ec);
  for (int n = 1;; ++n) {
    if (!fs::remove(CopyPath(log, n), ec)) break;
  }
  if (ec) return ErrnoError(ec.value(), "cannot remove the rotated logs of " + log.string());
  fs::remove(log, ec);
  if (ec) return ErrnoError(ec.value(), "cannot remove " + log.string());
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// LogReader

LogReader::LogReader(fs::path log_dir, std::string instance)
    : log_dir_(std::move(log_dir)), instance_(std::move(instance)) {}

Status LogReader::Seek(int64_t tail, int64_t since_unix_ms) {
  std::shared_lock lock(RotationMutex());
  backlog_.clear();
  live_ = {};
  partial_.clear();
  rotated_ino_ = 0;
  // The rotated copies, newest first, as long as they follow each other.
  std::vector<Segment> copies;
  for (int n = 1;; ++n) {
    UniqueFd fd = OpenForRead(RotatedLogPath(log_dir_, instance_, n));
    if (!fd) break;
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) break;
    if (n == 1) rotated_ino_ = st.st_ino;
    const int64_t mtime_ms = st.st_mtim.tv_sec * 1000LL + st.st_mtim.tv_nsec / 1'000'000;
    if (since_unix_ms > 0 && mtime_ms < since_unix_ms) break;  // this one and older: too old
    copies.push_back({std::move(fd), 0});
  }
  for (auto it = copies.rbegin(); it != copies.rend(); ++it) backlog_.push_back(std::move(*it));
  live_.fd = OpenForRead(InstanceLogPath(log_dir_, instance_));
  if (tail <= 0) return Status::Ok();

  // The start of the last `tail` lines: scanning back from the end of the live file through the
  // copies, past `tail` newlines (a newline ending the very last line does not count).
  std::vector<Segment*> order;
  for (Segment& s : backlog_) order.push_back(&s);
  if (live_.fd) order.push_back(&live_);
  int64_t newlines = 0;
  bool last_byte = true;
  char buf[kBlock];
  for (size_t k = order.size(); k-- > 0;) {
    struct stat st {};
    if (::fstat(order[k]->fd.get(), &st) != 0) return ErrnoError(errno, "cannot read the log");
    uint64_t end = static_cast<uint64_t>(st.st_size);
    while (end > 0) {
      const uint64_t begin = end > kBlock ? end - kBlock : 0;
      const ssize_t n = ::pread(order[k]->fd.get(), buf, end - begin, static_cast<off_t>(begin));
      if (n <= 0) break;
      for (ssize_t i = n; i-- > 0;) {
        const bool newline = buf[i] == '\n';
        if (last_byte) {
          last_byte = false;
          if (newline) continue;
        }
        if (newline && ++newlines == tail) {
          // Found: the lines start after this newline, in this segment.
          order[k]->offset = begin + static_cast<uint64_t>(i) + 1;
          const size_t drop = std::min(k, backlog_.size());
          for (size_t d = 0; d < drop; ++d) backlog_.pop_front();
          return Status::Ok();
        }
      }
      end = begin;
    }
  }
  return Status::Ok();  // fewer lines than `tail`: all of them
}

void LogReader::TakeLines(const char* data, size_t n, std::vector<std::string>& lines) {
  size_t start = 0;
  for (size_t i = 0; i < n; ++i) {
    if (data[i] != '\n') continue;
    partial_.append(data + start, i - start);
    while (partial_.size() > kMaxLineBytes) {
      lines.push_back(partial_.substr(0, kMaxLineBytes));
      partial_.erase(0, kMaxLineBytes);
    }
    lines.push_back(std::move(partial_));
    partial_.clear();
    start = i + 1;
  }
  partial_.append(data + start, n - start);
  while (partial_.size() > kMaxLineBytes) {
    lines.push_back(partial_.substr(0, kMaxLineBytes));
    partial_.erase(0, kMaxLineBytes);
  }
}

void LogReader::NoticeRotation() {
  struct stat st {};
  if (::stat(RotatedLogPath(log_dir_, instance_, 1).c_str(), &st) != 0) {
    rotated_ino_ = 0;
    return;
  }
  if (st.st_ino == rotated_ino_) return;
  // Rotations since the last look: the copies newer than the one seen then (newest first). The
  // oldest of them is the live file as this reader was reading it, so what it had not read yet
  // is in it, after the same offset; the newer ones are wholly unread; the live file starts
  // again at 0. (Should the copy seen then be gone too, the oldest copy left stands for it.)
  std::vector<UniqueFd> fresh;
  for (int n = 1;; ++n) {
    UniqueFd fd = OpenForRead(RotatedLogPath(log_dir_, instance_, n));
    if (!fd) break;
    struct stat copy {};
    if (::fstat(fd.get(), &copy) != 0 || (rotated_ino_ != 0 && copy.st_ino == rotated_ino_)) break;
    if (n == 1) st = copy;
    fresh.push_back(std::move(fd));
  }
  rotated_ino_ = st.st_ino;
  if (fresh.empty()) return;
  backlog_.push_back({std::move(fresh.back()), live_.fd ? live_.offset : 0});
  for (size_t i = fresh.size() - 1; i-- > 0;) backlog_.push_back({std::move(fresh[i]), 0});
  live_.offset = 0;
}

std::vector<std::string> LogReader::Read(size_t max_bytes, bool flush) {
  std::shared_lock lock(RotationMutex());
  std::vector<std::string> lines;
  // More than a line's worth, so that a call that reads a full budget always has a line to give.
  size_t budget = std::max(max_bytes, kMaxLineBytes + 1);
  char buf[kBlock];
  // Reads `s` from its offset; true at its end.
  auto drain = [&](Segment& s) {
    while (budget > 0) {
      const ssize_t n =
          ::pread(s.fd.get(), buf, std::min(budget, sizeof buf), static_cast<off_t>(s.offset));
      if (n <= 0) return true;
      s.offset += static_cast<uint64_t>(n);
      budget -= std::min(budget, static_cast<size_t>(n));
      TakeLines(buf, static_cast<size_t>(n), lines);
    }
    return false;
  };
  bool at_end = false;
  while (!backlog_.empty() && drain(backlog_.front())) backlog_.pop_front();
  if (backlog_.empty()) {
    NoticeRotation();
    while (!backlog_.empty() && drain(backlog_.front())) backlog_.pop_front();
  }
  if (backlog_.empty()) {
    if (!live_.fd) live_.fd = OpenForRead(InstanceLogPath(log_dir_, instance_));
    if (live_.fd) {
      struct stat st {};
      // Truncated by something else than the rotator (which leaves a copy): start again at 0.
      if (::fstat(live_.fd.get(), &st) == 0 && static_cast<uint64_t>(st.st_size) < live_.offset)
        live_.offset = 0;
      at_end = drain(live_);
    } else {
      at_end = true;
    }
  }
  if (flush && at_end && !partial_.empty()) {
    lines.push_back(std::move(partial_));
    partial_.clear();
  }
  return lines;
}

// ---------------------------------------------------------------------------------------------
// Rotation

StatusOr<bool> RotateLogIfLarger(const fs::path& log, uint64_t max_bytes, int max_files) {
  struct stat st {};
  if (::lstat(log.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (static_cast<uint64_t>(st.st_size) <= max_bytes) return false;
  std::unique_lock lock(RotationMutex());
  if (max_files > 1) {
    UniqueFd in = OpenForRead(log);
    if (!in) return ErrnoError(errno, "cannot open " + log.string() + " to rotate it");
    const std::string tmp = log.string() + ".1.tmp";
    UniqueFd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (!out) return ErrnoError(errno, "cannot create " + tmp);
    for (;;) {
      const ssize_t n = ::sendfile(out.get(), in.get(), nullptr, 1 << 20);
      if (n == 0) break;
      if (n < 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        return ErrnoError(err, "cannot copy " + log.string() + " to " + tmp);
      }
    }
    // Older copies move up one; the one past max_files - 1 (and any left from a larger
    // --log-max-files) goes.
    std::error_code ec;
    for (int n = max_files - 1; fs::exists(CopyPath(log, n), ec); ++n)
      fs::remove(CopyPath(log, n), ec);
    for (int n = max_files - 2; n >= 1; --n) {
      if (::rename(CopyPath(log, n).c_str(), CopyPath(log, n + 1).c_str()) != 0 && errno != ENOENT)
        return ErrnoError(errno, "cannot rotate " + CopyPath(log, n).string());
    }
    if (::rename(tmp.c_str(), CopyPath(log, 1).c_str()) != 0)
      return ErrnoError(errno, "cannot rename " + tmp);
  }
  // The instance appends (O_APPEND): its next write goes to the new end, offset 0.
  if (::truncate(log.c_str(), 0) != 0) return ErrnoError(errno, "cannot truncate " + log.string());
  return true;
}

LogRotator::LogRotator(Options options)
    : options_(std::move(options)), thread_([this] { Run(); }) {}

LogRotator::~LogRotator() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

int LogRotator::RotateOnce() {
  int rotated = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(options_.log_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() <= 4 || name.compare(name.size() - 4, 4, ".log") != 0) continue;
    StatusOr<bool> r = RotateLogIfLarger(e.path(), options_.max_bytes, options_.max_files);
    if (!r.ok()) {
      LogWarn("cannot rotate a log",
              {{"file", e.path().string()}, {"error", r.status().message()}});
    } else if (*r) {
      ++rotated;
      LogDebug("log rotated", {{"file", e.path().string()}});
    }
  }
  return rotated;
}

void LogRotator::Run() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    lock.unlock();
    RotateOnce();
    lock.lock();
    cv_.wait_for(lock, options_.interval, [this] { return stopping_; });
  }
}

}  // namespace kiln
