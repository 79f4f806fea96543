#include "deploy/artifact_store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <thread>

#include "common/limits.h"
#include "common/sha256.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

size_t CountFiles(const std::filesystem::path& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
  return n;
}

TEST_CASE("put stores a read-only copy under its digest", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  REQUIRE(store.ok());
  WriteFile(tmp / "app", "bits v1");
  auto digest = store->Put(tmp / "app");
  REQUIRE(digest.ok());
  CHECK(*digest == Sha256Hex("bits v1"));
  CHECK(store->PathFor(*digest) == tmp / "artifacts/sha256" / *digest);
  CHECK(ReadFile(store->PathFor(*digest)) == "bits v1");
  struct stat st {};
  REQUIRE(::stat(store->PathFor(*digest).c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0555);
  CHECK(store->Verify(*digest).ok());
  CHECK(CountFiles(tmp / "artifacts/tmp") == 0);

  // The same bytes again: same digest, still one file.
  REQUIRE(store->Put(tmp / "app").ok());
  CHECK(CountFiles(tmp / "artifacts/sha256") == 1);
}

TEST_CASE("a pinned digest that does not match is refused and nothing is stored", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  WriteFile(tmp / "app", "bits v1");
  const std::string pin(64, 'a');
  auto r = store->Put(tmp / "app", pin);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kFailedPrecondition);
  CHECK(r.status().message() == "artifact " + (tmp / "app").string() + " has sha256 " +
                                    Sha256Hex("bits v1") + ", expected " + pin);
  CHECK(CountFiles(tmp / "artifacts/sha256") == 0);
  CHECK(CountFiles(tmp / "artifacts/tmp") == 0);
  CHECK(store->Put(tmp / "app", Sha256Hex("bits v1")).ok());
}

TEST_CASE("a full disk partway through a put stores nothing and leaves no partial file",
          "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  REQUIRE(store.ok());
  const std::string bits(size_t{300} * 1024, 'b');  // several chunks
  WriteFile(tmp / "app", bits);
  size_t room = size_t{100} * 1024;  // the disk fills after 100 KiB
  store->SetWriterForTest([&room](int fd, const void* data, size_t size) -> ssize_t {
    if (room == 0) {
      errno = ENOSPC;
      return -1;
    }
    ssize_t w = ::write(fd, data, std::min(size, room));
    if (w > 0) room -= static_cast<size_t>(w);
    return w;
  });
  auto digest = store->Put(tmp / "app");
  REQUIRE_FALSE(digest.ok());
  CHECK(room == 0);  // it failed partway, not before writing
  CHECK(digest.status().code() == StatusCode::kResourceExhausted);
  CHECK(digest.status().message().find("cannot store artifact " + (tmp / "app").string()) !=
        std::string::npos);
  CHECK(digest.status().message().find("No space left on device") != std::string::npos);
  CHECK(CountFiles(tmp / "artifacts/sha256") == 0);
  CHECK(CountFiles(tmp / "artifacts/tmp") == 0);
  // Space again: the same put succeeds.
  store->SetWriterForTest(nullptr);
  digest = store->Put(tmp / "app");
  REQUIRE(digest.ok());
  CHECK(ReadFile(store->PathFor(*digest)) == bits);
}

TEST_CASE("a missing source is an error naming it", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  auto r = store->Put(tmp / "nope");
  CHECK(r.status().code() == StatusCode::kNotFound);
  CHECK(r.status().message() ==
        "cannot read artifact " + (tmp / "nope").string() + ": No such file or directory");
}

TEST_CASE("tampering with a stored artifact is detected", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  WriteFile(tmp / "app", "bits v1");
  std::string d = *store->Put(tmp / "app");
  ::chmod(store->PathFor(d).c_str(), 0755);
  WriteFile(store->PathFor(d), "evil bits");
  Status v = store->Verify(d);
  CHECK(v.code() == StatusCode::kDataLoss);
  CHECK(v.message() == "artifact " + store->PathFor(d).string() +
                           " no longer matches its digest: it hashes to " + Sha256Hex("evil bits"));
  std::filesystem::remove(store->PathFor(d));
  CHECK(store->Verify(d).code() == StatusCode::kNotFound);
}

TEST_CASE("concurrent puts of the same content are safe", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  std::string big(4 << 20, 'x');
  WriteFile(tmp / "app", big);
  std::vector<std::thread> threads;
  threads.reserve(8);
  std::vector<StatusOr<std::string>> results(8, InternalError("not run"));
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] { results[i] = store->Put(tmp / "app"); });
  }
  for (auto& t : threads) t.join();
  for (auto& r : results) {
    REQUIRE(r.ok());
    CHECK(*r == Sha256Hex(big));
  }
  CHECK(CountFiles(tmp / "artifacts/sha256") == 1);
  CHECK(CountFiles(tmp / "artifacts/tmp") == 0);
  CHECK(store->Verify(Sha256Hex(big)).ok());
}

TEST_CASE("collect removes artifacts no retained revision references", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  std::vector<std::string> digests;
  for (int i = 0; i < 3; ++i) {
    WriteFile(tmp / "app", "v" + std::to_string(i));
    digests.push_back(*store->Put(tmp / "app"));
  }
  auto removed = store->Collect({digests[1]});
  REQUIRE(removed.ok());
  CHECK(*removed == 2);
  CHECK_FALSE(store->Has(digests[0]));
  CHECK(store->Has(digests[1]));
  CHECK_FALSE(store->Has(digests[2]));
}

TEST_CASE("put and verify read only regular files, up to the size limit", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts", /*max_bytes=*/1024);
  REQUIRE(store.ok());
  REQUIRE(::mkfifo((tmp / "pipe").c_str(), 0600) == 0);

  // A FIFO with no writer would block a plain open() and read() forever.
  auto fifo = store->Put(tmp / "pipe");
  REQUIRE_FALSE(fifo.ok());
  CHECK(fifo.status().message() ==
        "cannot read artifact " + (tmp / "pipe").string() + ": not a regular file (a FIFO)");
  auto zero = store->Put("/dev/zero");
  REQUIRE_FALSE(zero.ok());
  CHECK(zero.status().message() ==
        "cannot read artifact /dev/zero: not a regular file (a character device)");

  WriteFile(tmp / "big", std::string(1025, 'x'));
  auto big = store->Put(tmp / "big");
  REQUIRE_FALSE(big.ok());
  CHECK(big.status().message() ==
        "cannot read artifact " + (tmp / "big").string() + ": larger than the limit of 1024 bytes");
  WriteFile(tmp / "fits", std::string(1024, 'x'));
  CHECK(store->Put(tmp / "fits").ok());
  CHECK(CountFiles(tmp / "artifacts/sha256") == 1);
  CHECK(CountFiles(tmp / "artifacts/tmp") == 0);

  // Something other than the stored file in its place is refused unread.
  const std::string digest = Sha256Hex("abc");
  REQUIRE(::mkfifo(store->PathFor(digest).c_str(), 0600) == 0);
  Status v = store->Verify(digest);
  CHECK(v.code() == StatusCode::kFailedPrecondition);
  CHECK(v.message().find("not a regular file (a FIFO)") != std::string::npos);
}

TEST_CASE("the default artifact limit is 1 GiB", "[artifacts]") {
  TempDir tmp;
  auto store = ArtifactStore::Open(tmp / "artifacts");
  REQUIRE(store.ok());
  // Sparse: one byte over the limit without writing a gigabyte.
  {
    WriteFile(tmp / "huge", "");
    std::filesystem::resize_file(tmp / "huge", kMaxArtifactBytes + 1);
  }
  auto r = store->Put(tmp / "huge");
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().message() == "cannot read artifact " + (tmp / "huge").string() +
                                    ": larger than the limit of 1073741824 bytes");
  auto h = Sha256File(tmp / "huge");
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().message().find("larger than the limit of 1073741824 bytes") !=
        std::string::npos);
}

}  // namespace
}  // namespace kiln
