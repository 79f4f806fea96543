#pragma once

// kilnd's configuration: every flag parsed into a typed value and checked before kilnd does
// anything (creates its state directory, opens the store, recovers, binds), so a bad flag never
// leaves anything behind or touches the instances of an earlier run.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "api/api_server.h"
#include "api/tokens.h"
#include "common/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "git/git_source.h"
#include "http/http_server.h"

namespace kiln {

struct DaemonConfig {
  std::filesystem::path manifests;  // directory of *.yaml service manifests (or the git+ URL)
  // --manifests git+URL#BRANCH: the manifests are that branch, fetched every git_poll and
  // checked out under STATE/git/.
  std::optional<git::SourceSpec> git_source;
  Duration git_poll{15'000};
  std::filesystem::path state;  // kiln.db, artifacts/, logs/, kiln.sock, kilnd.addr
  std::string driver = "process";
  // --docker-host (repeatable): the Docker engines image services run on, each a host with a
  // name ("name=a,unix:///PATH"; a bare "unix:///PATH" is named "default"). Empty: none, and an
  // image service's instances fail to start.
  std::vector<std::string> docker_hosts;
  // --docker-host-timeout: a host whose engine has not answered /_ping for this long is down.
  Duration docker_host_timeout{10'000};
  int port_first = 20000;  // instances' ports, [port_first, port_last]
  int port_last = 29999;
  Duration resync{30'000};  // 0: no periodic resync (events are still pruned every 30s)
  Duration stop_grace{10'000};
  Duration retire_after{60'000};
  Duration verify_artifacts{600'000};  // 0: only at start-up

  // gRPC: always the unix socket STATE/kiln.sock; TCP too when grpc_listen is not empty.
  std::string grpc_listen;  // HOST:PORT; port 0 picks one
  Duration grpc_idle_timeout{300'000};
  std::string tls_cert, tls_key;  // PEM files, both or neither (gRPC TCP and HTTP)
  std::string client_ca;          // PEM: require client certificates it signed
  // What --tokens FILE holds ("TOKEN ROLE NAME" lines), read once by ParseDaemonFlags and passed
  // to both listeners; nullopt: no tokens.
  std::optional<Tokens> tokens;

  int64_t event_retention = 100'000;

  std::string http_listen = "127.0.0.1:7090";  // HOST:PORT, "" for no HTTP; port 0 picks one
  Duration http_header_timeout{5'000};
  Duration http_read_timeout{10'000};
  int http_max_connections = 256;
  bool http_metrics_auth = false;

  // Prometheus file_sd JSON of every running instance, rewritten (atomically) when one changes;
  // "" for none. Its directory must exist.
  std::string prometheus_sd_file;
  // Webhooks: --notify URLs, --notify-on kinds ("" = the failure kinds), --notify-service
  // names (empty = every service), --notify-secret-file (its first line signs each body).
  std::vector<std::string> notify_urls;
  std::string notify_on;
  std::vector<std::string> notify_services;
  std::string notify_secret_file;

  // The data plane for services with `expose:`: "managed" (kilnd starts kiln-proxy, adopts it
  // after a restart, and leaves it running when it stops) or "off" (someone else runs one).
  std::string proxy = "managed";
  std::filesystem::path proxy_binary;  // "": kiln-proxy beside kilnd's own executable

  // Instances' log files (STATE/logs/<instance>.log): one larger than log_max_bytes is copied to
  // <instance>.log.1 and truncated, keeping at most log_max_files files per instance (the live
  // one included). See LogRotator for the scheme and what it can lose.
  uint64_t log_max_bytes = 10 << 20;
  int log_max_files = 3;

  // --stop-instances-on-exit: on SIGINT or SIGTERM, stop every instance (and a managed
  // kiln-proxy) before exiting, as `make run` wants; by default they outlive kilnd.
  bool stop_instances_on_exit = false;

  LogFormat log_format = LogFormat::kText;
  LogLevel log_level = LogLevel::kInfo;

  // Not a flag: the soft RLIMIT_NOFILE instances start with (RunDaemon sets the one kilnd was
  // started with, before it raised its own); 0: instances inherit kilnd's.
  uint64_t instance_nofile_soft = 0;
};

// Parses a size: "4096", "512KiB", "10MiB", "1GiB" (K, M, G mean the same; B is bytes).
StatusOr<uint64_t> ParseByteSize(std::string_view text);

// Parses and checks kilnd's command line, and reads the --tokens file (once). Nothing is
// created, opened for writing or bound. With --config FILE, FILE (YAML, one mapping) gives every
// setting the command line does not: each key is a flag's name without "--" (a repeatable flag
// takes a list, a flag without a value true or false); an error about a value from the file
// reads "FILE:LINE:COLUMN: KEY: why", and so do unknown and duplicate keys and wrong types. Errors,
// and what RunDaemon does with them (ReportFlagError):
//   CANCELLED         --help or --version: the message is the text for stdout; exit 0.
//   INVALID_ARGUMENT  bad usage: the message is what to tell the user; exit 2.
// CheckDaemonConfig's FAILED_PRECONDITION (a listener off loopback without TLS and tokens) is
// not a usage error: the config is returned, and Daemon::Start refuses it, logged, exit 1.
StatusOr<DaemonConfig> ParseDaemonFlags(int argc, const char* const* argv);

// Prints what ParseDaemonFlags' error says (help or version on stdout, "kilnd: ..." on
// stderr) and returns kilnd's exit code for it.
int ReportFlagError(const Status& error);

// The checks of values that a config built in code must pass too (ParseDaemonFlags and
// Daemon::Start make them): ranges, durations, addresses, TLS files that must be readable,
// combinations. Reads files, changes nothing. Errors are "FLAG: why":
//   INVALID_ARGUMENT     a bad value or combination.
//   FAILED_PRECONDITION  only when nothing is invalid: the refusal to serve a listener off
//                        loopback without TLS and tokens, "--http-listen: refusing to serve HTTP
//                        on ..." or "--grpc-listen: refusing to serve the API on ..." (HTTP's
//                        first). The one place that decides it for kilnd; the servers' own
//                        Start keeps the same rule for whoever starts them without a config.
Status CheckDaemonConfig(const DaemonConfig& config);

// The listeners' options as the flags set them (tokens included), for checking and for
// starting; the daemon adds its own parts (the unix socket, metrics, clock, data sources).
ApiServer::Options ApiOptionsOf(const DaemonConfig& config);
HttpServer::Options HttpOptionsOf(const DaemonConfig& config);

}  // namespace kiln
