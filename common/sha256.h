#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kiln {

// Lower-case hex SHA-256 of bytes (OpenSSL libcrypto).
std::string Sha256Hex(std::string_view data);

// Lower-case hex SHA-256 of a file's contents, read in chunks. Errors name the path.
StatusOr<std::string> Sha256File(const std::filesystem::path& path);

// True for 64 lower- or upper-case hex digits.
bool IsSha256Hex(std::string_view s);

}  // namespace kiln
