// --docker-host values and the handles of containers on named hosts (no engine needed; the
// hosts against real engines are in tests/integration/docker_hosts_test.cc).

#include "deploy/docker_hosts.h"

#include <catch2/catch.hpp>

namespace kiln {
namespace {

TEST_CASE("docker host flags name hosts and a bare address is the default host", "[docker_hosts]") {
  StatusOr<std::vector<DockerHostConfig>> hosts =
      ParseDockerHostFlags({"name=b,unix:///run/b.sock", "name=a-1,unix:///run/a.sock"});
  REQUIRE(hosts.ok());
  REQUIRE(hosts->size() == 2);
  CHECK((*hosts)[0].name == "a-1");  // by name
  CHECK((*hosts)[0].endpoint == "unix:///run/a.sock");
  CHECK((*hosts)[1].name == "b");

  StatusOr<std::vector<DockerHostConfig>> bare = ParseDockerHostFlags({"unix:///run/docker.sock"});
  REQUIRE(bare.ok());
  CHECK(bare->at(0).name == "default");
  CHECK(bare->at(0).endpoint == "unix:///run/docker.sock");
}

TEST_CASE("docker host flags are refused with a reason", "[docker_hosts]") {
  struct Case {
    std::vector<std::string> flags;
    std::string error;
  };
  const std::vector<Case> cases = {
      {{"name=A,unix:///run/a.sock"}, "host name \"A\" must be 1 to 63 characters"},
      {{"name=,unix:///run/a.sock"}, "host name \"\" must be 1 to 63 characters"},
      {{"name=a"}, "expected name=NAME,unix:///PATH"},
      {{"name=a,unix:///run/a.sock", "name=a,unix:///run/b.sock"}, "\"a\" is given twice"},
      {{"unix:///run/a.sock", "unix:///run/b.sock"}, "a bare address is named \"default\""},
      {{"name=a,unix:///run/a.sock", "name=b,unix:///run/a.sock"},
       "engine unix:///run/a.sock is given twice"},
      {{"name=a,/run/a.sock"}, "\"name=a,/run/a.sock\": "},
  };
  for (const Case& c : cases) {
    StatusOr<std::vector<DockerHostConfig>> r = ParseDockerHostFlags(c.flags);
    INFO(c.flags.front());
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(r.status().message(), Catch::Contains(c.error));
  }
}

TEST_CASE("docker handles name their host and container", "[docker_hosts]") {
  auto named = ParseDockerHandle("docker:b/0123abcd");
  REQUIRE(named);
  CHECK(named->first == "b");
  CHECK(named->second == "0123abcd");
  // Written before hosts had names: the default host.
  auto old = ParseDockerHandle("docker:0123abcd");
  REQUIRE(old);
  CHECK(old->first == "default");
  CHECK(old->second == "0123abcd");
  CHECK_FALSE(ParseDockerHandle("pid:12:34"));
}

}  // namespace
}  // namespace kiln
