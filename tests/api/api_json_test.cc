// The API's views read "now" from the clock they are given, not the system's.

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "api/api_server.h"
#include "tests/controller/reconciler_fixture.h"

namespace kiln {
namespace {

using namespace std::chrono_literals;

TEST_CASE("availability in the API's views follows the clock it is given", "[api]") {
  testing::ReconcilerFixture f;
  f.Declare("v1", 1, "update: {min_healthy_time: 30s}\n");
  REQUIRE(f.Converge().ok());
  f.AllHealthy();
  REQUIRE(f.Converge().ok());
  auto available = [&] {
    auto json = ServiceJson(*f.store, "web", f.clock);
    REQUIRE(json.ok());
    auto j = nlohmann::json::parse(*json);
    REQUIRE(j["service"]["instances"].size() == 1);
    return j["service"]["instances"][0].value("available", false);
  };
  CHECK_FALSE(available());  // healthy, not yet for min_healthy_time
  f.clock.Advance(29s);
  CHECK_FALSE(available());
  f.clock.Advance(1s);
  CHECK(available());
}

}  // namespace
}  // namespace kiln
