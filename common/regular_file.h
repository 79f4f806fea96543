#pragma once

// Reading files named by outside input (manifests, artifacts) without trusting them: only
// regular files are read, never a FIFO (which would block), a device (/dev/zero never ends) or a
// socket, and never more than a stated number of bytes.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>

#include "common/status.h"
#include "common/unique_fd.h"

namespace kiln {

struct RegularFile {
  UniqueFd fd;
  uint64_t size = 0;  // at open time
};

// Opens `path` read-only if it is a regular file of at most `max_bytes`. The type is checked
// before opening (so a device is never opened) and again on the open descriptor (so a swap in
// between is caught); the open is O_NONBLOCK, so even a FIFO swapped in cannot block it.
// Errors read "<what>: <reason>", e.g. "cannot read /x: not a regular file (a FIFO)".
StatusOr<RegularFile> OpenRegularFile(const std::filesystem::path& path, uint64_t max_bytes,
                                      std::string_view what);

// Calls `chunk` with the file's bytes in order, refusing a file that grows past `max_bytes`
// while it is read. Stops at the first error `chunk` returns.
Status ReadChunks(RegularFile& file, uint64_t max_bytes, std::string_view what,
                  const std::function<Status(const char* data, size_t size)>& chunk);

// "<what>: larger than the limit of N bytes".
Status TooLarge(uint64_t max_bytes, std::string_view what);

// The whole content of a regular file of at most `max_bytes`.
StatusOr<std::string> ReadRegularFile(const std::filesystem::path& path, size_t max_bytes,
                                      std::string_view what);

}  // namespace kiln
