#include "common/utf8.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

TEST_CASE("UTF-8 validation follows RFC 3629", "[utf8]") {
  CHECK(IsValidUtf8(""));
  CHECK(IsValidUtf8("plain ascii"));
  CHECK(IsValidUtf8("\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\xa5"));  // é, €, an emoji
  CHECK(IsValidUtf8("\xf4\x8f\xbf\xbf"));                                 // U+10FFFF
  CHECK(FindInvalidUtf8("ab\xff") == 2u);
  CHECK(FindInvalidUtf8("\xc0\xaf") == 0u);          // overlong '/'
  CHECK(FindInvalidUtf8("\xe0\x80\xaf") == 0u);      // overlong, 3 bytes
  CHECK(FindInvalidUtf8("x\xed\xa0\x80") == 1u);     // a UTF-16 surrogate
  CHECK(FindInvalidUtf8("\xf4\x90\x80\x80") == 0u);  // above U+10FFFF
  CHECK(FindInvalidUtf8("\xc3") == 0u);              // cut short
  CHECK(FindInvalidUtf8("\xe2\x82") == 0u);
  CHECK(FindInvalidUtf8("a\x80") == 1u);  // a lone continuation byte
}

TEST_CASE("sanitising and truncating keep text valid", "[utf8]") {
  CHECK(SanitizeUtf8("a\xff"
                     "b") ==
        "a\xef\xbf\xbd"
        "b");
  CHECK(SanitizeUtf8("\xc3\xa9") == "\xc3\xa9");
  CHECK(IsValidUtf8(SanitizeUtf8("\xed\xa0\x80\xc0")));
  CHECK(TruncateUtf8("abc", 5) == "abc");
  CHECK(TruncateUtf8("ab\xe2\x82\xac", 4) == "ab");  // never half a euro sign
  CHECK(TruncateUtf8("ab\xe2\x82\xac", 5) == "ab\xe2\x82\xac");
}

}  // namespace
}  // namespace kiln
