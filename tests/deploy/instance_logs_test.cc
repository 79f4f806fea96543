#include "deploy/instance_logs.h"

#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>

#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::TempDir;

// Appends like an instance does: its own O_APPEND descriptor, one write per line.
class Writer {
 public:
  explicit Writer(const std::filesystem::path& log)
      : fd_(::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) {}
  ~Writer() { ::close(fd_); }
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  void Line(int n) {
    const std::string line = "line " + std::to_string(n) + "\n";
    REQUIRE(::write(fd_, line.data(), line.size()) == static_cast<ssize_t>(line.size()));
  }
  void Raw(const std::string& s) {
    REQUIRE(::write(fd_, s.data(), s.size()) == static_cast<ssize_t>(s.size()));
  }

 private:
  int fd_;
};

std::vector<std::string> ReadAll(LogReader& r, bool flush = false) {
  std::vector<std::string> out;
  for (;;) {
    std::vector<std::string> got = r.Read(1024, flush);
    if (got.empty()) return out;
    out.insert(out.end(), got.begin(), got.end());
  }
}

std::vector<std::string> Numbered(int from, int to) {
  std::vector<std::string> out;
  for (int i = from; i <= to; ++i) out.push_back("line " + std::to_string(i));
  return out;
}

TEST_CASE("a log reader follows its file across copy-truncate rotations without loss", "[logs]") {
  TempDir tmp;
  const auto log = InstanceLogPath(tmp.path(), "web-1");
  Writer w(log);
  for (int i = 1; i <= 10; ++i) w.Line(i);
  LogReader r(tmp.path(), "web-1");
  REQUIRE(r.Seek(0, 0).ok());
  CHECK(ReadAll(r) == Numbered(1, 10));
  for (int i = 11; i <= 20; ++i) w.Line(i);
  // Lines 11-20 unread when the file is rotated: the reader finds them in the copy.
  REQUIRE(*RotateLogIfLarger(log, 10, 3));
  CHECK(std::filesystem::file_size(log) == 0);
  for (int i = 21; i <= 25; ++i) w.Line(i);  // lands at offset 0 of the truncated file
  CHECK(ReadAll(r) == Numbered(11, 25));
  // Twice more, the second before the reader looks again: the oldest copy beyond max_files goes,
  // and the reader still reads each line once.
  REQUIRE(*RotateLogIfLarger(log, 10, 3));
  for (int i = 26; i <= 30; ++i) w.Line(i);
  REQUIRE(*RotateLogIfLarger(log, 10, 3));
  CHECK(ReadAll(r) == Numbered(26, 30));
  CHECK(std::filesystem::exists(RotatedLogPath(tmp.path(), "web-1", 2)));
  CHECK_FALSE(std::filesystem::exists(RotatedLogPath(tmp.path(), "web-1", 3)));
  // Not larger than the cap: left alone.
  CHECK_FALSE(*RotateLogIfLarger(log, 1 << 20, 3));

  // A new reader reads the copies, oldest first, then the live file; --tail counts back across
  // them.
  for (int i = 31; i <= 32; ++i) w.Line(i);
  LogReader all(tmp.path(), "web-1");
  REQUIRE(all.Seek(0, 0).ok());
  CHECK(ReadAll(all) == Numbered(21, 32));  // 11-20 were in the copy dropped
  LogReader tail(tmp.path(), "web-1");
  REQUIRE(tail.Seek(4, 0).ok());
  CHECK(ReadAll(tail) == Numbered(29, 32));
  LogReader more(tmp.path(), "web-1");
  REQUIRE(more.Seek(100, 0).ok());
  CHECK(ReadAll(more) == Numbered(21, 32));

  REQUIRE(RemoveInstanceLogs(tmp.path(), "web-1").ok());
  CHECK_FALSE(std::filesystem::exists(log));
  CHECK_FALSE(std::filesystem::exists(RotatedLogPath(tmp.path(), "web-1", 1)));
  CHECK_FALSE(std::filesystem::exists(RotatedLogPath(tmp.path(), "web-1", 2)));
}

TEST_CASE("a log reader holds a partial line until its newline or a flush", "[logs]") {
  TempDir tmp;
  Writer w(InstanceLogPath(tmp.path(), "web-2"));
  LogReader r(tmp.path(), "web-2");
  REQUIRE(r.Seek(3, 0).ok());  // no file yet
  CHECK(ReadAll(r).empty());
  w.Raw("one\ntw");
  CHECK(ReadAll(r) == std::vector<std::string>{"one"});
  w.Raw("o\nthr");
  CHECK(ReadAll(r) == std::vector<std::string>{"two"});
  CHECK(ReadAll(r, /*flush=*/true) == std::vector<std::string>{"thr"});
  // A line longer than the limit comes in pieces.
  w.Raw(std::string(LogReader::kMaxLineBytes + 5, 'x') + "\n");
  std::vector<std::string> long_line = ReadAll(r);
  REQUIRE(long_line.size() == 2);
  CHECK(long_line[0].size() == LogReader::kMaxLineBytes);
  CHECK(long_line[1] == "xxxxx");
}

TEST_CASE("with max_files 1 a log is truncated and no copy is kept", "[logs]") {
  TempDir tmp;
  const auto log = InstanceLogPath(tmp.path(), "web-3");
  Writer w(log);
  for (int i = 1; i <= 100; ++i) w.Line(i);
  REQUIRE(*RotateLogIfLarger(log, 100, 1));
  CHECK(std::filesystem::file_size(log) == 0);
  CHECK_FALSE(std::filesystem::exists(RotatedLogPath(tmp.path(), "web-3", 1)));
  w.Line(101);
  CHECK(std::filesystem::file_size(log) == 9);  // O_APPEND: at the new end, no hole
}

}  // namespace
}  // namespace kiln
