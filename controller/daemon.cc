#include "controller/daemon.h"

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <filesystem>
#include <iostream>

#include "common/clock.h"
#include "common/logging.h"
#include "controller/manifest.h"
#include "kiln/version.h"
#include "storage/sqlite_state_store.h"

namespace kiln {
namespace fs = std::filesystem;

namespace {

struct DaemonFlags {
  std::string manifests;
  std::string state;
  std::string log_format = "text";
  std::string log_level = "info";
};

// Logs what a manifest load found: each service with its template hash, each error.
void LogManifestSet(const ManifestSet& set) {
  for (const ServiceSpec* s : set.Services()) {
    LogInfo("service loaded", {{"service", s->name},
                               {"version", s->tmpl.version},
                               {"replicas", s->replicas},
                               {"strategy", StrategyName(s->update.strategy)},
                               {"template_hash", s->tmpl.Hash()},
                               {"file", s->file}});
  }
  for (const ManifestError& e : set.AllErrors()) {
    LogError("manifest error", {{"file", e.file},
                                {"line", e.line},
                                {"column", e.column},
                                {"key", e.key_path},
                                {"error", e.ToString()}});
  }
}

}  // namespace

int RunDaemon(int argc, char** argv) {
  DaemonFlags flags;
  CLI::App app("kilnd: converges services declared in manifests by replacing instances", "kilnd");
  app.set_version_flag("--version", std::string("kilnd ") + kVersion);
  app.add_option("--manifests", flags.manifests, "directory of *.yaml service manifests")
      ->required();
  app.add_option("--state", flags.state, "state directory (kiln.db, artifacts, logs)")->required();
  app.add_option("--log-format", flags.log_format, "text or json")
      ->check(CLI::IsMember({"text", "json"}));
  app.add_option("--log-level", flags.log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "kilnd: " << e.what() << "\n\n" << app.help();
    return 2;
  }

  SetupLogging(*ParseLogFormat(flags.log_format), *ParseLogLevel(flags.log_level));

  std::error_code ec;
  fs::create_directories(flags.state, ec);
  if (ec) {
    LogError("cannot create state directory", {{"path", flags.state}, {"error", ec.message()}});
    return 1;
  }

  RealClock clock;
  SqliteStateStore::Options store_options;
  store_options.path = (fs::path(flags.state) / "kiln.db").string();
  store_options.clock = &clock;
  auto store = SqliteStateStore::Open(store_options);
  if (!store.ok()) {
    LogError("cannot open state store", {{"error", store.status().message()}});
    return 1;
  }
  LogInfo("state store open", {{"path", store_options.path},
                               {"schema_version", SqliteStateStore::CurrentSchemaVersion()}});

  ManifestSet set = LoadManifestDir(flags.manifests);
  LogManifestSet(set);
  LogInfo("manifests loaded", {{"dir", flags.manifests},
                               {"services", static_cast<int64_t>(set.Services().size())},
                               {"errors", static_cast<int64_t>(set.AllErrors().size())}});

  boost::asio::io_context io;
  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& err, int signo) {
    if (err) return;
    LogInfo("shutting down; instances keep running", {{"signal", signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
    io.stop();
  });
  LogInfo("kilnd ready", {{"version", kVersion}, {"pid", static_cast<int64_t>(::getpid())}});
  io.run();
  LogInfo("kilnd stopped");
  return 0;
}

}  // namespace kiln
