#include "daemon/daemon.h"

#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <thread>

#include "api/api_server.h"
#include "common/atomic_file.h"
#include "common/clock.h"
#include "common/descriptors.h"
#include "common/duration.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/time_source.h"
#include "controller/endpoints_hub.h"
#include "controller/reconciler.h"
#include "controller/work_queue.h"
#include "daemon/kiln_metrics.h"
#include "daemon/manifest_loader.h"
#include "daemon/notifier.h"
#include "daemon/proxy_supervisor.h"
#include "daemon/readiness.h"
#include "deploy/artifact_store.h"
#include "deploy/docker_driver.h"
#include "deploy/docker_hosts.h"
#include "deploy/instance_logs.h"
#include "deploy/prober.h"
#include "deploy/process_driver.h"
#include "deploy/routing_driver.h"
#include "git/commit_finder.h"
#include "git/git_source.h"
#include "http/http_server.h"
#include "kiln/version.h"
#include "spec/manifest.h"
#include "spec/manifest_watcher.h"
#include "spec/template.h"
#include "storage/sqlite_state_store.h"

namespace kiln {
namespace fs = std::filesystem;

namespace {

// Names this run of kilnd for the proxies (EndpointsSnapshot.kilnd_id): a proxy that sees a new
// one resynchronises from a whole snapshot.
std::string NewKilndId() {
  std::random_device rd;
  const uint64_t bits = (static_cast<uint64_t>(rd()) << 32) | rd();
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(bits));
  return buf;
}

// "HOST:PORT" of a listen address with the port it was bound to (port 0 picks one).
std::string BoundAddress(const std::string& listen, int port) {
  return listen.substr(0, listen.rfind(':')) + ":" + std::to_string(port);
}

// The token in `path` (its first line), made (random, mode 0600) when the file does not exist.
StatusOr<std::string> EnsureToken(const fs::path& path) {
  if (std::ifstream in(path); in) {
    std::string token;
    std::getline(in, token);
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) {
      token.pop_back();
    }
    if (token.size() >= 16) return token;
  }
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  if (ec) return UnavailableError(path.parent_path().string() + ": " + ec.message());
  const std::string token = NewKilndId() + NewKilndId();  // 128 bits from std::random_device
  RETURN_IF_ERROR(WriteFileAtomically(path, token + "\n", Durability::kSynced, 0600));
  return token;
}

// A program installed beside kilnd's own executable (how kiln-proxy is found by default).
fs::path BesideSelf(const std::string& name) {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::path(name) : self.parent_path() / name;
}

}  // namespace

// Everything kilnd runs, in the order it is made; members are destroyed in reverse, so nothing
// goes while something made after it may still use it.
struct Daemon::Impl {
  explicit Impl(const DaemonConfig& c) : config(c) {}

  Status Init();
  void TryRecover();
  void Publish();
  // Whether a proxy still has a connection open (a retired service's last ones draining).
  bool ProxyHasOpenConnections() const;
  void PublishEvery();
  // --prometheus-sd-file: rewritten shortly after an instance event (a burst of them, once),
  // once its pass has committed; only when what it says changed.
  void ScheduleSdFile(std::chrono::milliseconds delay = std::chrono::milliseconds(100));
  void WriteSdFile();
  void Prune();
  void Verify();
  // One manifest load (the loader's thread): with a git source, fetch and check out first.
  ManifestSet LoadManifests();
  void PollGit();
  // Any thread (kilnctl sync, POST /api/v1/sync): a fetch now; returns its number.
  int64_t RequestGitFetch();
  // `how` says what happens to the instances ("instances keep running").
  void ShutDown(const char* signal_name, const char* how = "instances keep running");
  // --stop-instances-on-exit: no pass runs any more (shutting_down), every instance the driver
  // lists is stopped, again until none is left (a start under way when the signal came), then
  // kiln-proxy; then ShutDown.
  void StopEverythingThenShutDown(const char* signal_name);
  void StopInstancesRound(const char* signal_name, int round, int64_t stopped);
  void StopProxyThenShutDown(const char* signal_name, int64_t stopped, int waited_ms);

  const DaemonConfig config;
  RealTimeSource clock;  // time and timers for the store, queue, watcher, reconciler and API
  Metrics metrics;
  // Pools of exposed services and proxies' reports; outlives the API that serves them.
  std::unique_ptr<EndpointsHub> endpoints;
  std::unique_ptr<SqliteStateStore> store;
  std::optional<ArtifactStore> artifacts;
  boost::asio::io_context io;
  std::unique_ptr<RoutingDriver> driver;      // processes, and containers with --docker-host
  DockerHostsDriver* docker_hosts = nullptr;  // the driver's container part; null: none
  std::unique_ptr<LogRotator> log_rotator;    // caps STATE/logs/*.log
  std::unique_ptr<Prober> prober;
  // --notify: webhooks, on a thread of their own; made before the reconciler that feeds it.
  std::unique_ptr<Notifier> notifier;
  // Start-up recovery could not be recorded yet (a full disk): no pass acts until it is.
  bool recovered = false;
  std::string recovery_error;
  std::unique_ptr<WorkQueue> queue;
  std::unique_ptr<Reconciler> reconciler;
  boost::asio::steady_timer recover_timer{io};
  std::unique_ptr<CachingHasher> hasher;
  // The commit that last changed each manifest file (a directory in a git work tree); used on
  // the loader's thread only.
  std::unique_ptr<git::CommitFinder> commits;
  std::string last_logged_set;
  // --manifests git+URL#BRANCH: fetched and checked out on the loader's thread.
  std::unique_ptr<git::Source> git_source;
  std::unique_ptr<BackgroundLoader> loader;
  std::unique_ptr<ManifestWatcher> watcher;  // a manifest directory (not git) only
  boost::asio::steady_timer git_poll_timer{io};
  std::unique_ptr<ApiServer> api;
  // kiln-proxy (--proxy managed): wanted while a service has a stable address; left running
  // when kilnd stops.
  std::unique_ptr<ProxySupervisor> proxy;
  bool shutting_down = false;
  PublishedState published;
  boost::asio::steady_timer publish_timer{io};
  std::unique_ptr<StateReader> http_reader;
  boost::asio::io_context http_io;
  std::unique_ptr<HttpServer> http;
  // Stopped and joined before anything its handlers use goes (declared after all of it).
  struct HttpThread {
    boost::asio::io_context& io;
    std::thread thread;
    ~HttpThread() {
      io.stop();
      if (thread.joinable()) thread.join();
    }
  } http_thread{http_io, {}};
  boost::asio::steady_timer prune_timer{io};
  boost::asio::thread_pool verifier{1};
  boost::asio::steady_timer verify_timer{io};
  std::optional<boost::asio::signal_set> signals;
  boost::asio::steady_timer stop_timer{io};  // --stop-instances-on-exit: waits for kiln-proxy
  bool addr_written = false;
  std::unique_ptr<StateReader> sd_reader;
  boost::asio::steady_timer sd_timer{io};
  bool sd_scheduled = false;
  std::string sd_written;  // what the file holds
  std::string sd_error;    // the last error writing it, logged once
};

Status Daemon::Impl::Init() {
  std::error_code ec;
  fs::create_directories(config.state, ec);
  if (ec) {
    LogError("cannot create state directory",
             {{"path", config.state.string()}, {"error", ec.message()}});
    return UnavailableError("cannot create state directory " + config.state.string() + ": " +
                            ec.message());
  }

  DeclareKilnMetrics(metrics);
  SqliteStateStore::Options store_options;
  store_options.on_commit = [this](double seconds) {
    metrics.Observe("kiln_store_commit_duration_seconds", {}, seconds);
  };
  store_options.path = (config.state / "kiln.db").string();
  store_options.clock = &clock;
  auto opened = SqliteStateStore::Open(store_options);
  if (!opened.ok()) {
    LogError("cannot open state store", {{"error", opened.status().message()}});
    return opened.status().WithContext("cannot open state store");
  }
  store = std::move(opened).value();
  LogInfo("state store open", {{"path", store_options.path},
                               {"schema_version", SqliteStateStore::CurrentSchemaVersion()}});
  auto artifact_store = ArtifactStore::Open(config.state / "artifacts");
  if (!artifact_store.ok()) {
    LogError("cannot open artifact store", {{"error", artifact_store.status().message()}});
    return artifact_store.status().WithContext("cannot open artifact store");
  }
  artifacts.emplace(std::move(artifact_store).value());

  ProcessDriver::Options driver_options;
  driver_options.log_dir = config.state / "logs";
  driver_options.artifacts = &*artifacts;
  driver_options.port_first = config.port_first;
  driver_options.port_last = config.port_last;
  driver_options.controller_id = ControllerIdForStateDir(config.state);
  driver_options.instance_nofile_soft = config.instance_nofile_soft;
  std::unique_ptr<DockerHostsDriver> containers;
  if (!config.docker_hosts.empty()) {
    DockerHostsDriver::Options docker_options;
    StatusOr<std::vector<DockerHostConfig>> hosts = ParseDockerHostFlags(config.docker_hosts);
    if (!hosts.ok()) return hosts.status().WithContext("--docker-host");
    docker_options.hosts = std::move(hosts).value();
    docker_options.controller_id = driver_options.controller_id;
    docker_options.down_after = config.docker_host_timeout;
    docker_options.ping_timeout = std::min(config.docker_host_timeout, Duration{2000});
    docker_options.ping_interval = std::min(config.docker_host_timeout / 4, Duration{1000});
    StatusOr<std::unique_ptr<DockerHostsDriver>> made =
        DockerHostsDriver::Create(io, docker_options);
    if (!made.ok()) return made.status().WithContext("--docker-host");
    containers = std::move(made).value();
    docker_hosts = containers.get();
    for (const DockerHostConfig& h : docker_options.hosts) {
      LogInfo("image services run on a Docker host",
              {{"docker_host", h.name}, {"engine", h.endpoint}});
    }
  }
  driver = std::make_unique<RoutingDriver>(io, std::make_unique<ProcessDriver>(io, driver_options),
                                           std::move(containers));
  // After the driver, which makes the directory. kilnd is not in the instances' write path: a
  // log keeps growing while kilnd is down and is capped at the first check after it starts.
  log_rotator =
      std::make_unique<LogRotator>(LogRotator::Options{.log_dir = driver_options.log_dir,
                                                       .max_bytes = config.log_max_bytes,
                                                       .max_files = config.log_max_files});
  prober = std::make_unique<Prober>(io);

  WorkQueue::Options queue_options;
  queue_options.resync = config.resync;
  queue_options.on_wait = [this](double seconds) {
    metrics.Observe("kiln_workqueue_wait_seconds", {}, seconds);
  };
  queue = std::make_unique<WorkQueue>(
      io, clock, queue_options,
      [this](const std::string& name) {
        if (!recovered) return Status::Ok();     // recovery enqueues every service when it is done
        if (shutting_down) return Status::Ok();  // stopping every instance: start none
        const auto begin = std::chrono::steady_clock::now();
        Status s = reconciler->Reconcile(name);
        metrics.Observe(
            "kiln_reconcile_duration_seconds", {},
            std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count());
        metrics.Add("kiln_reconcile_passes_total", {{"result", s.ok() ? "ok" : "error"}});
        return s;
      },
      [this] { return reconciler->ServiceNames(); });
  endpoints = std::make_unique<EndpointsHub>(clock, NewKilndId(), std::chrono::milliseconds(500));
  endpoints->SetOnReport([this] {
    boost::asio::post(io, [this] {
      if (reconciler && recovered) reconciler->OnProxyReport();
    });
  });
  if (!config.notify_urls.empty()) {
    Notifier::Options no;
    for (const std::string& url : config.notify_urls) {
      StatusOr<WebhookUrl> parsed = ParseWebhookUrl(url);
      if (!parsed.ok()) return parsed.status();
      no.urls.push_back(*parsed);
    }
    if (config.notify_on.empty()) {
      no.kinds = DefaultNotifyKinds();
    } else {
      StatusOr<std::set<EventKind>> kinds = ParseNotifyKinds(config.notify_on);
      if (!kinds.ok()) return kinds.status();
      no.kinds = *kinds;
    }
    no.services.insert(config.notify_services.begin(), config.notify_services.end());
    if (!config.notify_secret_file.empty()) {
      std::ifstream in(config.notify_secret_file);
      std::getline(in, no.secret);
      while (!no.secret.empty() && std::isspace(static_cast<unsigned char>(no.secret.back()))) {
        no.secret.pop_back();
      }
      if (no.secret.empty()) {
        return InvalidArgumentError("--notify-secret-file: " + config.notify_secret_file +
                                    " has no secret on its first line");
      }
    }
    no.metrics = &metrics;
    notifier = std::make_unique<Notifier>(std::move(no));
  }
  Reconciler::Options rec_options;
  rec_options.endpoints = endpoints.get();
  rec_options.stop_grace = config.stop_grace;
  rec_options.retire_after = config.retire_after;
  rec_options.on_probe = [this](const std::string& service, const ProbeResult& r) {
    if (r.local_error) {
      metrics.Add("kiln_probe_local_errors_total");
      return;
    }
    metrics.Add("kiln_probes_total",
                {{"service", service}, {"result", r.healthy ? "ok" : "failed"}});
    if (!r.healthy) metrics.Add("kiln_probe_failures_total", {{"service", service}});
  };
  rec_options.on_event = [this](const EventRecord& e) {
    if (!e.instance.empty()) ScheduleSdFile();
    CountEvent(metrics, e);
    if (notifier && notifier->Wants(e)) {
      // The writer's own connection sees the revision even when this pass just wrote it.
      std::string version;
      if (auto rev = store->GetRevision(e.service, e.revision); rev.ok()) {
        if (auto t = Template::FromCanonical(rev->template_json); t.ok()) version = t->version;
      }
      notifier->Notify(e, version);
    }
  };
  reconciler = std::make_unique<Reconciler>(*store, *driver, *prober, *artifacts, clock, *queue,
                                            rec_options);
  if (docker_hosts != nullptr) {
    docker_hosts->SetHostCallback(
        [this](const std::string& host, bool up, const std::string& message) {
          (void)reconciler->RecordHostEvent(host, up, message);
        });
  }

  // Recovery records what it finds (adoptions, lost instances). When the store cannot take
  // writes (a full disk), kilnd starts all the same and serves status, takes no action it could
  // not record, and retries every second; instances keep running meanwhile.
  TryRecover();

  // Loads read files and hash artifacts on the loader's thread; the reconciler gets each result
  // on this (the event) thread. Until the first arrives, it works from the desired state the
  // store remembers, and /readyz says the manifests are not loaded yet.
  hasher = std::make_unique<CachingHasher>(*artifacts);
  commits = std::make_unique<git::CommitFinder>();
  if (config.git_source) {
    git_source = std::make_unique<git::Source>(
        *config.git_source, git::Source::DirFor(config.state, *config.git_source), config.git_poll,
        clock);
    LogInfo("manifests from git", {{"url", config.git_source->url},
                                   {"branch", config.git_source->branch},
                                   {"work_tree", git_source->work_dir().string()},
                                   {"poll", FormatDuration(config.git_poll)}});
  }
  loader = std::make_unique<BackgroundLoader>(
      io, [this] { return LoadManifests(); },
      [this](const ManifestSet& set) {
        LogManifestSet(set, last_logged_set);
        metrics.Add("kiln_manifest_errors_total", {}, static_cast<double>(set.AllErrors().size()));
        metrics.Set("kiln_manifest_errors", {}, static_cast<double>(set.AllErrors().size()));
        reconciler->ApplyManifests(set);
        if (git_source) git_source->RecordApplied();
        Publish();  // readiness says so at once, not up to 200 ms later
      });
  loader->Request();
  if (git_source) {
    PollGit();
  } else {
    watcher = std::make_unique<ManifestWatcher>(io, clock, config.manifests, Duration(50),
                                                [this] { loader->Request(); });
    watcher->Start();
  }
  queue->Start();

  ApiServer::Options api_options = ApiOptionsOf(config);
  api_options.unix_socket = (config.state / "kiln.sock").string();
  std::vector<std::string> proxy_args = {"--kilnd", "unix:" + api_options.unix_socket,
                                         "--endpoints-file",
                                         (config.state / "proxy" / "endpoints.json").string()};
  if (api_options.tokens && config.proxy == "managed") {
    // The managed proxy's own token (role proxy), kept in the state directory so that a proxy
    // outliving this kilnd still presents one the next kilnd accepts.
    const fs::path token_file = config.state / "proxy" / "token";
    StatusOr<std::string> token = EnsureToken(token_file);
    if (!token.ok()) return token.status().WithContext("cannot make kiln-proxy's token");
    (*api_options.tokens)[*token] = Caller{.name = "kiln-proxy", .role = Role::kProxy};
    proxy_args.insert(proxy_args.end(), {"--token-file", token_file.string()});
  }
  api_options.metrics = &metrics;
  api_options.clock = &clock;
  api_options.endpoints = endpoints.get();
  api_options.manifest_rules = [first = config.port_first, last = config.port_last](
                                   ManifestSet& set) { RejectExposedPortsIn(set, first, last); };
  api_options.log_dir = config.state / "logs";
  if (docker_hosts != nullptr) {
    api_options.docker_hosts = [this] { return docker_hosts->Hosts(); };
  }
  if (git_source) {
    api_options.git_status = [this] { return git_source->Status(); };
    api_options.sync = [this] { return RequestGitFetch(); };
  }
  auto api_started =
      ApiServer::Start(api_options, io, *reconciler, [this] { return store->OpenReader(); });
  if (!api_started.ok()) {
    LogError("cannot start the API", {{"error", api_started.status().message()}});
    return api_started.status().WithContext("cannot start the API");
  }
  api = std::move(api_started).value();

  if (config.proxy == "managed") {
    ProxySupervisor::Options po;
    po.binary = config.proxy_binary.empty() ? BesideSelf("kiln-proxy") : config.proxy_binary;
    po.args = std::move(proxy_args);
    po.state_dir = config.state / "proxy";
    po.log_path = config.state / "logs" / "kiln-proxy.log";
    proxy = std::make_unique<ProxySupervisor>(io, po);
  }

  // HTTP: metrics, health, /api/v1 and the dashboard, on a thread of its own with its own
  // reader, so that slow clients, TLS handshakes and store reads never hold up the reconciler,
  // and /healthz answers while it works. What HTTP shows of the reconciler's state is a snapshot
  // the reconciler's thread publishes.
  Publish();
  PublishEvery();
  auto reader = store->OpenReader();
  if (!reader.ok()) {
    LogError("cannot open a reader for HTTP", {{"error", reader.status().message()}});
    return reader.status().WithContext("cannot open a reader for HTTP");
  }
  http_reader = std::move(reader).value();
  metrics.SetCollector("kiln_workqueue_depth", [this] {
    return std::vector<std::pair<Labels, double>>{
        {{}, static_cast<double>(published.Get().queue_depth)}};
  });
  metrics.SetCollector("kiln_workqueue_retries_total", [this] {
    return std::vector<std::pair<Labels, double>>{
        {{}, static_cast<double>(published.Get().queue_retries)}};
  });
  metrics.SetCollector("kiln_service_crash_loop_failures", [this] {
    std::vector<std::pair<Labels, double>> out;
    if (auto services = http_reader->ListServices(); services.ok()) {
      for (const auto& s : *services) {
        if (!s.retired) out.push_back({{{"service", s.name}}, static_cast<double>(s.crash_count)});
      }
    }
    return out;
  });
  metrics.SetCollector("kiln_service_start_backoff_seconds", [this] {
    std::vector<std::pair<Labels, double>> out;
    const int64_t now = ToUnixMillis(clock.SystemNow());
    if (auto services = http_reader->ListServices(); services.ok()) {
      for (const auto& s : *services) {
        if (s.retired) continue;
        const double left = s.next_start_ms > now ? (s.next_start_ms - now) / 1000.0 : 0;
        out.push_back({{{"service", s.name}}, left});
      }
    }
    return out;
  });
  metrics.SetCollector("kiln_instances", [this] {
    std::vector<std::pair<Labels, double>> out;
    auto counts = http_reader->CountInstances();
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
  if (docker_hosts != nullptr) {
    metrics.SetCollector("kiln_docker_host_up", [this] {
      std::vector<std::pair<Labels, double>> out;
      for (const DockerHostStatus& h : docker_hosts->Hosts()) {
        out.push_back({{{"host", h.name}}, h.up ? 1.0 : 0.0});
      }
      return out;
    });
    metrics.SetCollector("kiln_docker_host_instances", [this] {
      std::vector<std::pair<Labels, double>> out;
      for (const DockerHostStatus& h : docker_hosts->Hosts()) {
        for (const auto& [service, n] : h.per_service) {
          out.push_back({{{"host", h.name}, {"service", service}}, static_cast<double>(n)});
        }
      }
      return out;
    });
  }
  metrics.SetCollector("kiln_store_writable", [this] {
    const ReconcilerSnapshot snap = published.Get();
    const bool writable = snap.store_error.empty() && snap.recovery_error.empty();
    return Series{{{}, writable ? 1.0 : 0.0}};
  });
  metrics.AddGroupCollector(
      [this] { return ServiceMetrics(*http_reader, ToUnixMillis(clock.SystemNow())); });
  CollectProxyMetrics(metrics, *endpoints);
  if (!config.http_listen.empty()) {
    HttpServer::Options http_options = HttpOptionsOf(config);
    HttpServer::Sources sources;
    sources.metrics = [this] { return metrics.Render(); };
    sources.reader = http_reader.get();
    sources.endpoints = endpoints.get();
    if (docker_hosts != nullptr) sources.docker_hosts = [this] { return docker_hosts->Hosts(); };
    if (git_source) {
      sources.git_status = [this] { return git_source->Status(); };
      sources.sync = [this] { return RequestGitFetch(); };
    }
    sources.readiness = [this] {
      return ReadinessOf(published.Get(), std::chrono::steady_clock::now(),
                         ToUnixMillis(clock.SystemNow()));
    };
    auto started = HttpServer::Start(http_io, http_options, std::move(sources));
    if (!started.ok()) {
      LogError("cannot start HTTP", {{"error", started.status().message()}});
      return started.status().WithContext("cannot start HTTP");
    }
    http = std::move(started).value();
    http_thread.thread = std::thread([this] { http_io.run(); });
  }

  if (!config.prometheus_sd_file.empty()) {
    auto sd = store->OpenReader();
    if (!sd.ok()) return sd.status().WithContext("cannot open a reader for --prometheus-sd-file");
    sd_reader = std::move(sd).value();
    WriteSdFile();
  }

  // Events are pruned by count, on the reconciler's thread like every write.
  Prune();
  // Artifacts are re-hashed at start-up and every --verify-artifacts, off this thread (a large
  // artifact takes a while); results come back here, where a mismatch is handled as drift.
  Verify();
  return Status::Ok();
}

ManifestSet Daemon::Impl::LoadManifests() {
  ArtifactHasher hash_fn = [this](const fs::path& p) { return (*hasher)(p); };
  if (!git_source) {
    ManifestSet set = LoadManifestDir(config.manifests, hash_fn);
    RejectExposedPortsIn(set, config.port_first, config.port_last);
    commits->Annotate(set);  // never fails the load: a git error is logged
    return set;
  }
  const std::optional<SourceCommit> commit = git_source->Update();
  const std::string fetch_error = git_source->Status().fetch_error;
  metrics.Add("kiln_git_fetches_total", {{"result", fetch_error.empty() ? "ok" : "error"}});
  metrics.Set("kiln_git_fetch_failing", {}, fetch_error.empty() ? 0 : 1);
  ManifestSet set;
  if (!commit) {
    // Nothing was ever checked out: like a missing directory, this keeps the desired state the
    // store remembers rather than retiring every service.
    set.dir = config.git_source->url;
    set.dir_errors.push_back(ManifestError{.file = config.git_source->url, .message = fetch_error});
    git_source->RecordLoad(std::nullopt, "");
    return set;
  }
  set = LoadManifestDir(git_source->work_dir(), hash_fn);
  set.source_commit = git::CommitLabel(*commit);
  RejectExposedPortsIn(set, config.port_first, config.port_last);
  commits->Annotate(set);
  const std::vector<ManifestError> errors = set.AllErrors();
  git_source->RecordLoad(
      commit, errors.empty() ? "" : errors.front().ToString() + " at commit " + set.source_commit);
  return set;
}

void Daemon::Impl::PollGit() {
  git_poll_timer.expires_after(config.git_poll);
  git_poll_timer.async_wait([this](const boost::system::error_code& err) {
    if (err) return;
    loader->Request();
    PollGit();
  });
}

int64_t Daemon::Impl::RequestGitFetch() {
  const int64_t fetch = git_source->RequestFetch();  // before the request, so the load covers it
  loader->Request();
  return fetch;
}

void Daemon::Impl::TryRecover() {
  Status s = reconciler->Recover();
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
  recover_timer.async_wait([this](const boost::system::error_code& err) {
    if (!err) TryRecover();
  });
}

void Daemon::Impl::Publish() {
  ReconcilerSnapshot s;
  // Whether the store took the last write (of a pass, an exit, a probe result, a command).
  s.store_error = store->WriteFailure().message();
  s.manifests_loaded = reconciler->manifests_loaded();
  s.recovered = recovered;
  s.recovery_error = recovery_error;
  s.local_probe_error = reconciler->local_probe_error().message;
  s.local_probe_error_ms = reconciler->local_probe_error().time_ms;
  s.shutting_down = shutting_down;
  s.queue_depth = queue->Depth();
  s.queue_retries = queue->Retries();
  s.at = std::chrono::steady_clock::now();
  published.Publish(std::move(s));
  if (proxy) {
    // Only once the pools are known: a kilnd that cannot recover yet must not stop the proxy
    // that serves the last pools it knew.
    if (recovered && endpoints->ready() && !shutting_down) {
      proxy->SetWanted(!endpoints->Current().services.empty() || ProxyHasOpenConnections());
    }
    const SupervisorStatus ps = proxy->Status();
    metrics.Set("kiln_proxy_process_up", {}, ps.running ? 1 : 0);
    metrics.Set("kiln_proxy_process_restarts", {}, static_cast<double>(ps.restarts));
  }
}

bool Daemon::Impl::ProxyHasOpenConnections() const {
  for (const ProxyReportData& r : endpoints->LiveReports()) {
    for (const ProxyRouteReport& route : r.routes) {
      for (const ProxyEndpointReport& e : route.endpoints) {
        if (e.open_connections > 0) return true;
      }
    }
  }
  return false;
}

void Daemon::Impl::ScheduleSdFile(std::chrono::milliseconds delay) {
  if (!sd_reader || sd_scheduled) return;
  sd_scheduled = true;
  sd_timer.expires_after(delay);
  sd_timer.async_wait([this](const boost::system::error_code& ec) {
    sd_scheduled = false;
    if (!ec) WriteSdFile();
  });
}

void Daemon::Impl::WriteSdFile() {
  StatusOr<std::string> text = PrometheusSdJson(*sd_reader);
  Status written = text.ok() ? Status::Ok() : text.status();
  if (text.ok() && *text != sd_written) {
    written = WriteFileAtomically(config.prometheus_sd_file, *text, Durability::kVisible);
    if (written.ok()) sd_written = *std::move(text);
  }
  if (!written.ok()) {
    if (written.message() != sd_error) {
      LogError("cannot write --prometheus-sd-file; will retry",
               {{"path", config.prometheus_sd_file}, {"error", written.message()}});
    }
    sd_error = written.message();
    ScheduleSdFile(std::chrono::seconds(1));
    return;
  }
  if (!sd_error.empty()) LogInfo("--prometheus-sd-file written again");
  sd_error.clear();
}

void Daemon::Impl::PublishEvery() {
  publish_timer.expires_after(std::chrono::milliseconds(200));
  publish_timer.async_wait([this](const boost::system::error_code& err) {
    if (err) return;
    Publish();
    PublishEvery();
  });
}

void Daemon::Impl::Prune() {
  // Every resync period; with no resync (0s), every 30 s.
  prune_timer.expires_after(config.resync.count() > 0 ? config.resync : Duration(30'000));
  prune_timer.async_wait([this](const boost::system::error_code& err) {
    if (err) return;
    auto pruned = store->PruneEvents(config.event_retention);
    if (pruned.ok() && *pruned > 0) LogInfo("events pruned", {{"pruned", *pruned}});
    Prune();
  });
}

void Daemon::Impl::Verify() {
  if (recovered) {
    for (const std::string& digest : reconciler->ArtifactsInUse()) {
      boost::asio::post(verifier, [this, digest] {
        auto identity = Reconciler::IdentityOf(artifacts->PathFor(digest));
        Status v = artifacts->Verify(digest);
        boost::asio::post(io, [this, digest, v, identity] {
          metrics.Add("kiln_artifact_verifications_total",
                      {{"result", v.ok()                              ? "ok"
                                  : v.code() == StatusCode::kNotFound ? "missing"
                                                                      : "mismatch"}});
          reconciler->OnArtifactVerified(digest, v, identity);
        });
      });
    }
  }
  if (config.verify_artifacts.count() == 0) return;
  verify_timer.expires_after(recovered ? config.verify_artifacts : Duration(1000));
  verify_timer.async_wait([this](const boost::system::error_code& err) {
    if (!err) Verify();
  });
}

// On the event thread. Finishes nothing new: the current step has already run (one thread);
// instances keep running unless StopEverythingThenShutDown stopped them first.
void Daemon::Impl::ShutDown(const char* signal_name, const char* how) {
  const std::string message = std::string("shutting down; ") + how;
  if (signal_name) {
    LogInfo(message, {{"signal", signal_name}});
  } else {
    LogInfo(message);
  }
  shutting_down = true;
  Publish();
  endpoints->Stop();  // proxies keep serving what they have; they reconnect to the next kilnd
  io.stop();
}

void Daemon::Impl::StopEverythingThenShutDown(const char* signal_name) {
  LogInfo("stopping every instance and kiln-proxy before exiting (--stop-instances-on-exit)",
          {{"signal", signal_name}});
  shutting_down = true;  // no pass runs from here on, so nothing replaces what is stopped
  Publish();
  StopInstancesRound(signal_name, 1, 0);
}

void Daemon::Impl::StopInstancesRound(const char* signal_name, int round, int64_t stopped) {
  StatusOr<std::vector<RunningInstance>> listed = driver->List();
  if (!listed.ok()) {
    LogError("cannot list the instances to stop; they keep running",
             {{"error", listed.status().message()}});
    StopProxyThenShutDown(signal_name, stopped, 0);
    return;
  }
  if (listed->empty() || round > 5) {
    if (!listed->empty()) {
      LogWarn("instances still running after 5 rounds of stopping; they keep running",
              {{"instances", static_cast<int64_t>(listed->size())}});
    }
    StopProxyThenShutDown(signal_name, stopped, 0);
    return;
  }
  auto left = std::make_shared<size_t>(listed->size());
  auto count = std::make_shared<int64_t>(stopped);
  for (const RunningInstance& r : *listed) {
    driver->Stop(r.handle, config.stop_grace,
                 [this, r, left, count, signal_name, round](const StatusOr<ExitInfo>& exit) {
                   if (exit.ok()) {
                     ++*count;
                     LogInfo("instance stopped", {{"service", r.service},
                                                  {"revision", r.revision},
                                                  {"instance", r.handle.instance},
                                                  {"exit", exit->Describe()}});
                   } else {
                     LogWarn("cannot stop instance", {{"service", r.service},
                                                      {"revision", r.revision},
                                                      {"instance", r.handle.instance},
                                                      {"error", exit.status().message()}});
                   }
                   if (--*left == 0) StopInstancesRound(signal_name, round + 1, *count);
                 });
  }
}

void Daemon::Impl::StopProxyThenShutDown(const char* signal_name, int64_t stopped, int waited_ms) {
  constexpr int kPollMs = 50;
  constexpr int kMaxWaitMs = 30'000;                     // its supervisor sends SIGKILL after 5 s
  if (proxy && waited_ms == 0) proxy->SetWanted(false);  // also one an earlier kilnd started
  if (proxy && proxy->Status().running && waited_ms < kMaxWaitMs) {
    stop_timer.expires_after(std::chrono::milliseconds(kPollMs));
    stop_timer.async_wait(
        [this, signal_name, stopped, waited_ms](const boost::system::error_code& err) {
          if (!err) StopProxyThenShutDown(signal_name, stopped, waited_ms + kPollMs);
        });
    return;
  }
  if (proxy) {
    if (proxy->Status().running) {
      LogWarn("kiln-proxy did not stop; it keeps running");
    } else if (waited_ms > 0) {
      LogInfo("kiln-proxy stopped");
    }
  }
  LogInfo("every instance stopped", {{"stopped", stopped}});
  ShutDown(signal_name, "instances stopped");
}

Daemon::Daemon(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Daemon::~Daemon() {
  if (impl_->addr_written) ::unlink(addr_file().c_str());
}

StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonConfig& config) {
  // Every check before anything is created, opened or bound.
  if (Status s = CheckDaemonConfig(config); !s.ok()) {
    // A listener refused ("FLAG: why") is logged as kilnd always has: "cannot start HTTP
    // error=..." or "cannot start the API error=...".
    const char* what = "invalid configuration";
    std::string why = s.message();
    for (const auto& [flag, refused] : {std::pair{"--http-listen: ", "cannot start HTTP"},
                                        {"--grpc-listen: ", "cannot start the API"}}) {
      if (s.code() == StatusCode::kFailedPrecondition && why.starts_with(flag)) {
        what = refused;
        why.erase(0, std::string_view(flag).size());
        break;
      }
    }
    LogError(what, {{"error", why}});
    return s;
  }
  auto impl = std::make_unique<Impl>(config);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Daemon>(new Daemon(std::move(impl)));
}

void Daemon::StopOnSignals() {
  Impl& d = *impl_;
  d.signals.emplace(d.io, SIGTERM, SIGINT);
  d.signals->async_wait([&d](const boost::system::error_code& err, int signo) {
    if (err) return;
    const char* name = signo == SIGTERM ? "SIGTERM" : "SIGINT";
    if (!d.config.stop_instances_on_exit) {
      d.ShutDown(name);
      return;
    }
    // A second signal while stopping (an impatient Ctrl-C): exit now.
    d.signals->async_wait([&d](const boost::system::error_code& again, int second) {
      if (again) return;
      d.ShutDown(second == SIGTERM ? "SIGTERM" : "SIGINT",
                 "not waiting for the instances still stopping");
    });
    d.StopEverythingThenShutDown(name);
  });
}

void Daemon::Stop() {
  boost::asio::post(impl_->io, [d = impl_.get()] { d->ShutDown(nullptr); });
}

void Daemon::PostForTest(std::function<void()> fn) { boost::asio::post(impl_->io, std::move(fn)); }

void Daemon::Run() {
  Impl& d = *impl_;
  nlohmann::json addr = {{"pid", static_cast<int64_t>(::getpid())},
                         {"grpc_unix", grpc_unix_socket().string()},
                         {"grpc_tcp", nullptr},
                         {"http", nullptr}};
  if (!d.config.grpc_listen.empty())
    addr["grpc_tcp"] = BoundAddress(d.config.grpc_listen, grpc_tcp_port());
  if (d.http) addr["http"] = BoundAddress(d.config.http_listen, http_port());
  if (d.http && d.notifier) {
    d.notifier->SetDashboardUrl("http://" + BoundAddress(d.config.http_listen, http_port()) + "/");
  }
  if (Status s = WriteFileAtomically(addr_file(), addr.dump() + "\n", Durability::kVisible);
      s.ok()) {
    d.addr_written = true;
  } else {
    LogWarn("cannot write the address file", {{"error", s.message()}});
  }
  LogInfo("kilnd ready", {{"version", kVersion}, {"pid", static_cast<int64_t>(::getpid())}});
  auto work = boost::asio::make_work_guard(d.io);  // Run returns on Stop or a signal only
  d.io.run();
  d.verifier.stop();
  d.verifier.join();
  d.api->Shutdown();
  if (d.addr_written) {
    ::unlink(addr_file().c_str());
    d.addr_written = false;
  }
  LogInfo("kilnd stopped");
}

int Daemon::http_port() const { return impl_->http ? impl_->http->port() : 0; }
int Daemon::grpc_tcp_port() const { return impl_->api->tcp_port(); }
fs::path Daemon::grpc_unix_socket() const { return impl_->config.state / "kiln.sock"; }
fs::path Daemon::addr_file() const { return impl_->config.state / "kilnd.addr"; }

int RunDaemon(int argc, char** argv) {
  StatusOr<DaemonConfig> config = ParseDaemonFlags(argc, argv);
  if (!config.ok()) return ReportFlagError(config.status());

  SetupLogging(config->log_format, config->log_level);

  // Nothing kilnd holds may reach an instance, including what it inherited itself.
  if (Status s = MarkInheritedCloseOnExec(); !s.ok()) {
    LogWarn("cannot mark inherited descriptors close-on-exec", {{"error", s.message()}});
  }

  // Many connections and instances need many descriptors; the soft limit a shell gives (1024)
  // is not what the administrator allows.
  if (auto nofile = RaiseNofileLimit(); nofile.ok()) {
    config->instance_nofile_soft = nofile->soft_before;  // instances get what kilnd started with
    LogInfo("descriptor limit", {{"soft_before", static_cast<int64_t>(nofile->soft_before)},
                                 {"soft", static_cast<int64_t>(nofile->soft)},
                                 {"hard", static_cast<int64_t>(nofile->hard)}});
  } else {
    LogWarn("cannot raise the descriptor limit", {{"error", nofile.status().message()}});
  }

  auto daemon = Daemon::Start(*config);
  if (!daemon.ok()) return 1;
  (*daemon)->StopOnSignals();
  (*daemon)->Run();
  return 0;
}

}  // namespace kiln
