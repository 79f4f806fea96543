#include "common/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstring>

#include "common/regular_file.h"

namespace kiln {

Sha256Hasher::Sha256Hasher() : ctx_(EVP_MD_CTX_new()) {
  if (ctx_ == nullptr || EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) != 1) {
    std::abort();  // allocation failure inside libcrypto: nothing sensible to do
  }
}

Sha256Hasher::~Sha256Hasher() { EVP_MD_CTX_free(ctx_); }

void Sha256Hasher::Update(const void* data, size_t size) { EVP_DigestUpdate(ctx_, data, size); }

std::string Sha256Hasher::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx_, digest, &len);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(size_t{len} * 2);
  for (unsigned i = 0; i < len; ++i) {
    out.push_back(kHex[digest[i] >> 4]);
    out.push_back(kHex[digest[i] & 0xf]);
  }
  return out;
}

std::string Sha256Hex(std::string_view data) {
  Sha256Hasher h;
  h.Update(data.data(), data.size());
  return h.HexDigest();
}

StatusOr<std::string> Sha256File(const std::filesystem::path& path, uint64_t max_bytes) {
  const std::string what = "cannot read " + path.string();
  ASSIGN_OR_RETURN(RegularFile f, OpenRegularFile(path, max_bytes, what));
  Sha256Hasher h;
  RETURN_IF_ERROR(ReadChunks(f, max_bytes, what, [&](const char* data, size_t size) {
    h.Update(data, size);
    return Status::Ok();
  }));
  return h.HexDigest();
}

bool IsSha256Hex(std::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace kiln
