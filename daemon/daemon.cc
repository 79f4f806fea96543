#include "daemon/daemon.h"

#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <tuple>

#include "api/api_server.h"
#include "api/tokens.h"
#include "common/clock.h"
#include "common/descriptors.h"
#include "common/duration.h"
#include "common/logging.h"
#include "common/time_source.h"
#include "controller/reconciler.h"
#include "controller/work_queue.h"
#include "daemon/kiln_metrics.h"
#include "deploy/artifact_store.h"
#include "deploy/prober.h"
#include "deploy/process_driver.h"
#include "http/http_server.h"
#include "kiln/version.h"
#include "spec/manifest.h"
#include "spec/manifest_watcher.h"
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
  std::string retire_after = "60s";
  std::string verify_artifacts = "10m";
  std::string grpc_listen;
  std::string tls_cert, tls_key, client_ca, tokens;
  int64_t event_retention = 100'000;
  std::string http_listen = "127.0.0.1:" + std::to_string(HttpServer::kDefaultPort);
  std::string http_header_timeout = "5s";
  std::string http_read_timeout = "10s";
  int http_max_connections = 256;
  bool http_metrics_auth = false;
  std::string grpc_idle_timeout = "5m";
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

// Logs what a manifest load found: each service with its template hash. A load that finds what
// the last one found (a missing directory is read again every second) logs nothing.
void LogManifestSet(const ManifestSet& set, std::string& last_logged) {
  std::string summary = set.dir + "|" + std::to_string(set.AllErrors().size());
  for (const ServiceSpec* s : set.Services()) {
    summary += "|" + s->name + "=" + s->tmpl.Hash() + "x" + std::to_string(s->replicas) + "," +
               std::string(StrategyName(s->update.strategy));
  }
  for (const auto& e : set.AllErrors()) summary += "|" + e.ToString();
  if (summary == last_logged) return;
  last_logged = std::move(summary);
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
  app.add_option("--retire-after", flags.retire_after,
                 "retire a service this long after its manifest document is gone (0s: at once)");
  app.add_option("--verify-artifacts", flags.verify_artifacts,
                 "re-hash every artifact in use this often, and at start-up (0s: only on start)");
  app.add_option("--grpc-listen", flags.grpc_listen,
                 "also serve the API on TCP HOST:PORT (off loopback only with TLS and tokens)");
  app.add_option("--grpc-idle-timeout", flags.grpc_idle_timeout,
                 "close a gRPC TCP connection with no call for this long");
  app.add_option("--tls-cert", flags.tls_cert,
                 "PEM certificate for the gRPC TCP and HTTP listeners");
  app.add_option("--tls-key", flags.tls_key, "PEM private key for the gRPC TCP and HTTP listeners");
  app.add_option("--client-ca", flags.client_ca, "PEM CA: require client certificates it signed");
  app.add_option("--tokens", flags.tokens,
                 "file of \"TOKEN ROLE NAME\" lines (viewer|operator); the API, /api/v1 and the "
                 "dashboard then need one");
  app.add_option("--http-listen", flags.http_listen,
                 "metrics, health, /api/v1 and the dashboard on HOST:PORT (\"\" for none; off "
                 "loopback only with TLS and tokens)");
  app.add_option("--http-header-timeout", flags.http_header_timeout,
                 "an HTTP client must send a request's headers within this");
  app.add_option("--http-read-timeout", flags.http_read_timeout,
                 "an HTTP request's body, and writing the response, within this");
  app.add_option("--http-max-connections", flags.http_max_connections,
                 "HTTP connections at once (at the cap, a new one evicts the longest idle)")
      ->check(CLI::Range(1, 100000));
  app.add_flag("--http-metrics-auth", flags.http_metrics_auth,
               "with --tokens, /metrics needs a token too");
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
    std::cerr << "kilnd: --port-range: expected FIRST-LAST within 1-65535, got \""
              << flags.port_range << "\"\n";
    return 2;
  }
  StatusOr<Duration> resync = ParseDuration(flags.resync);
  StatusOr<Duration> stop_grace = ParseDuration(flags.stop_grace);
  StatusOr<Duration> retire_after = ParseDuration(flags.retire_after);
  StatusOr<Duration> verify_artifacts = ParseDuration(flags.verify_artifacts);
  for (const auto& [flag, d] :
       {std::pair{"--resync", &resync}, std::pair{"--stop-grace", &stop_grace},
        std::pair{"--retire-after", &retire_after},
        std::pair{"--verify-artifacts", &verify_artifacts}}) {
    if (!d->ok()) {
      std::cerr << "kilnd: " << flag << ": " << d->status().message() << "\n";
      return 2;
    }
  }

  StatusOr<Duration> http_header_timeout = ParseDuration(flags.http_header_timeout);
  StatusOr<Duration> http_read_timeout = ParseDuration(flags.http_read_timeout);
  StatusOr<Duration> grpc_idle_timeout = ParseDuration(flags.grpc_idle_timeout);
  for (const auto& [flag, d] : {std::pair{"--http-header-timeout", &http_header_timeout},
                                {"--http-read-timeout", &http_read_timeout},
                                {"--grpc-idle-timeout", &grpc_idle_timeout}}) {
    if (!d->ok() || **d <= Duration(0)) {
      std::cerr << "kilnd: " << flag << ": "
                << (d->ok() ? std::string("must be more than 0") : d->status().message()) << "\n";
      return 2;
    }
  }

  SetupLogging(*ParseLogFormat(flags.log_format), *ParseLogLevel(flags.log_level));

  // Nothing kilnd holds may reach an instance, including what it inherited itself.
  if (Status s = MarkInheritedCloseOnExec(); !s.ok()) {
    LogWarn("cannot mark inherited descriptors close-on-exec", {{"error", s.message()}});
  }

  // Many connections and instances need many descriptors; the soft limit a shell gives (1024)
  // is not what the administrator allows.
  uint64_t instance_nofile_soft = 0;  // what instances get: the limit kilnd was started with
  if (auto nofile = RaiseNofileLimit(); nofile.ok()) {
    instance_nofile_soft = nofile->soft_before;
    LogInfo("descriptor limit", {{"soft_before", static_cast<int64_t>(nofile->soft_before)},
                                 {"soft", static_cast<int64_t>(nofile->soft)},
                                 {"hard", static_cast<int64_t>(nofile->hard)}});
  } else {
    LogWarn("cannot raise the descriptor limit", {{"error", nofile.status().message()}});
  }

  // Tokens are checked by both listeners; a bad file stops start-up before anything is opened.
  std::optional<std::map<std::string, Caller>> tokens;
  if (!flags.tokens.empty()) {
    auto loaded = LoadTokens(flags.tokens);
    if (!loaded.ok()) {
      std::cerr << "kilnd: --tokens: " << loaded.status().message() << "\n";
      return 2;
    }
    tokens = std::move(loaded).value();
  }
  if (flags.http_metrics_auth && !tokens) {
    std::cerr << "kilnd: --http-metrics-auth needs --tokens\n";
    return 2;
  }
  HttpServer::Options http_options;
  http_options.listen = flags.http_listen;
  http_options.max_connections = flags.http_max_connections;
  http_options.header_timeout = *http_header_timeout;
  http_options.read_timeout = *http_read_timeout;
  http_options.tls_cert = flags.tls_cert;
  http_options.tls_key = flags.tls_key;
  http_options.client_ca = flags.client_ca;
  http_options.tokens = tokens;
  http_options.metrics_auth = flags.http_metrics_auth;
  if (!flags.http_listen.empty()) {
    // Before the store is opened or anything acts: a listener that must not start stops kilnd.
    if (Status s = HttpServer::CheckOptions(http_options); !s.ok()) {
      LogError("cannot start HTTP", {{"error", s.message()}});
      return 1;
    }
  }

  std::error_code ec;
  fs::create_directories(flags.state, ec);
  if (ec) {
    LogError("cannot create state directory", {{"path", flags.state}, {"error", ec.message()}});
    return 1;
  }

  RealTimeSource clock;  // time and timers for the store, queue, watcher, reconciler and API
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
  driver_options.instance_nofile_soft = instance_nofile_soft;
  ProcessDriver driver(io, driver_options);
  Prober prober(io);

  Reconciler* reconciler_ptr = nullptr;
  WorkQueue::Options queue_options;
  queue_options.resync = *resync;
  // Start-up recovery could not be recorded yet (a full disk): no pass acts until it is.
  bool recovered = false;
  std::string recovery_error;
  WorkQueue queue(
      io, clock, queue_options,
      [&](const std::string& name) {
        if (!recovered) return Status::Ok();  // recovery enqueues every service when it is done
        const auto begin = std::chrono::steady_clock::now();
        Status s = reconciler_ptr->Reconcile(name);
        metrics.Observe(
            "kiln_reconcile_duration_seconds", {},
            std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count());
        metrics.Add("kiln_reconcile_passes_total", {{"result", s.ok() ? "ok" : "error"}});
        return s;
      },
      [&] { return reconciler_ptr->ServiceNames(); });
  Reconciler::Options rec_options;
  rec_options.stop_grace = *stop_grace;
  rec_options.retire_after = *retire_after;
  rec_options.on_probe = [&metrics](const std::string& service, const ProbeResult& r) {
    if (r.local_error) {
      metrics.Add("kiln_probe_local_errors_total");
    } else if (!r.healthy) {
      metrics.Add("kiln_probe_failures_total", {{"service", service}});
    }
  };
  rec_options.on_event = [&metrics](const EventRecord& e) {
    if (e.kind == "rollout_completed")
      metrics.Add("kiln_rollouts_total", {{"result", "completed"}});
    if (e.kind == "rollout_failed") metrics.Add("kiln_rollouts_total", {{"result", "failed"}});
    if (e.kind == "rolled_back") {
      metrics.Add("kiln_rollbacks_total",
                  {{"trigger", e.actor == "auto" ? "automatic" : "manual"}});
    }
    if (e.kind == "instance_start_failed")
      metrics.Add("kiln_driver_errors_total", {{"service", e.service}});
    if (e.kind == "instance_exited")
      metrics.Add("kiln_instance_failures_total", {{"service", e.service}, {"how", "exited"}});
    if (e.kind == "instance_start_failed")
      metrics.Add("kiln_instance_failures_total",
                  {{"service", e.service}, {"how", "start_failed"}});
    if (e.kind == "instance_failed")
      metrics.Add("kiln_instance_failures_total", {{"service", e.service}, {"how", "failed"}});
    if (e.kind == "instance_unhealthy")
      metrics.Add("kiln_instance_failures_total", {{"service", e.service}, {"how", "unhealthy"}});
    if (e.kind == "artifact_drift") metrics.Add("kiln_artifact_drift_total");
  };
  Reconciler reconciler(**store, driver, prober, *artifacts, clock, queue, rec_options);
  reconciler_ptr = &reconciler;

  // Recovery records what it finds (adoptions, lost instances). When the store cannot take
  // writes (a full disk), kilnd starts all the same and serves status, takes no action it could
  // not record, and retries every second; instances keep running meanwhile.
  boost::asio::steady_timer recover_timer(io);
  std::function<void()> try_recover = [&] {
    Status s = reconciler.Recover();
    if (s.ok()) {
      if (!recovery_error.empty()) LogInfo("start-up recovery recorded; acting again");
      recovery_error.clear();
      recovered = true;
      return;
    }
    if (recovery_error != s.ToString()) {
      LogError("cannot record start-up recovery; serving status, retrying every second",
               {{"error", s.ToString()}});
    }
    recovery_error = s.ToString();
    recover_timer.expires_after(std::chrono::seconds(1));
    recover_timer.async_wait([&](const boost::system::error_code& err) {
      if (!err) try_recover();
    });
  };
  try_recover();

  // Loads read files and hash artifacts on the loader's thread; the reconciler gets each result
  // on this (the event) thread. Until the first arrives, it works from the desired state the
  // store remembers, and /readyz says the manifests are not loaded yet.
  CachingHasher hasher(*artifacts);
  std::function<void()> publish_now;  // what HTTP shows, refreshed at once (set below)
  std::string last_logged_set;
  ArtifactHasher hash_fn = [&hasher](const fs::path& p) { return hasher(p); };
  BackgroundLoader loader(
      io, [&] { return LoadManifestDir(flags.manifests, hash_fn); },
      [&](ManifestSet set) {
        LogManifestSet(set, last_logged_set);
        metrics.Add("kiln_manifest_errors_total", {}, static_cast<double>(set.AllErrors().size()));
        reconciler.ApplyManifests(set);
        if (publish_now) publish_now();  // readiness says so at once, not up to 200 ms later
      });
  loader.Request();
  ManifestWatcher watcher(io, clock, flags.manifests, Duration(50), [&] { loader.Request(); });
  watcher.Start();
  queue.Start();

  ApiServer::Options api_options;
  api_options.unix_socket = (fs::path(flags.state) / "kiln.sock").string();
  api_options.tcp_listen = flags.grpc_listen;
  api_options.tls_cert = flags.tls_cert;
  api_options.tls_key = flags.tls_key;
  api_options.client_ca = flags.client_ca;
  api_options.tokens_file = flags.tokens;
  api_options.idle_timeout = *grpc_idle_timeout;
  api_options.metrics = &metrics;
  api_options.clock = &clock;
  auto api = ApiServer::Start(api_options, io, reconciler, [&] { return (*store)->OpenReader(); });
  if (!api.ok()) {
    LogError("cannot start the API", {{"error", api.status().message()}});
    return 1;
  }

  // HTTP: metrics, health, /api/v1 and the dashboard, on a thread of its own with its own
  // reader, so that slow clients, TLS handshakes and store reads never hold up the reconciler,
  // and /healthz answers while it works. What HTTP shows of the reconciler's state is a snapshot
  // the reconciler's thread publishes.
  bool shutting_down = false;
  struct Published {
    std::mutex mu;  // guards everything below
    std::string store_error;
    bool manifests_loaded = false;
    bool recovered = false;
    std::string recovery_error;
    std::string local_probe_error;
    int64_t local_probe_error_ms = 0;
    bool shutting_down = false;
    size_t queue_depth = 0;
    int64_t queue_retries = 0;
    std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
  } published;
  auto publish = [&] {
    std::lock_guard lock(published.mu);
    // Whether the store took the last write (of a pass, an exit, a probe result, a command).
    published.store_error = (*store)->WriteFailure().message();
    published.manifests_loaded = reconciler.manifests_loaded();
    published.recovered = recovered;
    published.recovery_error = recovery_error;
    published.local_probe_error = reconciler.local_probe_error().message;
    published.local_probe_error_ms = reconciler.local_probe_error().time_ms;
    published.shutting_down = shutting_down;
    published.queue_depth = queue.Depth();
    published.queue_retries = queue.Retries();
    published.at = std::chrono::steady_clock::now();
  };
  publish();
  publish_now = publish;
  boost::asio::steady_timer publish_timer(io);
  std::function<void()> publish_every = [&] {
    publish_timer.expires_after(std::chrono::milliseconds(200));
    publish_timer.async_wait([&](const boost::system::error_code& err) {
      if (err) return;
      publish();
      publish_every();
    });
  };
  publish_every();
  auto http_reader = (*store)->OpenReader();
  if (!http_reader.ok()) {
    LogError("cannot open a reader for HTTP", {{"error", http_reader.status().message()}});
    return 1;
  }
  metrics.SetCollector("kiln_workqueue_depth", [&] {
    std::lock_guard lock(published.mu);
    return std::vector<std::pair<Labels, double>>{{{}, static_cast<double>(published.queue_depth)}};
  });
  metrics.SetCollector("kiln_workqueue_retries_total", [&] {
    std::lock_guard lock(published.mu);
    return std::vector<std::pair<Labels, double>>{
        {{}, static_cast<double>(published.queue_retries)}};
  });
  metrics.SetCollector("kiln_service_crash_loop_failures", [&] {
    std::vector<std::pair<Labels, double>> out;
    if (auto services = (*http_reader)->ListServices(); services.ok()) {
      for (const auto& s : *services) {
        if (!s.retired) out.push_back({{{"service", s.name}}, static_cast<double>(s.crash_count)});
      }
    }
    return out;
  });
  metrics.SetCollector("kiln_service_start_backoff_seconds", [&] {
    std::vector<std::pair<Labels, double>> out;
    const int64_t now = ToUnixMillis(clock.SystemNow());
    if (auto services = (*http_reader)->ListServices(); services.ok()) {
      for (const auto& s : *services) {
        if (s.retired) continue;
        const double left = s.next_start_ms > now ? (s.next_start_ms - now) / 1000.0 : 0;
        out.push_back({{{"service", s.name}}, left});
      }
    }
    return out;
  });
  metrics.SetCollector("kiln_instances", [&] {
    std::vector<std::pair<Labels, double>> out;
    auto counts = (*http_reader)->CountInstances();
    if (counts.ok()) {
      for (const auto& c : *counts) {
        out.push_back({{{"service", c.service},
                        {"revision", std::to_string(c.revision)},
                        {"state", std::string(InstanceStateName(c.state))}},
                       static_cast<double>(c.count)});
      }
    }
    return out;
  });
  boost::asio::io_context http_io;
  std::unique_ptr<HttpServer> http;
  if (!flags.http_listen.empty()) {
    HttpServer::Sources sources;
    sources.metrics = [&] { return metrics.Render(); };
    sources.reader = http_reader->get();
    sources.readiness = [&] {
      std::lock_guard lock(published.mu);
      const bool store_ok = published.store_error.empty();
      const bool loaded = published.manifests_loaded;
      // A reconciler that has not published for this long is stuck in one step.
      const auto silent = std::chrono::steady_clock::now() - published.at;
      const bool responsive = silent < std::chrono::seconds(10);
      // Probes kilnd could not run lately (its own descriptors or memory ran out).
      const bool probes_ok =
          published.local_probe_error.empty() ||
          ToUnixMillis(clock.SystemNow()) - published.local_probe_error_ms > 30'000;
      HttpServer::Readiness r;
      r.ready = store_ok && loaded && published.recovered && probes_ok && responsive &&
                !published.shutting_down;
      nlohmann::json j = {
          {"ready", r.ready},
          {"checks",
           {{"store_writable", {{"ok", store_ok}, {"error", published.store_error}}},
            {"recovered", {{"ok", published.recovered}, {"error", published.recovery_error}}},
            {"manifests_loaded", {{"ok", loaded}}},
            {"probes_runnable",
             {{"ok", probes_ok}, {"error", probes_ok ? "" : published.local_probe_error}}},
            {"reconciler_responsive",
             {{"ok", responsive},
              {"silent_ms",
               std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()}}},
            {"not_shutting_down", {{"ok", !published.shutting_down}}}}}};
      r.json = j.dump();
      return r;
    };
    auto started = HttpServer::Start(http_io, http_options, std::move(sources));
    if (!started.ok()) {
      LogError("cannot start HTTP", {{"error", started.status().message()}});
      return 1;
    }
    http = std::move(started).value();
  }
  // Stopped and joined before anything its handlers use goes (declared after all of it).
  struct HttpThread {
    boost::asio::io_context& io;
    std::thread thread;
    ~HttpThread() {
      io.stop();
      if (thread.joinable()) thread.join();
    }
  } http_thread{http_io, http ? std::thread([&http_io] { http_io.run(); }) : std::thread()};

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

  // Artifacts are re-hashed at start-up and every --verify-artifacts, off this thread (a large
  // artifact takes a while); results come back here, where a mismatch is handled as drift.
  boost::asio::thread_pool verifier(1);
  boost::asio::steady_timer verify_timer(io);
  std::function<void()> verify = [&] {
    if (recovered) {
      for (const std::string& digest : reconciler.ArtifactsInUse()) {
        boost::asio::post(verifier, [&, digest] {
          auto identity = Reconciler::IdentityOf((*artifacts).PathFor(digest));
          Status v = (*artifacts).Verify(digest);
          boost::asio::post(io, [&, digest, v, identity] {
            metrics.Add("kiln_artifact_verifications_total",
                        {{"result", v.ok()                              ? "ok"
                                    : v.code() == StatusCode::kNotFound ? "missing"
                                                                        : "mismatch"}});
            reconciler.OnArtifactVerified(digest, v, identity);
          });
        });
      }
    }
    if (verify_artifacts->count() == 0) return;
    verify_timer.expires_after(recovered ? *verify_artifacts : Duration(1000));
    verify_timer.async_wait([&](const boost::system::error_code& err) {
      if (!err) verify();
    });
  };
  verify();

  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& err, int signo) {
    if (err) return;
    // Finish nothing new: the current step has already run (one thread); instances keep running.
    LogInfo("shutting down; instances keep running",
            {{"signal", signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
    shutting_down = true;
    publish();
    io.stop();
  });
  LogInfo("kilnd ready", {{"version", kVersion}, {"pid", static_cast<int64_t>(::getpid())}});
  io.run();
  verifier.stop();
  verifier.join();
  (*api)->Shutdown();
  LogInfo("kilnd stopped");
  return 0;
}

}  // namespace kiln
