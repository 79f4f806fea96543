#pragma once

// API access tokens (`kilnd --tokens FILE`): one per line, "TOKEN ROLE NAME", ROLE `viewer`
// (reads) or `operator` (reads and mutating calls); '#' starts a comment.

#include <map>
#include <string>

#include "common/status.h"

namespace kiln {

enum class Role { kViewer, kOperator };

struct Caller {
  std::string name;
  Role role = Role::kViewer;
};

// Errors name the file and line.
StatusOr<std::map<std::string, Caller>> LoadTokens(const std::string& path);

}  // namespace kiln
