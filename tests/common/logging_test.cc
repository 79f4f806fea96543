#include "common/logging.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

namespace kiln {
namespace {

TEST_CASE("text log lines carry fields as key=value", "[logging]") {
  std::string line = FormatLogPayload(
      LogFormat::kText, "instance started",
      {{"service", "web"}, {"revision", 3}, {"instance", "web-7"}, {"reason", "exit code 1"}});
  CHECK(line == "instance started service=web revision=3 instance=web-7 reason=\"exit code 1\"");
}

TEST_CASE("json log payloads parse as JSON with typed fields", "[logging]") {
  std::string payload = FormatLogPayload(LogFormat::kJson, "say \"hi\"\n",
                                         {{"service", "web"}, {"revision", 3}, {"ok", true}});
  auto j = nlohmann::json::parse("{" + payload + "}");
  CHECK(j["msg"] == "say \"hi\"\n");
  CHECK(j["service"] == "web");
  CHECK(j["revision"] == 3);
  CHECK(j["ok"] == true);
}

TEST_CASE("bad log settings are refused with the accepted values", "[logging]") {
  CHECK(ParseLogLevel("debug").ok());
  CHECK(ParseLogLevel("loud").status().message() ==
        "log level must be one of trace, debug, info, warn, error, off; got \"loud\"");
  CHECK(ParseLogFormat("json").ok());
  CHECK_FALSE(ParseLogFormat("xml").ok());
}

}  // namespace
}  // namespace kiln
