// What kiln-proxy makes of a snapshot, what it reports, and its endpoints file, without processes.

#include "proxy/kilnd_client.h"

#include <catch2/catch.hpp>

#include "proxy/endpoints_file.h"
#include "tests/proxy/fake_kiln.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::EndpointAt;
using testing::Exposed;

TEST_CASE("RoutesFromSnapshot keeps exposed services and their READY endpoints", "[kilnd-client]") {
  v1::EndpointsSnapshot snapshot;
  snapshot.set_kilnd_id("k1");
  snapshot.set_version(7);
  *snapshot.add_services() =
      Exposed("web", 8080,
              {EndpointAt("web-1", 20001), EndpointAt("web-2", 20002, v1::ENDPOINT_STATE_NOT_READY),
               EndpointAt("web-3", 20003, v1::ENDPOINT_STATE_DRAINING),
               EndpointAt("web-4", 20004, v1::ENDPOINT_STATE_READY, 2)});
  v1::ServiceEndpoints hidden;
  hidden.set_service("batch");
  *hidden.add_endpoints() = EndpointAt("batch-1", 20005);
  *snapshot.add_services() = hidden;
  v1::ServiceEndpoints empty = Exposed("api", 9090, {});
  empty.mutable_expose()->clear_host();  // no host: loopback
  *snapshot.add_services() = empty;

  std::vector<std::string> skipped;
  std::vector<ServiceRoute> routes = RoutesFromSnapshot(snapshot, &skipped);
  CHECK(skipped.empty());
  REQUIRE(routes.size() == 2);
  CHECK(routes[0].service == "web");
  CHECK(routes[0].listen_host == "127.0.0.1");
  CHECK(routes[0].listen_port == 8080);
  REQUIRE(routes[0].endpoints.size() == 2);
  CHECK(routes[0].endpoints[0].instance == "web-1");
  CHECK(routes[0].endpoints[0].port == 20001);
  CHECK(routes[0].endpoints[0].revision == 1);
  CHECK(routes[0].endpoints[1].instance == "web-4");
  CHECK(routes[0].endpoints[1].revision == 2);
  // A service with no endpoint ready still listens: its clients are refused, not sent elsewhere.
  CHECK(routes[1].service == "api");
  CHECK(routes[1].listen_host == "127.0.0.1");
  CHECK(routes[1].endpoints.empty());
}

TEST_CASE("RoutesFromSnapshot leaves out what cannot be served and says why", "[kilnd-client]") {
  v1::EndpointsSnapshot snapshot;
  *snapshot.add_services() = Exposed("bad-port", 70000, {EndpointAt("x-1", 20001)});
  v1::Endpoint no_host = EndpointAt("web-2", 20002);
  no_host.clear_host();
  *snapshot.add_services() =
      Exposed("web", 8080, {EndpointAt("web-1", 20001), no_host, EndpointAt("web-3", 0)});
  std::vector<std::string> skipped;
  std::vector<ServiceRoute> routes = RoutesFromSnapshot(snapshot, &skipped);
  REQUIRE(routes.size() == 1);
  REQUIRE(routes[0].endpoints.size() == 1);
  CHECK(routes[0].endpoints[0].instance == "web-1");
  REQUIRE(skipped.size() == 3);
  CHECK(skipped[0].find("bad-port") != std::string::npos);
  CHECK(skipped[0].find("70000") != std::string::npos);
  CHECK(skipped[1].find("web-2") != std::string::npos);
  CHECK(skipped[2].find("web-3") != std::string::npos);
}

TEST_CASE("ReportFromStats carries every route and endpoint with the snapshot applied",
          "[kilnd-client]") {
  ProxyStats stats;
  RouteStats route{.service = "web",
                   .listen_host = "127.0.0.1",
                   .listen_port = 8080,
                   .bound_port = 8080,
                   .rejected_connections = 3};
  route.endpoints.push_back(
      {.endpoint = {.instance = "web-1", .host = "127.0.0.1", .port = 20001, .revision = 4},
       .state = EndpointState::kDraining,
       .open_connections = 2,
       .total_connections = 10,
       .connect_failures = 1,
       .bytes_in = 100,
       .bytes_out = 2000});
  route.endpoints.push_back({.endpoint = {.instance = "web-2", .host = "127.0.0.1", .port = 20002},
                             .state = EndpointState::kEjected});
  stats.routes.push_back(route);
  stats.routes.push_back({.service = "api", .listen_port = 9090, .bind_error = "in use"});

  v1::ProxyReport report = ReportFromStats(stats, "host:42", "k1", 7, 1234);
  CHECK(report.proxy() == "host:42");
  CHECK(report.kilnd_id() == "k1");
  CHECK(report.version() == 7);
  CHECK(report.started_unix_ms() == 1234);
  REQUIRE(report.routes_size() == 2);
  const v1::ProxyRoute& web = report.routes(0);
  CHECK(web.service() == "web");
  CHECK(web.bound_port() == 8080);
  CHECK(web.rejected_connections() == 3);
  REQUIRE(web.endpoints_size() == 2);
  CHECK(web.endpoints(0).instance() == "web-1");
  CHECK(web.endpoints(0).revision() == 4);
  CHECK(web.endpoints(0).state() == v1::PROXY_ENDPOINT_STATE_DRAINING);
  CHECK(web.endpoints(0).open_connections() == 2);
  CHECK(web.endpoints(0).total_connections() == 10);
  CHECK(web.endpoints(0).connect_failures() == 1);
  CHECK(web.endpoints(0).bytes_in() == 100);
  CHECK(web.endpoints(0).bytes_out() == 2000);
  CHECK(web.endpoints(1).state() == v1::PROXY_ENDPOINT_STATE_EJECTED);
  CHECK(report.routes(1).bound_port() == 0);
  CHECK(report.routes(1).bind_error() == "in use");
}

TEST_CASE("the endpoints file round-trips a snapshot and names itself in errors",
          "[kilnd-client]") {
  testing::TempDir dir;
  const std::filesystem::path file = dir / "endpoints.json";
  StatusOr<v1::EndpointsSnapshot> missing = ReadEndpointsFile(file);
  REQUIRE(!missing.ok());
  CHECK(missing.status().code() == StatusCode::kNotFound);

  v1::EndpointsSnapshot snapshot;
  snapshot.set_kilnd_id("k1");
  snapshot.set_version(12);
  *snapshot.add_services() = Exposed("web", 8080, {EndpointAt("web-1", 20001)});
  REQUIRE(WriteEndpointsFile(file, snapshot).ok());
  CHECK(testing::ReadFile(file).find("\"kilnd_id\": \"k1\"") != std::string::npos);
  StatusOr<v1::EndpointsSnapshot> read = ReadEndpointsFile(file);
  REQUIRE(read.ok());
  CHECK(read->SerializeAsString() == snapshot.SerializeAsString());

  testing::WriteFile(file, "{\"kilnd_id\": 5, ");
  StatusOr<v1::EndpointsSnapshot> corrupt = ReadEndpointsFile(file);
  REQUIRE(!corrupt.ok());
  CHECK(corrupt.status().code() != StatusCode::kNotFound);
  CHECK(corrupt.status().message().find(file.string()) != std::string::npos);

  std::filesystem::create_directory(dir / "dir.json");
  CHECK(!ReadEndpointsFile(dir / "dir.json").ok());
  CHECK(!WriteEndpointsFile(dir / "no-such-dir" / "endpoints.json", snapshot).ok());
}

}  // namespace
}  // namespace kiln
