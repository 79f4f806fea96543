// The Docker driver against a real dockerd started by the test (tests/deploy/docker_engine.h).

#include "deploy/docker_driver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <optional>

#include "deploy/docker_client.h"
#include "tests/deploy/deploy_test_util.h"
#include "tests/deploy/docker_engine.h"

namespace kiln {
namespace {

using testing::DockerEngine;
using testing::RunUntil;

// GET / on 127.0.0.1:port with a fresh connection; "" when nothing answers.
std::string HttpGet(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const std::string req = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) out.append(buf, n);
    }
  }
  ::close(fd);
  size_t body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

// Waits (running the io_context) until GET / on the port answers; its body.
std::string WaitForAnswer(boost::asio::io_context& io, int port) {
  std::string answer;
  RunUntil(
      io,
      [&] {
        answer = HttpGet(port);
        return !answer.empty();
      },
      std::chrono::seconds(20));
  return answer;
}

struct Fixture {
  Fixture() {
    why_not = engine.Start();
    if (!why_not.empty()) {
      WARN("SKIPPED: cannot start a Docker engine for this test: " << why_not);
      return;
    }
    image_id = engine.ImportTestImage("v1");
    controller = "test" + std::to_string(::getpid());
  }

  std::unique_ptr<DockerDriver> NewDriver() {
    DockerDriver::Options o;
    o.endpoint = engine.endpoint();
    o.controller_id = controller;
    auto d = DockerDriver::Create(io, o);
    REQUIRE(d.ok());
    return std::move(d).value();
  }

  InstanceSpec Spec(const std::string& instance) const {
    InstanceSpec s;
    s.instance = instance;
    s.service = "web";
    s.revision = 3;
    s.image = "kiln-test/web@" + image_id;
    s.command = {"/kiln-testsvc", "--host", "0.0.0.0", "--version-string", "{instance} {port}"};
    s.container_port = 8080;
    return s;
  }

  StatusOr<InstanceHandle> StartAndWait(Driver& d, const InstanceSpec& spec) {
    std::optional<StatusOr<InstanceHandle>> result;
    d.Start(spec, [&](StatusOr<InstanceHandle> r) { result.emplace(std::move(r)); });
    RunUntil(
        io, [&] { return result.has_value(); }, std::chrono::seconds(60));
    if (!result) return DeadlineExceededError();
    return std::move(*result);
  }

  StatusOr<ExitInfo> StopAndWait(Driver& d, const InstanceHandle& h) {
    std::optional<StatusOr<ExitInfo>> result;
    d.Stop(h, std::chrono::seconds(5), [&](StatusOr<ExitInfo> r) { result.emplace(std::move(r)); });
    RunUntil(
        io, [&] { return result.has_value(); }, std::chrono::seconds(60));
    if (!result) return DeadlineExceededError();
    return std::move(*result);
  }

  static Status DeadlineExceededError() {
    return Status(StatusCode::kDeadlineExceeded, "the driver did not answer");
  }

  DockerEngine engine;
  std::string why_not;
  std::string image_id;
  std::string controller;
  boost::asio::io_context io;
};

#define SKIP_WITHOUT_ENGINE(f)                                             \
  do {                                                                     \
    if (!(f).why_not.empty()) {                                            \
      std::printf("SKIPPED: no Docker engine: %s\n", (f).why_not.c_str()); \
      return;                                                              \
    }                                                                      \
    REQUIRE((f).image_id.rfind("sha256:", 0) == 0);                        \
  } while (0)

TEST_CASE("docker driver runs an image on a published port and stops it with its exit code",
          "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  auto driver = f.NewDriver();
  StatusOr<InstanceHandle> h = f.StartAndWait(*driver, f.Spec("web-1"));
  REQUIRE(h.ok());
  CHECK(IsDockerHandle(h->id));
  CHECK(h->host == "127.0.0.1");
  REQUIRE(h->port > 0);
  // The command's {instance} and {port} were expanded; PORT is the container's port.
  CHECK(WaitForAnswer(f.io, h->port) == "web-1 8080\n");

  auto running = driver->IsRunning(*h);
  REQUIRE(running.ok());
  CHECK(*running);
  auto list = driver->List();
  REQUIRE(list.ok());
  REQUIRE(list->size() == 1);
  CHECK(list->at(0).handle.instance == "web-1");
  CHECK(list->at(0).handle.id == h->id);
  CHECK(list->at(0).handle.port == h->port);
  CHECK(list->at(0).service == "web");
  CHECK(list->at(0).revision == 3);
  auto containers = f.engine.Containers("kiln.instance=web-1");
  REQUIRE(containers.size() == 1);
  CHECK(containers[0]["Names"][0] == "/kiln-web-1");
  CHECK(containers[0]["Labels"]["kiln.controller"] == f.controller);

  StatusOr<ExitInfo> e = f.StopAndWait(*driver, *h);
  REQUIRE(e.ok());
  CHECK(e->Describe() == "exited with code 0");  // kiln-testsvc ends cleanly on SIGTERM
  CHECK(f.engine.Containers("kiln.controller=" + f.controller).empty());
  running = driver->IsRunning(*h);
  REQUIRE(running.ok());
  CHECK_FALSE(*running);
  // Stopping it again: already gone, and that is success.
  e = f.StopAndWait(*driver, *h);
  REQUIRE(e.ok());
  CHECK_FALSE(e->status_known);
}

TEST_CASE("docker driver reports a container killed by someone else once and removes it",
          "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  auto driver = f.NewDriver();
  std::vector<ExitInfo> exits;
  driver->SetExitCallback([&](const ExitInfo& e) { exits.push_back(e); });
  StatusOr<InstanceHandle> h = f.StartAndWait(*driver, f.Spec("web-2"));
  REQUIRE(h.ok());
  REQUIRE(!WaitForAnswer(f.io, h->port).empty());

  REQUIRE(f.engine.Kill(h->id.substr(7)));
  REQUIRE(RunUntil(
      f.io, [&] { return !exits.empty(); }, std::chrono::seconds(30)));
  CHECK(exits[0].instance == "web-2");
  CHECK(exits[0].Describe() == "exited with code 137");
  // Removed once its end was reported.
  REQUIRE(RunUntil(
      f.io, [&] { return f.engine.Containers("kiln.controller=" + f.controller).empty(); },
      std::chrono::seconds(30)));
  auto list = driver->List();
  REQUIRE(list.ok());
  CHECK(list->empty());
  CHECK(exits.size() == 1);
}

TEST_CASE("docker driver adopts a running container after a restart and reports its exit",
          "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  InstanceHandle h;
  {
    auto first = f.NewDriver();
    StatusOr<InstanceHandle> started = f.StartAndWait(*first, f.Spec("web-3"));
    REQUIRE(started.ok());
    h = *started;
  }  // the container outlives its driver
  auto driver = f.NewDriver();
  std::vector<ExitInfo> exits;
  driver->SetExitCallback([&](const ExitInfo& e) { exits.push_back(e); });
  auto list = driver->List();
  REQUIRE(list.ok());
  REQUIRE(list->size() == 1);
  CHECK(list->at(0).handle.id == h.id);
  CHECK(list->at(0).handle.port == h.port);
  REQUIRE(driver->Adopt(h).ok());
  CHECK(WaitForAnswer(f.io, h.port) == "web-3 8080\n");

  // A handle of a container that does not exist is not adopted.
  InstanceHandle bogus = h;
  bogus.instance = "web-9";
  bogus.id = "docker:" + std::string(64, 'a');
  CHECK(driver->Adopt(bogus).code() == StatusCode::kNotFound);

  REQUIRE(f.engine.Kill(h.id.substr(7)));
  REQUIRE(RunUntil(
      f.io, [&] { return !exits.empty(); }, std::chrono::seconds(30)));
  CHECK(exits[0].instance == "web-3");
  CHECK(exits[0].exit_code == 137);
}

TEST_CASE("docker driver reports an exit the engine's restart took away from its event stream",
          "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  auto driver = f.NewDriver();
  std::vector<ExitInfo> exits;
  driver->SetExitCallback([&](const ExitInfo& e) { exits.push_back(e); });
  StatusOr<InstanceHandle> h = f.StartAndWait(*driver, f.Spec("web-7"));
  REQUIRE(h.ok());
  REQUIRE(!WaitForAnswer(f.io, h->port).empty());
  // The engine stops its containers as it goes down and forgets its events: the driver hears
  // the die before its stream drops, or finds the container ended after reconnecting.
  REQUIRE(f.engine.Restart().empty());
  REQUIRE(RunUntil(
      f.io, [&] { return !exits.empty(); }, std::chrono::seconds(60)));
  CHECK(exits[0].instance == "web-7");
  CHECK(exits[0].exit_code.has_value());
  REQUIRE(RunUntil(
      f.io, [&] { return f.engine.Containers("kiln.controller=" + f.controller).empty(); },
      std::chrono::seconds(30)));
  CHECK(exits.size() == 1);
}

TEST_CASE("docker driver does not adopt a container that exited while nobody watched", "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  InstanceHandle h;
  {
    auto first = f.NewDriver();
    InstanceSpec spec = f.Spec("web-4");
    spec.command = {"/kiln-testsvc", "--exit-after", "2s", "--exit-code", "3"};
    StatusOr<InstanceHandle> started = f.StartAndWait(*first, spec);
    REQUIRE(started.ok());
    h = *started;
  }
  auto driver = f.NewDriver();
  // Exited but not removed: still listed, so recovery can deal with it.
  REQUIRE(RunUntil(
      f.io,
      [&] {
        auto c = f.engine.Containers("kiln.instance=web-4");
        return c.size() == 1 && c[0]["State"] == "exited";
      },
      std::chrono::seconds(30)));
  auto list = driver->List();
  REQUIRE(list.ok());
  CHECK(list->size() == 1);
  Status adopted = driver->Adopt(h);
  CHECK(adopted.code() == StatusCode::kNotFound);
  CHECK_THAT(adopted.message(), Catch::Contains("exited with code 3"));
  REQUIRE(RunUntil(
      f.io, [&] { return f.engine.Containers("kiln.instance=web-4").empty(); },
      std::chrono::seconds(30)));
}

TEST_CASE("docker driver names an image that is neither held nor pullable", "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  auto driver = f.NewDriver();
  InstanceSpec spec = f.Spec("web-5");
  // A registry that refuses connections: the engine cannot pull from it.
  spec.image = "127.0.0.1:1/kiln/missing@sha256:" + std::string(64, '0');
  StatusOr<InstanceHandle> h = f.StartAndWait(*driver, spec);
  REQUIRE_FALSE(h.ok());
  CHECK_THAT(h.status().message(), Catch::Contains("start web-5"));
  CHECK_THAT(h.status().message(), Catch::Contains(spec.image));
  CHECK_THAT(h.status().message(), Catch::Contains("not found on engine " + f.engine.endpoint()));
  CHECK(f.engine.Containers("kiln.controller=" + f.controller).empty());
}

TEST_CASE("docker driver refuses an image that is not pinned by digest", "[docker]") {
  Fixture f;
  SKIP_WITHOUT_ENGINE(f);
  auto driver = f.NewDriver();
  InstanceSpec spec = f.Spec("web-6");
  spec.image = "kiln-test/web:latest";
  StatusOr<InstanceHandle> h = f.StartAndWait(*driver, spec);
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(h.status().message(), Catch::Contains("not pinned as name@sha256:"));
}

TEST_CASE("docker driver names the socket of an engine it cannot reach") {
  testing::TempDir dir;
  boost::asio::io_context io;
  DockerDriver::Options o;
  o.endpoint = "unix://" + (dir / "nothing.sock").string();
  o.controller_id = "test";
  auto driver = DockerDriver::Create(io, o);
  REQUIRE(driver.ok());
  InstanceSpec spec;
  spec.instance = "web-1";
  spec.service = "web";
  spec.image = "kiln-test/web@sha256:" + std::string(64, '1');
  std::optional<StatusOr<InstanceHandle>> result;
  (*driver)->Start(spec, [&](StatusOr<InstanceHandle> r) { result.emplace(std::move(r)); });
  REQUIRE(RunUntil(io, [&] { return result.has_value(); }));
  REQUIRE_FALSE(result->ok());
  CHECK(result->status().code() == StatusCode::kUnavailable);
  CHECK_THAT(result->status().message(), Catch::Contains(o.endpoint + " unreachable"));
  auto list = (*driver)->List();
  CHECK(list.status().code() == StatusCode::kUnavailable);

  CHECK(DockerDriver::Create(io, {.endpoint = "tcp://10.0.0.1:2376", .controller_id = "x"})
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(DockerDriver::Create(io, {.endpoint = "/run/docker.sock", .controller_id = "x"})
            .status()
            .code() == StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln
