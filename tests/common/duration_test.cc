#include "common/duration.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

TEST_CASE("ParseDuration reads the manifest forms", "[duration]") {
  struct Case {
    const char* text;
    int64_t ms;
  };
  for (const Case& c : {Case{"500ms", 500}, Case{"2s", 2000}, Case{"10m", 600000},
                        Case{"1h", 3600000}, Case{"1m30s", 90000}, Case{"0s", 0}}) {
    INFO(c.text);
    StatusOr<Duration> d = ParseDuration(c.text);
    REQUIRE(d.ok());
    CHECK(d->count() == c.ms);
  }
}

TEST_CASE("ParseDuration refuses what is not a duration", "[duration]") {
  for (const char* bad : {"", "5", "2 s", "s", "1.5s", "-1s", "10d", "2sec", "ms"}) {
    INFO(bad);
    StatusOr<Duration> d = ParseDuration(bad);
    REQUIRE_FALSE(d.ok());
    CHECK(d.status().message() ==
          std::string("expected a duration like 500ms, 2s or 10m, got \"") + bad + "\"");
  }
}

TEST_CASE("FormatDuration reads back to the same value", "[duration]") {
  for (int64_t ms : {0, 1, 500, 1000, 2500, 60000, 90000, 3600000, 3723004}) {
    INFO(ms);
    std::string text = FormatDuration(Duration(ms));
    CHECK(ParseDuration(text)->count() == ms);
  }
  CHECK(FormatDuration(Duration(90000)) == "1m30s");
  CHECK(FormatDuration(Duration(500)) == "500ms");
}

}  // namespace
}  // namespace kiln
