// `kilnctl logs` against a real kilnd and real kiln-testsvc instances: an instance, a service's
// instances prefixed, --tail, --revision, terminated instances, --follow picking up new
// instances, tokens; and the log files capped and rotated while kilnd is down too.

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

// The numbers of "kiln-testsvc 1.0 line N" lines, in order.
std::vector<int> LineNumbers(const std::string& text) {
  std::vector<int> out;
  const std::string prefix = "kiln-testsvc 1.0 line ";
  for (const auto& line : Lines(text)) {
    if (line.rfind(prefix, 0) == 0) out.push_back(std::stoi(line.substr(prefix.size())));
  }
  return out;
}

int LastNumber(const std::string& text) {
  std::vector<int> n = LineNumbers(text);
  return n.empty() ? 0 : n.back();
}

uintmax_t SizeOf(const std::filesystem::path& p) {
  std::error_code ec;
  const uintmax_t n = std::filesystem::file_size(p, ec);
  return ec ? 0 : n;
}

TEST_CASE("instance logs are capped and rotated and logs reads the rotated copies",
          "[kilnctl][logs]") {
  KilndHarness h;
  // About 30 bytes every 5 ms: 4 KiB in well under a second.
  h.Declare("web", "1.0", 1, kPolicy, ", \"--log-every\", \"5ms\"");
  h.Start({"--log-max-size", "4KiB", "--log-max-files", "3"});
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web") == 1; }));
  const std::string name = h.Live("web")[0].name;
  const auto log = h.state() / "logs" / (name + ".log");
  const auto copy = [&](int n) { return log.string() + "." + std::to_string(n); };
  REQUIRE(WaitFor([&] { return std::filesystem::exists(copy(2)); }, 30s));
  std::this_thread::sleep_for(3s);  // a few more rotations
  // At most 3 files: the live one and two copies, each about the cap (a copy is what the live
  // file held when it was checked, at most one second of lines past the cap).
  CHECK_FALSE(std::filesystem::exists(copy(3)));
  CHECK(SizeOf(copy(1)) > 4096);
  CHECK(SizeOf(copy(1)) < uintmax_t{32} * 1024);
  CHECK(SizeOf(log) < uintmax_t{32} * 1024);

  // logs reads the copies, oldest first, then the live file: the numbers only go up, and the
  // first lines (rotated out of the last copy) are gone.
  RunResult all = Logs(h, {name}, "");
  REQUIRE(all.exit_code == 0);
  std::vector<int> numbers = LineNumbers(all.out);
  REQUIRE(numbers.size() > 200);
  CHECK(numbers.front() > 1);
  CHECK(all.out.find("listening on") == std::string::npos);
  bool increasing = true;
  for (size_t i = 1; i < numbers.size(); ++i) increasing &= numbers[i] > numbers[i - 1];
  CHECK(increasing);
  // --tail reaches back into the copies when the live file holds fewer lines.
  // Like tail(1), the last 250 lines when it looked, then on to the end: the instance writes
  // every 5 ms, so a slow run (ASan) also gets the few lines written meanwhile.
  RunResult tail = Logs(h, {name, "--tail", "250"}, "");
  CHECK(LineNumbers(tail.out).size() >= 250);
  CHECK(LineNumbers(tail.out).size() < 300);

  // kilnd down is not the instance down: it goes on writing, and its log grows past the cap
  // until a kilnd checks it again.
  h.Kill9();
  const int before = std::max(LastNumber(ReadFile(log)), LastNumber(ReadFile(copy(1))));
  std::this_thread::sleep_for(2500ms);
  CHECK(SizeOf(log) > uintmax_t{8} * 1024);
  CHECK(LastNumber(ReadFile(log)) > before + 100);
  h.Start({"--log-max-size", "4KiB", "--log-max-files", "3"});
  REQUIRE(h.WaitReady());
  CHECK(WaitFor([&] { return SizeOf(log) < uintmax_t{8} * 1024; }, 10s));
  CHECK(h.Healthy("web") == 1);
  CHECK(h.Live("web")[0].name == name);  // the same instance all along
}

TEST_CASE("an instance's log files go with its row when history is pruned", "[kilnctl][logs]") {
  KilndHarness h;
  h.SetExtraYaml("history_limit: 1\n");
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 1; }));
  const std::string old = h.Live("web")[0].name;
  const auto log = h.state() / "logs" / (old + ".log");
  REQUIRE(WaitFor([&] { return SizeOf(log) > 0; }));
  REQUIRE(Logs(h, {old}, "").exit_code == 0);
  // Revision 3 completes; revision 1 is beyond history_limit (revision 2 stays: what a rollback
  // would go back to) and goes, with its instance's row.
  h.Declare("web", "2.0", 1, kPolicy);
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 1 && h.Live("web").size() == 1; }, 60s));
  CHECK(std::filesystem::exists(log));
  h.Declare("web", "3.0", 1, kPolicy);
  REQUIRE(WaitFor(
      [&] {
        auto s = h.Store();
        return s && !s->GetRevision("web", 1).ok() && !s->GetInstance(old).ok();
      },
      60s));
  CHECK(WaitFor([&] { return !std::filesystem::exists(log); }, 10s));
  RunResult gone = Logs(h, {old}, "");
  CHECK(gone.exit_code == 1);
  CHECK(gone.err.find("NOT_FOUND") != std::string::npos);
  // The new instance's log is there.
  CHECK(std::filesystem::exists(h.state() / "logs" / (h.Live("web")[0].name + ".log")));
}

}  // namespace
}  // namespace kiln::testing
