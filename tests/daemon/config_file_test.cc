// kilnd --config FILE: ParseDaemonFlags reading a real YAML file (every kind of setting, the
// command line overriding it, and each error located as FILE:LINE:COLUMN), then a real kilnd
// started with --config alone, and one refusing a bad file.

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "daemon/config.h"
#include "tests/integration/kilnd_harness.h"
#include "tests/integration/process.h"
#include "tests/test_util.h"

namespace kiln::testing {
namespace {

using namespace std::chrono_literals;

StatusOr<DaemonConfig> Parse(const std::vector<std::string>& args) {
  std::vector<const char*> argv = {"kilnd"};
  for (const std::string& a : args) argv.push_back(a.c_str());
  return ParseDaemonFlags(static_cast<int>(argv.size()), argv.data());
}

TEST_CASE("kilnd --config reads every kind of setting and the command line overrides it",
          "[daemon][config]") {
  TempDir tmp;
  const std::string file = (tmp.path() / "kilnd.yaml").string();
  WriteFile(file,
            "# kilnd's settings\n"
            "manifests: /m\n"
            "state: /s\n"
            "port-range: 3000-3009\n"
            "resync: 1m30s\n"
            "stop-grace: 3s\n"
            "http-listen: \"\"\n"
            "grpc-listen: localhost:0\n"
            "event-retention: 7\n"
            "log-max-size: 512KiB\n"
            "log-format: json\n"
            "log-level: warn\n"
            "stop-instances-on-exit: true\n"
            "docker-host: unix:///run/docker.sock\n"
            "notify:\n"
            "  - http://127.0.0.1:9/a\n"
            "  - http://127.0.0.1:9/b\n"
            "notify-service: [web]\n"
            "proxy: \"off\"\n");
  auto c = Parse({"--config", file});
  REQUIRE(c.ok());
  CHECK(c->manifests == "/m");
  CHECK(c->state == "/s");
  CHECK(c->port_first == 3000);
  CHECK(c->port_last == 3009);
  CHECK(c->resync == Duration(90'000));
  CHECK(c->stop_grace == Duration(3'000));
  CHECK(c->http_listen.empty());
  CHECK(c->grpc_listen == "localhost:0");
  CHECK(c->event_retention == 7);
  CHECK(c->log_max_bytes == uint64_t{512} * 1024);
  CHECK(c->log_format == LogFormat::kJson);
  CHECK(c->log_level == LogLevel::kWarn);
  CHECK(c->stop_instances_on_exit);
  CHECK(c->docker_hosts == std::vector<std::string>{"unix:///run/docker.sock"});
  CHECK(c->notify_urls == std::vector<std::string>{"http://127.0.0.1:9/a", "http://127.0.0.1:9/b"});
  CHECK(c->notify_services == std::vector<std::string>{"web"});
  CHECK(c->proxy == "off");

  // Flags win, whether they come before or after --config; what they do not give stays.
  auto o = Parse({"--resync", "5s", "--config", file, "--log-format", "text", "--notify",
                  "http://127.0.0.1:9/c", "--http-listen", "127.0.0.1:0"});
  REQUIRE(o.ok());
  CHECK(o->resync == Duration(5'000));
  CHECK(o->log_format == LogFormat::kText);
  CHECK(o->notify_urls == std::vector<std::string>{"http://127.0.0.1:9/c"});
  CHECK(o->http_listen == "127.0.0.1:0");
  CHECK(o->stop_grace == Duration(3'000));
  CHECK(o->manifests == "/m");

  // A false flag, and an empty file (nothing set: the required settings come from flags).
  WriteFile(file, "stop-instances-on-exit: false\n");
  auto f = Parse({"--config", file, "--manifests", "/m", "--state", "/s"});
  REQUIRE(f.ok());
  CHECK_FALSE(f->stop_instances_on_exit);
  WriteFile(file, "# nothing yet\n");
  auto e = Parse({"--config", file, "--manifests", "/m", "--state", "/s"});
  REQUIRE(e.ok());
  CHECK(e->resync == Duration(30'000));
  auto none = Parse({"--config", file, "--state", "/s"});
  REQUIRE_FALSE(none.ok());
  CHECK(none.status().message() == "--manifests is required");
}

TEST_CASE("kilnd --config names FILE:LINE:COLUMN and the key of each error", "[daemon][config]") {
  TempDir tmp;
  const std::string file = (tmp.path() / "kilnd.yaml").string();
  const std::string head = "manifests: /m\nstate: /s\n";  // lines 1 and 2
  struct Bad {
    std::string yaml;
    std::string says;  // how the message goes on after "FILE:" ("~TEXT": TEXT somewhere in it)
  };
  const std::vector<Bad> bad = {
      {head + "port_range: 1-2\n", "3:1: port_range: unknown key (did you mean \"port-range\"?)"},
      {head + "resynk: 1s\n", "3:1: resynk: unknown key (did you mean \"resync\"?)"},
      {head + "config: other.yaml\n",
       "3:1: config: unknown key (a config file cannot name another)"},
      {head + "state: /t\n", "3:1: state: duplicate key"},
      {head + "resync: [1s]\n", "3:9: resync: expected a string, got a list"},
      {head + "resync:\n", "3:1: resync: expected a string, got nothing"},
      {head + "resync: banana\n", "3:9: resync: expected a duration"},
      {head + "port-range: 9-3\n",
       "3:13: port-range: expected FIRST-LAST within 1-65535, got \"9-3\""},
      {head + "log-level: loud\n", "3:12: log-level: loud not in {"},
      {head + "event-retention: \"7\"\n", "3:18: event-retention: expected an integer, got \"7\""},
      {head + "event-retention: 0\n", "3:18: event-retention: Value 0 not in range"},
      {head + "stop-instances-on-exit: yes\n",
       "3:25: stop-instances-on-exit: expected true or false, got \"yes\""},
      {head + "notify: {url: x}\n",
       "3:9: notify: expected a string or a list of strings, got a mapping"},
      {head + "notify:\n  - http://127.0.0.1:9/a\n  - [x]\n", "5:5: notify: expected a string"},
      {head + "grpc-listen: nohost\n", "3:14: grpc-listen: expected HOST:PORT, got \"nohost\""},
      {head + "tls-cert: /x.pem\n", "3:11: --tls-cert and --tls-key go together"},
      {"- manifests\n", "1:1: expected a mapping of settings, got a list"},
      {head + "resync: [1s\n", "~: invalid YAML: "},
      {head + "---\nstate: /t\n", "4:1: one document of settings expected, got another"},
  };
  for (const Bad& b : bad) {
    WriteFile(file, b.yaml);
    auto c = Parse({"--config", file});
    INFO(b.yaml);
    REQUIRE_FALSE(c.ok());
    CHECK(c.status().code() == StatusCode::kInvalidArgument);
    if (b.says.starts_with("~")) {
      CHECK(c.status().message().starts_with(file + ":"));
      CHECK(c.status().message().find(b.says.substr(1)) != std::string::npos);
    } else {
      CHECK(c.status().message().starts_with(file + ":" + b.says));
    }
  }

  // The command line overrides a value of the file, whatever that value is worth.
  WriteFile(file, head + "resync: banana\n");
  CHECK(Parse({"--config", file, "--resync", "1s"}).ok());

  auto missing = Parse({"--config", (tmp.path() / "nothing.yaml").string()});
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == StatusCode::kInvalidArgument);
  CHECK(missing.status().message().starts_with("--config: cannot read " +
                                               (tmp.path() / "nothing.yaml").string() + ": "));
}

TEST_CASE("a real kilnd runs on --config alone and exits 2 naming the line of a bad one",
          "[daemon][config][kilnd]") {
  KilndHarness h;
  h.Declare("web", "1.0", 2,
            "{strategy: rolling, max_surge: 1, max_unavailable: 0, min_healthy_time: 100ms}");
  const auto file = h.tmp() / "kilnd.yaml";
  const std::string settings = "manifests: " + h.manifests().string() +
                               "\nstate: " + h.state().string() +
                               "\nport-range: " + std::to_string(PortWindow()) + "-" +
                               std::to_string(PortWindow() + kPortWindowSize - 1) +
                               "\nstop-grace: 2s\nhttp-listen: 127.0.0.1:0\nlog-format: json\n";

  // A bad file first: kilnd creates nothing and says where the mistake is.
  WriteFile(file, settings + "resync: soon\n");
  RunResult bad = Run({BinPath("kilnd"), "--config", file.string()});
  INFO(bad.err);
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.starts_with("kilnd: " + file.string() + ":7:9: resync: "));
  CHECK(std::count(bad.err.begin(), bad.err.end(), '\n') == 1);
  CHECK_FALSE(std::filesystem::exists(h.state()));

  WriteFile(file, settings + "resync: 2s\n");
  Child kilnd({BinPath("kilnd"), "--config", file.string()}, h.tmp().path());
  REQUIRE(kilnd.WaitForStderr("kilnd ready", 30s));
  CHECK(WaitFor([&] { return h.Healthy("web") == 2; }));
  // The file's log-format took effect, and kilnctl finds kilnd where the file said.
  CHECK(kilnd.Stderr().find("\"msg\":\"kilnd ready\"") != std::string::npos);
  RunResult status = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "status"});
  CHECK(status.exit_code == 0);
  CHECK(status.out.find("web") != std::string::npos);
  kilnd.Signal(SIGTERM);
  CHECK(kilnd.Wait(20s) == 0);
  CHECK(h.InstanceProcesses().size() == 2);  // no stop-instances-on-exit: they run on
}

}  // namespace
}  // namespace kiln::testing
