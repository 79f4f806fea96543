#pragma once

// Replacing a small file whole: a reader sees the old content or the new, never a part.

#include <sys/types.h>

#include <filesystem>
#include <string_view>

#include "common/status.h"

namespace kiln {

enum class Durability {
  kVisible,  // the new content replaces the old for readers; a crash may lose it
  kSynced,   // and it is on disk before this returns (file and directory synced)
};

// Writes `text` to a temporary file beside `path`, then renames it over `path`. Errors name the
// file (ErrnoError); the temporary file is removed on error.
Status WriteFileAtomically(const std::filesystem::path& path, std::string_view text,
                           Durability durability, mode_t mode = 0644);

}  // namespace kiln
