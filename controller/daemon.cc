#include "controller/daemon.h"

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <functional>
#include <sys/stat.h>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>
#include <iostream>

#include "common/clock.h"
#include "common/duration.h"
#include "common/logging.h"
#include "controller/api_server.h"
#include "controller/http_server.h"
#include "controller/metrics.h"
#include "controller/manifest.h"
#include "controller/manifest_watcher.h"
#include "controller/reconciler.h"
#include "controller/work_queue.h"
#include "deploy/artifact_store.h"
#include "deploy/process_driver.h"
#include "deploy/prober.h"
#include "kiln/version.h"
#include "storage/sqlite_state_store.h"

namespace kiln {
namespace fs = std::filesystem;

namespace {

struct DaemonFlags {
  std::string manifests;
  std::string state;
  std::string driver = "process";
  std::string port_range = "20000-29999";
  std::string resync = "30s";
  std::string stop_grace = "10s";
  std::string grpc_listen;
  std::string tls_cert, tls_key, client_ca, tokens;
  int64_t event_retention = 100'000;
  std::string http_listen = "127.0.0.1:9090";
  std::string http_read_timeout = "10s";
  int http_max_connections = 256;
  std::string log_format = "text";
  std::string log_level = "info";
};

// Hashes artifacts once per (path, size, mtime, inode): manifest reloads do not re-read
// unchanged binaries. One entry per path, so the cache stays as large as the manifests' paths.
// Hashing is copying into the content-addressed store (ArtifactStore::Put hashes while it
// copies): the reconciler's later Put of the same digest then finds it stored and reads
// nothing, so no artifact is ever read on the event thread in the common case.
// Used by the manifest loader's thread only.
class CachingHasher {
 public:
  explicit CachingHasher(ArtifactStore& store) : store_(store) {}

  StatusOr<std::string> operator()(const fs::path& p) {
    struct stat st {};
    // Put refuses what is not a regular file, or too large; its errors name the path.
    if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return store_.Put(p);
    Stamp stamp{st.st_size, st.st_mtim.tv_sec * 1'000'000'000LL + st.st_mtim.tv_nsec, st.st_ino};
    auto it = cache_.find(p.string());
    if (it != cache_.end() && it->second.first == stamp && store_.Has(it->second.second)) {
      return it->second.second;
    }
    ASSIGN_OR_RETURN(std::string digest, store_.Put(p));
    cache_[p.string()] = {stamp, digest};
    return digest;
  }

 private:
  ArtifactStore& store_;
  using Stamp = std::tuple<off_t, int64_t, ino_t>;
  std::map<std::string, std::pair<Stamp, std::string>> cache_;
};

// Runs manifest loads (reading files, hashing artifacts: seconds for a large artifact) on a
// thread of its own, never on the event thread, and hands each result to `apply` on the event
// thread. One load at a time; requests that arrive during a load are folded into one more load
// after it, so the last change is always read.
class BackgroundLoader {
 public:
  BackgroundLoader(boost::asio::io_context& io, std::function<ManifestSet()> load,
                   std::function<void(ManifestSet)> apply)
      : io_(io), load_(std::move(load)), apply_(std::move(apply)), thread_([this] { Run(); }) {}
  ~BackgroundLoader() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  BackgroundLoader(const BackgroundLoader&) = delete;
  BackgroundLoader& operator=(const BackgroundLoader&) = delete;

  // Any thread.
  void Request() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ = true;
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return pending_ || stopping_; });
        if (stopping_) return;
        pending_ = false;
      }
      ManifestSet set = load_();
      boost::asio::post(io_, [this, set = std::move(set)]() mutable { apply_(std::move(set)); });
    }
  }

  boost::asio::io_context& io_;
  std::function<ManifestSet()> load_;
  std::function<void(ManifestSet)> apply_;
  std::mutex mu_;  // guards pending_ and stopping_
  std::condition_variable cv_;
  bool pending_ = false;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once everything above is initialised
};

// Logs what a manifest load found: each service with its template hash.
void LogManifestSet(const ManifestSet& set) {
  for (const ServiceSpec* s : set.Services()) {
    LogInfo("service loaded", {{"service", s->name},
                               {"version", s->tmpl.version},
                               {"replicas", s->replicas},
                               {"strategy", StrategyName(s->update.strategy)},
                               {"template_hash", s->tmpl.Hash()},
                               {"file", s->file}});
  }
  LogInfo("manifests loaded", {{"dir", set.dir},
                               {"services", static_cast<int64_t>(set.Services().size())},
                               {"errors", static_cast<int64_t>(set.AllErrors().size())}});
}

bool ParsePortRange(const std::string& s, int* first, int* last) {
  return std::sscanf(s.c_str(), "%d-%d", first, last) == 2 && *first > 0 && *first <= *last &&
         *last <= 65535;
}

}  // namespace

int RunDaemon(int argc, char** argv) {
  DaemonFlags flags;
  CLI::App app("kilnd: converges services declared in manifests by replacing instances", "kilnd");
  app.set_version_flag("--version", std::string("kilnd ") + kVersion);
  app.add_option("--manifests", flags.manifests, "directory of *.yaml service manifests")
      ->required();
  app.add_option("--state", flags.state, "state directory (kiln.db, artifacts, logs)")->required();
  app.add_option("--driver", flags.driver, "instance driver")->check(CLI::IsMember({"process"}));
  app.add_option("--port-range", flags.port_range, "ports for instances, FIRST-LAST");
  app.add_option("--resync", flags.resync, "period of the full resync, e.g. 30s");
  app.add_option("--stop-grace", flags.stop_grace, "SIGTERM to SIGKILL when stopping an instance");
  app.add_option("--grpc-listen", flags.grpc_listen,
                 "also serve the API on TCP HOST:PORT (off loopback only with TLS and tokens)");
  app.add_option("--tls-cert", flags.tls_cert, "PEM certificate for the TCP listener");
  app.add_option("--tls-key", flags.tls_key, "PEM private key for the TCP listener");
  app.add_option("--client-ca", flags.client_ca, "PEM CA: require client certificates it signed");
  app.add_option("--tokens", flags.tokens, "file of \"TOKEN ROLE NAME\" lines (viewer|operator)");
  app.add_option("--http-listen", flags.http_listen,
                 "metrics, health, /api/v1 and the dashboard on HOST:PORT (\"\" for none)");
  app.add_option("--http-read-timeout", flags.http_read_timeout, "drop an HTTP client that sends nothing for this long");
  app.add_option("--http-max-connections", flags.http_max_connections, "HTTP connections at once")
      ->check(CLI::Range(1, 100000));
  app.add_option("--event-retention", flags.event_retention, "events kept (older ones are pruned)")
      ->check(CLI::Range(int64_t{1}, int64_t{100'000'000}));
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
  int port_first = 0, port_last = 0;
  if (!ParsePortRange(flags.port_range, &port_first, &port_last)) {
    std::cerr << "kilnd: --port-range: expected FIRST-LAST within 1-65535, got \"" << flags.port_range
              << "\"\n";
    return 2;
  }
  StatusOr<Duration> resync = ParseDuration(flags.resync);
  StatusOr<Duration> stop_grace = ParseDuration(flags.stop_grace);
  if (!resync.ok() || !stop_grace.ok()) {
    std::cerr << "kilnd: " << (!resync.ok() ? "--resync: " + resync.status().message()
                                            : "--stop-grace: " + stop_grace.status().message())
              << "\n";
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
  Metrics metrics;
  DeclareKilnMetrics(metrics);
  SqliteStateStore::Options store_options;
  store_options.on_commit = [&metrics](double seconds) {
    metrics.Observe("kiln_store_commit_duration_seconds", {}, seconds);
  };
  store_options.path = (fs::path(flags.state) / "kiln.db").string();
  store_options.clock = &clock;
  auto store = SqliteStateStore::Open(store_options);
  if (!store.ok()) {
    LogError("cannot open state store", {{"error", store.status().message()}});
    return 1;
  }
  LogInfo("state store open", {{"path", store_options.path},
                               {"schema_version", SqliteStateStore::CurrentSchemaVersion()}});
  auto artifacts = ArtifactStore::Open(fs::path(flags.state) / "artifacts");
  if (!artifacts.ok()) {
    LogError("cannot open artifact store", {{"error", artifacts.status().message()}});
    return 1;
  }

  boost::asio::io_context io;
  ProcessDriver::Options driver_options;
  driver_options.log_dir = fs::path(flags.state) / "logs";
  driver_options.artifacts = &*artifacts;
  driver_options.port_first = port_first;
  driver_options.port_last = port_last;
  driver_options.controller_id = ControllerIdForStateDir(flags.state);
  ProcessDriver driver(io, driver_options);
  Prober prober(io);

  Reconciler* reconciler_ptr = nullptr;
  WorkQueue::Options queue_options;
  queue_options.resync = *resync;
  std::string last_store_error;  // readiness: the store refused the last write
  WorkQueue queue(
      io, queue_options,
      [&](const std::string& name) {
        const auto begin = std::chrono::steady_clock::now();
        Status s = reconciler_ptr->Reconcile(name);
        metrics.Observe("kiln_reconcile_duration_seconds", {},
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count());
        metrics.Add("kiln_reconcile_passes_total", {{"result", s.ok() ? "ok" : "error"}});
        if (s.ok()) {
          last_store_error.clear();
        } else if (s.message().find(store_options.path) != std::string::npos) {
          last_store_error = s.message();
        }
        return s;
      },
      [&] { return reconciler_ptr->ServiceNames(); });
  Reconciler::Options rec_options;
  rec_options.stop_grace = *stop_grace;
  rec_options.on_event = [&metrics](const EventRecord& e) {
    if (e.kind == "rollout_completed") metrics.Add("kiln_rollouts_total", {{"result", "completed"}});
    if (e.kind == "rollout_failed") metrics.Add("kiln_rollouts_total", {{"result", "failed"}});
    if (e.kind == "rolled_back") {
      metrics.Add("kiln_rollbacks_total", {{"trigger", e.actor == "auto" ? "automatic" : "manual"}});
    }
    if (e.kind == "instance_unhealthy") metrics.Add("kiln_probe_failures_total", {{"service", e.service}});
    if (e.kind == "instance_start_failed") metrics.Add("kiln_driver_errors_total", {{"service", e.service}});
  };
  Reconciler reconciler(**store, driver, prober, *artifacts, clock, queue, rec_options);
  reconciler_ptr = &reconciler;

  if (Status s = reconciler.Recover(); !s.ok()) {
    LogError("cannot recover instances at start-up", {{"error", s.ToString()}});
    return 1;
  }

  // Loads read files and hash artifacts on the loader's thread; the reconciler gets each result
  // on this (the event) thread. Until the first arrives, it works from the desired state the
  // store remembers, and /readyz says the manifests are not loaded yet.
  CachingHasher hasher(*artifacts);
  ArtifactHasher hash_fn = [&hasher](const fs::path& p) { return hasher(p); };
  BackgroundLoader loader(
      io, [&] { return LoadManifestDir(flags.manifests, hash_fn); },
      [&](ManifestSet set) {
        LogManifestSet(set);
        metrics.Add("kiln_manifest_errors_total", {}, static_cast<double>(set.AllErrors().size()));
        reconciler.ApplyManifests(set);
      });
  loader.Request();
  ManifestWatcher watcher(io, flags.manifests, Duration(50), [&] { loader.Request(); });
  watcher.Start();
  queue.Start();

  ApiServer::Options api_options;
  api_options.unix_socket = (fs::path(flags.state) / "kiln.sock").string();
  api_options.tcp_listen = flags.grpc_listen;
  api_options.tls_cert = flags.tls_cert;
  api_options.tls_key = flags.tls_key;
  api_options.client_ca = flags.client_ca;
  api_options.tokens_file = flags.tokens;
  api_options.metrics = &metrics;
  auto api = ApiServer::Start(api_options, io, reconciler, [&] { return (*store)->OpenReader(); });
  if (!api.ok()) {
    LogError("cannot start the API", {{"error", api.status().message()}});
    return 1;
  }

  // HTTP: metrics, health, /api/v1 and the dashboard, on this thread with its own reader.
  bool shutting_down = false;
  auto http_reader = (*store)->OpenReader();
  if (!http_reader.ok()) {
    LogError("cannot open a reader for HTTP", {{"error", http_reader.status().message()}});
    return 1;
  }
  metrics.SetCollector("kiln_workqueue_depth", [&] {
    return std::vector<std::pair<Labels, double>>{{{}, static_cast<double>(queue.Depth())}};
  });
  metrics.SetCollector("kiln_workqueue_retries_total", [&] {
    return std::vector<std::pair<Labels, double>>{{{}, static_cast<double>(queue.Retries())}};
  });
  metrics.SetCollector("kiln_instances", [&] {
    std::vector<std::pair<Labels, double>> out;
    auto counts = (*http_reader)->CountInstances();
    if (counts.ok()) {
      for (const auto& c : *counts) {
        out.push_back({{{"service", c.service}, {"revision", std::to_string(c.revision)},
                        {"state", std::string(InstanceStateName(c.state))}},
                       static_cast<double>(c.count)});
      }
    }
    return out;
  });
  std::unique_ptr<HttpServer> http;
  if (!flags.http_listen.empty()) {
    HttpServer::Options http_options;
    http_options.listen = flags.http_listen;
    http_options.max_connections = flags.http_max_connections;
    StatusOr<Duration> read_timeout = ParseDuration(flags.http_read_timeout);
    if (!read_timeout.ok()) {
      std::cerr << "kilnd: --http-read-timeout: " << read_timeout.status().message() << "\n";
      return 2;
    }
    http_options.read_timeout = *read_timeout;
    HttpServer::Sources sources;
    sources.metrics = [&] { return metrics.Render(); };
    sources.reader = http_reader->get();
    sources.readiness = [&] {
      const bool store_ok = last_store_error.empty();
      const bool loaded = reconciler.manifests_loaded();
      HttpServer::Readiness r;
      r.ready = store_ok && loaded && !shutting_down;
      nlohmann::json j = {{"ready", r.ready},
                          {"checks",
                           {{"store_writable", {{"ok", store_ok}, {"error", last_store_error}}},
                            {"manifests_loaded", {{"ok", loaded}}},
                            {"not_shutting_down", {{"ok", !shutting_down}}}}}};
      r.json = j.dump();
      return r;
    };
    auto started = HttpServer::Start(io, http_options, std::move(sources));
    if (!started.ok()) {
      LogError("cannot start HTTP", {{"error", started.status().message()}});
      return 1;
    }
    http = std::move(started).value();
  }

  // Events are pruned by count, on the reconciler's thread like every write.
  boost::asio::steady_timer prune_timer(io);
  std::function<void()> prune = [&] {
    prune_timer.expires_after(*resync);
    prune_timer.async_wait([&](const boost::system::error_code& err) {
      if (err) return;
      auto pruned = (*store)->PruneEvents(flags.event_retention);
      if (pruned.ok() && *pruned > 0) LogInfo("events pruned", {{"pruned", *pruned}});
      prune();
    });
  };
  prune();

  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& err, int signo) {
    if (err) return;
    // Finish nothing new: the current step has already run (one thread); instances keep running.
    LogInfo("shutting down; instances keep running", {{"signal", signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
    shutting_down = true;
    io.stop();
  });
  LogInfo("kilnd ready", {{"version", kVersion}, {"pid", static_cast<int64_t>(::getpid())}});
  io.run();
  (*api)->Shutdown();
  LogInfo("kilnd stopped");
  return 0;
}

}  // namespace kiln
