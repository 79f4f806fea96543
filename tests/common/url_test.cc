#include "common/url.h"

#include <catch2/catch.hpp>
#include <string>

namespace kiln {
namespace {

TEST_CASE("UrlEncode keeps the unreserved characters and percent-encodes every other byte",
          "[url]") {
  CHECK(UrlEncode("") == "");
  CHECK(UrlEncode("AZaz09-._~") == "AZaz09-._~");
  CHECK(UrlEncode("kiln-web-1") == "kiln-web-1");
  CHECK(UrlEncode(R"({"label":["kiln.controller=ab"]})") ==
        "%7B%22label%22%3A%5B%22kiln.controller%3Dab%22%5D%7D");
  CHECK(UrlEncode("rate(x[1m]) > 0") == "rate%28x%5B1m%5D%29%20%3E%200");
  CHECK(UrlEncode(std::string("a\0b", 3)) == "a%00b");
  CHECK(UrlEncode("\xc3\xa9/\xff") == "%C3%A9%2F%FF");
}

}  // namespace
}  // namespace kiln
