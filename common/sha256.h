#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "common/limits.h"
#include "common/status.h"

struct evp_md_ctx_st;

namespace kiln {

// Incremental SHA-256, for hashing while copying.
class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;

  void Update(const void* data, size_t size);
  // Lower-case hex digest of everything so far. REQUIRES: called once.
  std::string HexDigest();

 private:
  evp_md_ctx_st* ctx_;
};

// Lower-case hex SHA-256 of bytes (OpenSSL libcrypto).
std::string Sha256Hex(std::string_view data);

// Lower-case hex SHA-256 of a regular file's contents, read in chunks. A FIFO, a device or
// a file larger than `max_bytes` is refused, not read. Errors name the path.
StatusOr<std::string> Sha256File(const std::filesystem::path& path,
                                 uint64_t max_bytes = kMaxArtifactBytes);

// True for 64 lower- or upper-case hex digits.
bool IsSha256Hex(std::string_view s);

}  // namespace kiln
