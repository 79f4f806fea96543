#include "api/tokens.h"

#include <fstream>
#include <sstream>

namespace kiln {

StatusOr<Tokens> LoadTokens(const std::string& path) {
  std::ifstream f(path);
  if (!f) return NotFoundError("cannot read tokens file " + path);
  Tokens tokens;
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    if (size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream in(line);
    std::string token, role, name, extra;
    if (!(in >> token)) continue;  // blank or comment
    auto where = path + ":" + std::to_string(n) + ": ";
    if (!(in >> role >> name) || (in >> extra)) {
      return InvalidArgumentError(where + "expected \"TOKEN ROLE NAME\"");
    }
    if (role != "viewer" && role != "operator" && role != "proxy") {
      return InvalidArgumentError(
          where.append("role must be viewer, operator or proxy, got \"").append(role).append("\""));
    }
    if (token.size() < 16)
      return InvalidArgumentError(where + "a token must be at least 16 characters");
    if (tokens.count(token)) return InvalidArgumentError(where + "duplicate token");
    tokens[token] = {name, role == "operator" ? Role::kOperator
                           : role == "proxy"  ? Role::kProxy
                                              : Role::kViewer};
  }
  return tokens;
}

const Caller* FindCaller(const std::map<std::string, Caller>& tokens, std::string_view presented) {
  const Caller* found = nullptr;
  for (const auto& [token, caller] : tokens) {
    unsigned char diff = token.size() == presented.size() ? 0 : 1;
    for (size_t i = 0; i < token.size(); ++i) {
      diff |= static_cast<unsigned char>(token[i] ^ (i < presented.size() ? presented[i] : 0));
    }
    if (diff == 0) found = &caller;
  }
  return found;
}

StatusOr<Caller> AuthenticateBearer(const std::map<std::string, Caller>& tokens,
                                    std::string_view authorization) {
  if (authorization.empty()) {
    return Status(StatusCode::kUnauthenticated, "missing authorization: Bearer <token>");
  }
  constexpr std::string_view kBearer = "Bearer ";
  if (authorization.substr(0, kBearer.size()) != kBearer) {
    return Status(StatusCode::kUnauthenticated, "authorization must be \"Bearer <token>\"");
  }
  const Caller* caller = FindCaller(tokens, authorization.substr(kBearer.size()));
  if (caller == nullptr) return Status(StatusCode::kUnauthenticated, "unknown token");
  return *caller;
}

}  // namespace kiln
