#include "deploy/port_allocator.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <catch2/catch.hpp>
#include <set>

#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::PortWindow;

TEST_CASE("ports are handed out once until released", "[ports]") {
  const int first = PortWindow() + 100;
  PortAllocator ports(first, first + 2);
  std::set<int> got;
  for (int i = 0; i < 3; ++i) got.insert(*ports.Allocate());
  CHECK(got == std::set<int>{first, first + 1, first + 2});
  StatusOr<int> none = ports.Allocate();
  CHECK(none.status().code() == StatusCode::kResourceExhausted);
  CHECK(none.status().message() == "no free port in " + std::to_string(first) + "-" +
                                       std::to_string(first + 2) +
                                       " (3 held by instances, the rest in use by other programs)");
  ports.Release(first + 1);
  CHECK(*ports.Allocate() == first + 1);
  CHECK(ports.InUse() == 3);
}

TEST_CASE("reserved ports (adopted instances') are not handed out", "[ports]") {
  const int first = PortWindow() + 110;
  PortAllocator ports(first, first + 1);
  ports.Reserve(first);
  CHECK(*ports.Allocate() == first + 1);
  CHECK_FALSE(ports.Allocate().ok());
}

TEST_CASE("a port another program listens on is skipped", "[ports]") {
  const int first = PortWindow() + 120;
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor squatter(
      io, {boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(first)});
  CHECK_FALSE(PortIsFree(first));
  PortAllocator ports(first, first + 1);
  CHECK(*ports.Allocate() == first + 1);
}

}  // namespace
}  // namespace kiln
