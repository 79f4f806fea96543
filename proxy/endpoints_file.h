#pragma once

// kiln-proxy's memory of the pools across its own restarts (--endpoints-file): the last
// EndpointsSnapshot applied from kilnd, as proto JSON. A proxy restarted while kilnd is down
// serves what this file holds until kilnd answers; without kilnd it is the only source.

#include <filesystem>

#include "common/status.h"
#include "kiln/v1/kiln.pb.h"

namespace kiln {

// A snapshot is whole (every pool at once); this bounds what a damaged or hostile file can make
// the proxy read.
inline constexpr size_t kMaxEndpointsFileBytes = 64 << 20;

// The snapshot `path` holds. NOT_FOUND when there is no such file; any other error (not a
// regular file, too large, not an EndpointsSnapshot in proto JSON) names the file.
StatusOr<v1::EndpointsSnapshot> ReadEndpointsFile(const std::filesystem::path& path);

// Replaces `path` with `snapshot` so that a reader (or a crash) sees the old file or the new one,
// never a part: a temporary file beside it, fsync, rename, fsync of the directory.
Status WriteEndpointsFile(const std::filesystem::path& path, const v1::EndpointsSnapshot& snapshot);

}  // namespace kiln
