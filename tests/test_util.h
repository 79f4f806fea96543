#pragma once

// Small helpers shared by tests: temporary directories and files.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace kiln::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string base = std::filesystem::temp_directory_path() / "kiln-test-XXXXXX";
    if (::mkdtemp(base.data()) == nullptr) std::abort();
    path_ = base;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void WriteFile(const std::filesystem::path& p, const std::string& content) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << content;
}

inline std::string ReadFile(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// The first port of a window of kPortWindowSize ports that no other test process on this machine
// uses while this one runs (tests run in parallel under ctest -j). The window is held by a lock
// file for the life of the process. Windows lie in 10000-29999, below Linux's ephemeral range
// (32768-60999): a connect to a not-yet-listening port inside that range can connect to itself.
inline constexpr int kPortWindowSize = 400;
inline int PortWindow() {
  static const int first = [] {
    for (int i = 0; i < 50; ++i) {
      std::string lock = "/tmp/kiln-test-ports-" + std::to_string(i) + ".lock";
      int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
      if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0) return 10000 + i * kPortWindowSize;
      if (fd >= 0) ::close(fd);
    }
    std::abort();  // fifty test processes at once: something is wrong
  }();
  return first;
}

// A loopback port nothing listens on now, outside every PortWindow: the kernel picks it from its
// ephemeral range. For addresses a test gives kilnd or a server it starts (expose.port, a
// scrape target).
inline int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  (void)::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  (void)::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

}  // namespace kiln::testing
