#pragma once

// API access tokens (`kilnd --tokens FILE`): one per line, "TOKEN ROLE NAME", ROLE `viewer`
// (reads), `operator` (reads and mutating calls) or `proxy` (reads and ReportProxy: what a
// kiln-proxy run by hand needs); '#' starts a comment.

#include <map>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kiln {

enum class Role { kViewer, kOperator, kProxy };

struct Caller {
  std::string name;
  Role role = Role::kViewer;
};

// Callers by token.
using Tokens = std::map<std::string, Caller>;

// Errors name the file and line.
StatusOr<Tokens> LoadTokens(const std::string& path);

// The caller a presented token belongs to, or nullptr. Compares against every token in time
// that does not depend on where the presented one first differs.
const Caller* FindCaller(const std::map<std::string, Caller>& tokens, std::string_view presented);

// The caller of an "Authorization: Bearer <token>" header value, or why there is none
// (UNAUTHENTICATED, with a message for the client).
StatusOr<Caller> AuthenticateBearer(const std::map<std::string, Caller>& tokens,
                                    std::string_view authorization);

}  // namespace kiln
