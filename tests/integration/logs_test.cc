// `kilnctl logs` against a real kilnd and real kiln-testsvc instances: an instance, a service's
// instances prefixed, --tail, --revision, terminated instances, --follow picking up new
// instances, tokens.

#include <catch2/catch.hpp>
#include <sstream>

#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";
const char* kViewer = "viewer-token-0123456789";

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

RunResult Logs(KilndHarness& h, const std::vector<std::string>& args,
               const std::string& token = kViewer) {
  std::vector<std::string> argv = {BinPath("kilnctl"), "--addr", h.UnixAddr()};
  if (!token.empty()) argv.insert(argv.end(), {"--token", token});
  argv.emplace_back("logs");
  argv.insert(argv.end(), args.begin(), args.end());
  return Run(argv, 30s);
}

TEST_CASE("kilnctl logs shows an instance and a service's instances with a viewer token",
          "[kilnctl][logs]") {
  KilndHarness h;
  WriteFile(h.tmp() / "tokens", std::string(kViewer) + " viewer vera\n");
  h.Declare("web", "1.0", 2, kPolicy, ", \"--log-every\", \"50ms\"");
  h.Start({"--tokens", (h.tmp() / "tokens").string()});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 2; }));
  const std::string first = h.Live("web")[0].name;
  REQUIRE(WaitFor([&] { return Logs(h, {first}).out.find(" line 5\n") != std::string::npos; }));

  // One instance: its lines as written, no prefix.
  RunResult one = Logs(h, {first});
  INFO(one.out << one.err);
  CHECK(one.exit_code == 0);
  CHECK(one.out.rfind("kiln-testsvc 1.0 listening on 127.0.0.1:", 0) == 0);
  CHECK(one.out.find("\nkiln-testsvc 1.0 line 1\nkiln-testsvc 1.0 line 2\n") != std::string::npos);
  // --tail: the last N lines only, the newest among them.
  RunResult tail = Logs(h, {first, "--tail", "3"});
  auto tail_lines = Lines(tail.out);
  REQUIRE(tail_lines.size() == 3);
  CHECK(tail_lines[0].rfind("kiln-testsvc 1.0 line ", 0) == 0);
  CHECK(std::stoi(tail_lines[2].substr(22)) == std::stoi(tail_lines[0].substr(22)) + 2);

  // A service: every instance's lines, each prefixed by its instance.
  RunResult svc = Logs(h, {"web"});
  CHECK(svc.exit_code == 0);
  for (const auto& i : h.Live("web")) {
    CHECK(svc.out.find(i.name + " | kiln-testsvc 1.0 line 1\n") != std::string::npos);
  }
  for (const auto& line : Lines(svc.out)) CHECK(line.rfind("web-", 0) == 0);

  // After a rollout the old instances are terminated; their logs are still there by revision,
  // to their last line.
  h.Declare("web", "2.0", 2, kPolicy, ", \"--log-every\", \"50ms\"");
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }, 60s));
  RunResult old = Logs(h, {"web", "--revision", "1"});
  CHECK(old.exit_code == 0);
  CHECK(old.out.find(first + " | kiln-testsvc: stopped\n") != std::string::npos);
  CHECK(old.out.find("2.0") == std::string::npos);
  RunResult now = Logs(h, {"web", "--revision", "2"});
  CHECK(now.out.find(" | kiln-testsvc 2.0 line 1\n") != std::string::npos);
  CHECK(now.out.find("1.0") == std::string::npos);
  // --since: the instances that ran within it (all of them, here) and none before.
  CHECK(Logs(h, {"web", "--since", "10m"}).out.find(first + " | ") != std::string::npos);

  // Refused: no token, an unknown name, a bad duration.
  RunResult anon = Logs(h, {"web"}, "");
  CHECK(anon.exit_code == 1);
  CHECK(anon.err.find("UNAUTHENTICATED") != std::string::npos);
  RunResult unknown = Logs(h, {"nope"});
  CHECK(unknown.exit_code == 1);
  CHECK(unknown.err == "kilnctl: NOT_FOUND: no instance or service named nope\n");
  CHECK(Logs(h, {"web", "--since", "yesterday"}).exit_code == 2);
}

TEST_CASE("kilnctl logs --follow streams new lines and instances that start later",
          "[kilnctl][logs]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy, ", \"--log-every\", \"100ms\"");
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  const std::string first = h.Live("web")[0].name;
  Child follow(
      {BinPath("kilnctl"), "--addr", h.UnixAddr(), "logs", "web", "--follow", "--tail", "1"},
      h.tmp().path());
  // New lines keep coming (numbers past the one --tail showed).
  REQUIRE(follow.WaitForStdout(first + " | kiln-testsvc 1.0 line 3", 30s));
  REQUIRE(follow.WaitForStdout(first + " | kiln-testsvc 1.0 line 8", 30s));
  // A second instance, started after the stream began, joins it from its first line.
  h.Declare("web", "1.0", 2, kPolicy, ", \"--log-every\", \"100ms\"");
  REQUIRE(WaitFor([&] { return h.Live("web").size() == 2; }));
  const std::string second = h.Live("web")[1].name;
  CHECK(follow.WaitForStdout(second + " | kiln-testsvc 1.0 listening on", 30s));
  CHECK(follow.WaitForStdout(second + " | kiln-testsvc 1.0 line 3", 30s));
  CHECK(follow.Wait(0ms) == -1);  // still streaming
  follow.Signal(SIGINT);
  CHECK(follow.Wait(10s) != -1);
  // Each line once, in order, per instance.
  int last = 0;
  bool in_order = true;
  for (const auto& line : Lines(follow.Stdout())) {
    const std::string prefix = first + " | kiln-testsvc 1.0 line ";
    if (line.rfind(prefix, 0) != 0) continue;
    const int n = std::stoi(line.substr(prefix.size()));
    in_order &= last == 0 || n == last + 1;
    last = n;
  }
  CHECK(in_order);
}

}  // namespace
}  // namespace kiln::testing
