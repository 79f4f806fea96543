#pragma once

// Building URLs for the HTTP clients (the Docker Engine API, Prometheus's API in tests).

#include <string>
#include <string_view>

namespace kiln {

// `s` percent-encoded for a query parameter's value or a path segment: every byte but the
// unreserved characters of RFC 3986 (ALPHA, DIGIT, '-', '.', '_', '~') becomes %XX.
std::string UrlEncode(std::string_view s);

}  // namespace kiln
