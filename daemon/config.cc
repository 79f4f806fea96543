#include "daemon/config.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "api/api_server.h"
#include "api/tokens.h"
#include "common/duration.h"
#include "common/regular_file.h"
#include "common/utf8.h"
#include "daemon/notifier.h"
#include "deploy/docker_driver.h"
#include "deploy/docker_hosts.h"
#include "http/http_server.h"
#include "kiln/version.h"
#include "spec/yaml_reader.h"

namespace kiln {

namespace {

// HOST:PORT with a non-empty host and a port in 0-65535 (0: the system picks one).
bool IsHostPort(const std::string& s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  const char* digits = s.c_str() + colon + 1;
  char* end = nullptr;
  const long port = std::strtol(digits, &end, 10);
  return end != digits && *end == '\0' && port >= 0 && port <= 65535;
}

Status CheckReadable(const char* flag, const std::string& path) {
  if (path.empty()) return Status::Ok();
  std::ifstream in(path);
  if (!in) return InvalidArgumentError(std::string(flag) + ": cannot read \"" + path + "\"");
  return Status::Ok();
}

// --config FILE: where each setting the file gave came from ("FILE:LINE:COLUMN"), by its key.
using SettingPlaces = std::map<std::string, std::string>;

constexpr size_t kMaxConfigBytes = 1 << 20;

bool IsIntegerSetting(const std::string& key) {
  return key == "http-max-connections" || key == "event-retention" || key == "log-max-files";
}

std::string Place(const std::string& file, const YamlNode* at, const YamlNode* fallback) {
  const YamlNode* where = at->line > 0 ? at : fallback;
  return file + ":" + std::to_string(where->line) + ":" + std::to_string(where->column);
}

// The settings kilnd --config FILE may hold: every option but --help, --version and --config.
std::vector<std::string> SettingKeys(const CLI::App& app) {
  std::vector<std::string> keys;
  for (const CLI::Option* opt : app.get_options()) {
    const std::string name = opt->get_single_name();
    if (name == "help" || name == "version" || name == "config") continue;
    keys.push_back(name);
  }
  return keys;
}

// A known key a misspelt one is closest to (at most two edits, or '_' for '-'), or "".
std::string NearestKey(const std::string& key, const std::vector<std::string>& keys) {
  std::string dashed = key;
  std::replace(dashed.begin(), dashed.end(), '_', '-');
  std::string best;
  size_t best_d = 3;
  for (const std::string& k : keys) {
    if (k == dashed) return k;
    // Levenshtein distance, two rows.
    std::vector<size_t> prev(k.size() + 1), cur(k.size() + 1);
    for (size_t j = 0; j <= k.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= key.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= k.size(); ++j) {
        cur[j] =
            std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (key[i - 1] == k[j - 1] ? 0 : 1)});
      }
      std::swap(prev, cur);
    }
    if (prev[k.size()] < best_d) {
      best_d = prev[k.size()];
      best = k;
    }
  }
  return best;
}

// One `key: value` entry of the config file's mapping `root`: checked, then given to the option
// of that name unless the command line gave it.
Status ApplySetting(CLI::App& app, const std::string& file, const YamlNode* root, const YamlNode* k,
                    const YamlNode* value, const std::vector<std::string>& keys,
                    std::set<std::string>& seen, SettingPlaces& places) {
  if (k->kind != YamlNode::Kind::kScalar) {
    return InvalidArgumentError(Place(file, k, root) + ": keys must be plain names, got " +
                                DescribeYamlNode(k));
  }
  const std::string& key = k->text;
  const std::string at = Place(file, k, root);
  if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
    std::string msg = at + ": " + key + ": unknown key";
    if (key == "config") {
      msg += " (a config file cannot name another)";
    } else if (std::string near = NearestKey(key, keys); !near.empty()) {
      msg += " (did you mean \"" + near + "\"?)";
    }
    return InvalidArgumentError(msg);
  }
  if (!seen.insert(key).second) return InvalidArgumentError(at + ": " + key + ": duplicate key");
  CLI::Option* opt = app.get_option_no_throw("--" + key);
  const std::string value_at = Place(file, value, k);
  const auto wrong = [&file, k, &key](const std::string& expected, const YamlNode* got) {
    return InvalidArgumentError(Place(file, got, k) + ": " + key + ": expected " + expected +
                                ", got " + DescribeYamlNode(got));
  };
  std::vector<std::string> results;
  if (opt->get_expected_max() == 0) {  // a flag
    if (value->kind != YamlNode::Kind::kScalar || !value->plain ||
        (value->text != "true" && value->text != "false")) {
      return wrong("true or false", value);
    }
    results.push_back(value->text);
  } else if (opt->get_expected_max() > 1) {  // repeatable: a list, or one value
    if (value->kind == YamlNode::Kind::kSequence) {
      for (const YamlNode* item : value->items) {
        if (item->kind != YamlNode::Kind::kScalar) return wrong("a string", item);
        results.push_back(item->text);
      }
    } else if (value->kind == YamlNode::Kind::kScalar) {
      results.push_back(value->text);
    } else {
      return wrong("a string or a list of strings", value);
    }
  } else if (IsIntegerSetting(key)) {
    if (value->kind != YamlNode::Kind::kScalar || !value->plain) return wrong("an integer", value);
    results.push_back(value->text);
  } else {
    if (value->kind != YamlNode::Kind::kScalar) return wrong("a string", value);
    results.push_back(value->text);
  }
  if (opt->count() > 0) return Status::Ok();  // given on the command line, which wins
  places[key] = value_at;
  if (results.empty()) return Status::Ok();  // an empty list: nothing
  try {
    opt->add_result(results);
    opt->run_callback();
  } catch (const CLI::Error& e) {
    std::string why = e.what();
    if (const std::string flag = "--" + key + ": "; why.starts_with(flag)) {
      why.erase(0, flag.size());
    }
    return InvalidArgumentError(value_at + ": " + key + ": " + why);
  }
  return Status::Ok();
}

// Reads --config FILE into the options the command line did not give (the command line wins),
// through the same CLI11 conversions and checks as a flag. Every error names FILE:LINE:COLUMN
// and the key. `places` gets where each setting taken from the file was.
Status ApplyConfigFile(CLI::App& app, const std::string& file, SettingPlaces& places) {
  StatusOr<std::string> text =
      ReadRegularFile(file, kMaxConfigBytes, "--config: cannot read " + file);
  if (!text.ok()) return InvalidArgumentError(text.status().message());
  if (std::optional<size_t> bad = FindInvalidUtf8(*text)) {
    const std::string_view before = std::string_view(*text).substr(0, *bad);
    const size_t line = 1 + static_cast<size_t>(std::count(before.begin(), before.end(), '\n'));
    const size_t newline = before.rfind('\n');
    const size_t column = newline == std::string_view::npos ? *bad + 1 : *bad - newline;
    return InvalidArgumentError(file + ":" + std::to_string(line) + ":" + std::to_string(column) +
                                ": not valid UTF-8");
  }
  YamlLimits limits;
  limits.max_depth = 8;
  limits.max_nodes = 10'000;
  YamlStream stream = ParseYaml(*text, limits);
  if (stream.error) {
    return InvalidArgumentError(file + ":" + std::to_string(stream.error->line) + ":" +
                                std::to_string(stream.error->column) +
                                ": invalid YAML: " + SanitizeUtf8(stream.error->message));
  }
  const YamlNode* root = nullptr;
  const YamlNode* another = nullptr;
  for (const YamlNode* doc : stream.documents) {
    if (doc->kind == YamlNode::Kind::kNull) continue;  // an empty file or document
    if (root == nullptr) {
      root = doc;
    } else if (another == nullptr) {
      another = doc;
    }
  }
  if (another != nullptr) {
    return InvalidArgumentError(Place(file, another, another) +
                                ": one document of settings expected, got another");
  }
  if (root == nullptr) return Status::Ok();
  if (root->kind != YamlNode::Kind::kMapping) {
    return InvalidArgumentError(Place(file, root, root) + ": expected a mapping of settings, got " +
                                DescribeYamlNode(root));
  }
  const std::vector<std::string> keys = SettingKeys(app);
  std::set<std::string> seen;
  for (const auto& [k, value] : root->entries) {
    RETURN_IF_ERROR(ApplySetting(app, file, root, k, value, keys, seen, places));
  }
  return Status::Ok();
}

// An error about "--FLAG..." whose value came from the config file, located there:
// "FILE:LINE:COLUMN: FLAG: why" (a message that names no flag of the file is kept as it is).
Status Located(const Status& s, const SettingPlaces& places) {
  if (s.ok() || !s.message().starts_with("--")) return s;
  const std::string& m = s.message();
  size_t end = 2;
  while (end < m.size() && (std::isalnum(static_cast<unsigned char>(m[end])) || m[end] == '-')) {
    ++end;
  }
  const std::string key = m.substr(2, end - 2);
  auto it = places.find(key);
  if (it == places.end()) return s;
  if (m.compare(end, 2, ": ") != 0) return Status(s.code(), it->second + ": " + m);
  return Status(s.code(), it->second + ": " + key + ": " + m.substr(end + 2));
}

}  // namespace

StatusOr<uint64_t> ParseByteSize(std::string_view text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  const std::string_view unit = text.substr(digits);
  uint64_t scale = 0;
  for (const auto& [name, factor] : {std::pair{"", uint64_t{1}},
                                     {"B", uint64_t{1}},
                                     {"K", uint64_t{1} << 10},
                                     {"KiB", uint64_t{1} << 10},
                                     {"M", uint64_t{1} << 20},
                                     {"MiB", uint64_t{1} << 20},
                                     {"G", uint64_t{1} << 30},
                                     {"GiB", uint64_t{1} << 30}}) {
    if (unit == name) scale = factor;
  }
  if (digits == 0 || digits > 12 || scale == 0) {
    return InvalidArgumentError("expected a size such as 4096, 512KiB, 10MiB or 1GiB, got \"" +
                                std::string(text) + "\"");
  }
  return std::stoull(std::string(text.substr(0, digits))) * scale;
}

Status CheckDaemonConfig(const DaemonConfig& c) {
  if (c.manifests.empty()) return InvalidArgumentError("--manifests is required");
  if (c.state.empty()) return InvalidArgumentError("--state is required");
  if (c.driver != "process") {
    return InvalidArgumentError("--driver: unknown driver \"" + c.driver + "\"");
  }
  if (StatusOr<std::vector<DockerHostConfig>> hosts = ParseDockerHostFlags(c.docker_hosts);
      !hosts.ok()) {
    return InvalidArgumentError("--docker-host: " + hosts.status().message());
  }
  if (c.docker_host_timeout <= Duration(0)) {
    return InvalidArgumentError("--docker-host-timeout: must be more than 0");
  }
  if (!(c.port_first > 0 && c.port_first <= c.port_last && c.port_last <= 65535)) {
    return InvalidArgumentError("--port-range: expected FIRST-LAST within 1-65535, got \"" +
                                std::to_string(c.port_first) + "-" + std::to_string(c.port_last) +
                                "\"");
  }
  for (const auto& [flag, d] : {std::pair{"--resync", c.resync},
                                {"--stop-grace", c.stop_grace},
                                {"--retire-after", c.retire_after},
                                {"--verify-artifacts", c.verify_artifacts}}) {
    if (d < Duration(0)) return InvalidArgumentError(std::string(flag) + ": must not be negative");
  }
  if (c.git_poll <= Duration(0)) return InvalidArgumentError("--git-poll: must be more than 0");
  for (const auto& [flag, d] : {std::pair{"--http-header-timeout", c.http_header_timeout},
                                {"--http-read-timeout", c.http_read_timeout},
                                {"--grpc-idle-timeout", c.grpc_idle_timeout}}) {
    if (d <= Duration(0)) return InvalidArgumentError(std::string(flag) + ": must be more than 0");
  }
  if (c.proxy != "managed" && c.proxy != "off") {
    return InvalidArgumentError("--proxy: expected managed or off, got \"" + c.proxy + "\"");
  }
  if (c.log_max_bytes < 1024) return InvalidArgumentError("--log-max-size: must be at least 1KiB");
  if (c.log_max_files < 1 || c.log_max_files > 100) {
    return InvalidArgumentError("--log-max-files: must be within 1-100");
  }
  if (c.event_retention < 1 || c.event_retention > 100'000'000) {
    return InvalidArgumentError("--event-retention: must be within 1-100000000");
  }
  if (c.http_max_connections < 1 || c.http_max_connections > 100'000) {
    return InvalidArgumentError("--http-max-connections: must be within 1-100000");
  }

  if (c.http_metrics_auth && !c.tokens) {
    return InvalidArgumentError("--http-metrics-auth needs --tokens");
  }
  if (c.tls_cert.empty() != c.tls_key.empty()) {
    return InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!c.client_ca.empty() && c.tls_cert.empty()) {
    return InvalidArgumentError("--client-ca needs --tls-cert and --tls-key");
  }
  for (const auto& [flag, path] : {std::pair{"--tls-cert", &c.tls_cert},
                                   {"--tls-key", &c.tls_key},
                                   {"--client-ca", &c.client_ca}}) {
    RETURN_IF_ERROR(CheckReadable(flag, *path));
  }

  if (!c.prometheus_sd_file.empty()) {
    const std::filesystem::path dir = std::filesystem::absolute(c.prometheus_sd_file).parent_path();
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) {
      return InvalidArgumentError("--prometheus-sd-file: directory " + dir.string() +
                                  " does not exist");
    }
  }

  for (const std::string& url : c.notify_urls) RETURN_IF_ERROR(ParseWebhookUrl(url).status());
  if (!c.notify_on.empty()) RETURN_IF_ERROR(ParseNotifyKinds(c.notify_on).status());
  if (c.notify_urls.empty() &&
      (!c.notify_on.empty() || !c.notify_services.empty() || !c.notify_secret_file.empty())) {
    return InvalidArgumentError(
        "--notify-on, --notify-service and --notify-secret-file need --notify");
  }
  RETURN_IF_ERROR(CheckReadable("--notify-secret-file", c.notify_secret_file));

  // The servers' own checks of their options. Anything invalid is reported first; the refusal
  // to listen off loopback without TLS and tokens (FAILED_PRECONDITION) only once nothing is,
  // HTTP's before the API's.
  Status refused_grpc, refused_http;
  if (!c.grpc_listen.empty()) {
    if (!IsHostPort(c.grpc_listen)) {
      return InvalidArgumentError("--grpc-listen: expected HOST:PORT, got \"" + c.grpc_listen +
                                  "\"");
    }
    if (Status s = ApiServer::CheckOptions(ApiOptionsOf(c)); !s.ok()) {
      if (s.code() != StatusCode::kFailedPrecondition) return InvalidArgumentError(s.message());
      refused_grpc = s.WithContext("--grpc-listen");
    }
  }
  if (!c.http_listen.empty()) {
    if (!IsHostPort(c.http_listen)) {
      return InvalidArgumentError("--http-listen: expected HOST:PORT, got \"" + c.http_listen +
                                  "\"");
    }
    if (Status s = HttpServer::CheckOptions(HttpOptionsOf(c)); !s.ok()) {
      if (s.code() != StatusCode::kFailedPrecondition) return InvalidArgumentError(s.message());
      refused_http = s.WithContext("--http-listen");
    }
  }
  if (!refused_http.ok()) return refused_http;
  return refused_grpc;
}

ApiServer::Options ApiOptionsOf(const DaemonConfig& config) {
  ApiServer::Options api;
  api.tcp_listen = config.grpc_listen;
  api.tls_cert = config.tls_cert;
  api.tls_key = config.tls_key;
  api.client_ca = config.client_ca;
  api.tokens = config.tokens;
  api.idle_timeout = config.grpc_idle_timeout;
  return api;
}

HttpServer::Options HttpOptionsOf(const DaemonConfig& config) {
  HttpServer::Options http;
  http.listen = config.http_listen;
  http.max_connections = config.http_max_connections;
  http.header_timeout = config.http_header_timeout;
  http.read_timeout = config.http_read_timeout;
  http.tls_cert = config.tls_cert;
  http.tls_key = config.tls_key;
  http.client_ca = config.client_ca;
  http.metrics_auth = config.http_metrics_auth;
  http.tokens = config.tokens;
  return http;
}

StatusOr<DaemonConfig> ParseDaemonFlags(int argc, const char* const* argv) {
  DaemonConfig config;
  std::string manifests, state;
  std::string port_range = "20000-29999";
  std::string resync = "30s";
  std::string stop_grace = "10s";
  std::string retire_after = "60s";
  std::string verify_artifacts = "10m";
  std::string http_listen = "127.0.0.1:" + std::to_string(HttpServer::kDefaultPort);
  std::string http_header_timeout = "5s";
  std::string http_read_timeout = "10s";
  std::string grpc_idle_timeout = "5m";
  std::string log_format = "text";
  std::string log_level = "info";
  std::string log_max_size = "10MiB";

  CLI::App app("kilnd: converges services declared in manifests by replacing instances", "kilnd");
  app.set_version_flag("--version", std::string("kilnd ") + kVersion);
  std::string config_file;
  app.add_option("--config", config_file,
                 "YAML file of settings, each key a flag's name without \"--\" (manifests: DIR); "
                 "flags given on the command line override it");
  // Required, but possibly by --config: CheckDaemonConfig says when neither gives it.
  app.add_option("--manifests", manifests,
                 "directory of *.yaml service manifests, or git+URL#BRANCH (file://, https://, "
                 "ssh://; branch main by default) to deploy what that branch declares");
  std::string git_poll = "15s";
  app.add_option("--git-poll", git_poll,
                 "with --manifests git+...: fetch the branch this often (and on kilnctl sync)");
  app.add_option("--state", state, "state directory (kiln.db, artifacts, logs)");
  app.add_option("--driver", config.driver,
                 "instance driver for services with an artifact (services with an image run on "
                 "--docker-host)")
      ->check(CLI::IsMember({"process"}));
  app.add_option("--docker-host", config.docker_hosts,
                 "Docker engine for services with an image, a host named NAME: "
                 "name=NAME,unix:///PATH (repeatable, one per host); a bare unix:///PATH is the "
                 "host named \"default\"")
      ->allow_extra_args(false);
  std::string docker_host_timeout = "10s";
  app.add_option("--docker-host-timeout", docker_host_timeout,
                 "a Docker host whose engine does not answer for this long is down: its "
                 "instances are lost and replaced on other hosts");
  app.add_option("--port-range", port_range, "ports for instances, FIRST-LAST");
  app.add_option("--resync", resync, "period of the full resync, e.g. 30s");
  app.add_option("--stop-grace", stop_grace, "SIGTERM to SIGKILL when stopping an instance");
  app.add_option("--retire-after", retire_after,
                 "retire a service this long after its manifest document is gone (0s: at once)");
  app.add_option("--verify-artifacts", verify_artifacts,
                 "re-hash every artifact in use this often, and at start-up (0s: only on start)");
  app.add_option("--grpc-listen", config.grpc_listen,
                 "also serve the API on TCP HOST:PORT (off loopback only with TLS and tokens)");
  app.add_option("--grpc-idle-timeout", grpc_idle_timeout,
                 "close a gRPC TCP connection with no call for this long");
  app.add_option("--tls-cert", config.tls_cert,
                 "PEM certificate for the gRPC TCP and HTTP listeners");
  app.add_option("--tls-key", config.tls_key,
                 "PEM private key for the gRPC TCP and HTTP listeners");
  app.add_option("--client-ca", config.client_ca, "PEM CA: require client certificates it signed");
  std::string tokens_file;
  app.add_option("--tokens", tokens_file,
                 "file of \"TOKEN ROLE NAME\" lines (viewer|operator); the API, /api/v1 and the "
                 "dashboard then need one");
  app.add_option("--http-listen", http_listen,
                 "metrics, health, /api/v1 and the dashboard on HOST:PORT (\"\" for none; off "
                 "loopback only with TLS and tokens)");
  app.add_option("--http-header-timeout", http_header_timeout,
                 "an HTTP client must send a request's headers within this");
  app.add_option("--http-read-timeout", http_read_timeout,
                 "an HTTP request's body, and writing the response, within this");
  app.add_option("--http-max-connections", config.http_max_connections,
                 "HTTP connections at once (at the cap, a new one evicts the longest idle)")
      ->check(CLI::Range(1, 100000));
  app.add_flag("--http-metrics-auth", config.http_metrics_auth,
               "with --tokens, /metrics needs a token too");
  app.add_option("--prometheus-sd-file", config.prometheus_sd_file,
                 "write every running instance as Prometheus file_sd JSON to this file (labels "
                 "service, revision, version, instance), rewritten when one changes");
  app.add_option("--notify", config.notify_urls,
                 "POST a JSON notification of chosen events to this http(s):// URL (repeatable)");
  app.add_option("--notify-on", config.notify_on,
                 "event kinds to notify, comma-separated (default: "
                 "rollout_failed,rolled_back,manifest_error)");
  app.add_option("--notify-service", config.notify_services,
                 "notify only about this service (repeatable; default: every service)");
  app.add_option("--notify-secret-file", config.notify_secret_file,
                 "sign each notification with HMAC-SHA256 of the body keyed by this file's first "
                 "line (header X-Kiln-Signature: sha256=HEX)");
  app.add_option("--proxy", config.proxy,
                 "managed: kilnd runs kiln-proxy for services with expose: (it outlives kilnd); "
                 "off: run kiln-proxy yourself")
      ->check(CLI::IsMember({"managed", "off"}));
  app.add_flag("--stop-instances-on-exit", config.stop_instances_on_exit,
               "on SIGINT or SIGTERM, stop every instance and kiln-proxy before exiting (for a "
               "demo or a test; a service manager's daemon keeps them running)");
  std::string proxy_binary;
  app.add_option("--proxy-binary", proxy_binary,
                 "the kiln-proxy executable (default: beside kilnd's own)");
  app.add_option("--event-retention", config.event_retention, "events kept (older ones are pruned)")
      ->check(CLI::Range(int64_t{1}, int64_t{100'000'000}));
  app.add_option("--log-max-size", log_max_size,
                 "instance log files larger than this are rotated (copied to NAME.log.1, then "
                 "truncated): 4096, 512KiB, 10MiB, 1GiB");
  app.add_option("--log-max-files", config.log_max_files,
                 "log files kept per instance, the live one included (1: truncate, keep no copy)")
      ->check(CLI::Range(1, 100));
  app.add_option("--log-format", log_format, "text or json")
      ->check(CLI::IsMember({"text", "json"}));
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    std::ostringstream out, err;
    app.exit(e, out, err);
    return Status(StatusCode::kCancelled, out.str());
  } catch (const CLI::CallForVersion& e) {
    std::ostringstream out, err;
    app.exit(e, out, err);
    return Status(StatusCode::kCancelled, out.str());
  } catch (const CLI::ParseError& e) {
    return InvalidArgumentError(e.what() + std::string("\n\n") + app.help());
  }

  SettingPlaces places;
  if (!config_file.empty()) RETURN_IF_ERROR(ApplyConfigFile(app, config_file, places));

  // The values' own checks; an error about a setting the file gave is located there.
  const auto convert = [&]() -> Status {
    config.manifests = manifests;
    if (git::IsGitSource(manifests)) {
      StatusOr<git::SourceSpec> source = git::ParseSource(manifests);
      if (!source.ok()) return source.status();  // "--manifests: ..."
      config.git_source = *std::move(source);
    }
    config.state = state;
    config.proxy_binary = proxy_binary;
    if (std::sscanf(port_range.c_str(), "%d-%d", &config.port_first, &config.port_last) != 2 ||
        !(config.port_first > 0 && config.port_first <= config.port_last &&
          config.port_last <= 65535)) {
      return InvalidArgumentError("--port-range: expected FIRST-LAST within 1-65535, got \"" +
                                  port_range + "\"");
    }
    for (const auto& [flag, text, out] :
         {std::tuple{"--resync", &resync, &config.resync},
          std::tuple{"--stop-grace", &stop_grace, &config.stop_grace},
          std::tuple{"--retire-after", &retire_after, &config.retire_after},
          std::tuple{"--verify-artifacts", &verify_artifacts, &config.verify_artifacts},
          std::tuple{"--http-header-timeout", &http_header_timeout, &config.http_header_timeout},
          std::tuple{"--http-read-timeout", &http_read_timeout, &config.http_read_timeout},
          std::tuple{"--grpc-idle-timeout", &grpc_idle_timeout, &config.grpc_idle_timeout},
          std::tuple{"--git-poll", &git_poll, &config.git_poll},
          std::tuple{"--docker-host-timeout", &docker_host_timeout, &config.docker_host_timeout}}) {
      StatusOr<Duration> d = ParseDuration(*text);
      if (!d.ok()) return InvalidArgumentError(std::string(flag) + ": " + d.status().message());
      *out = *d;
    }
    StatusOr<uint64_t> log_bytes = ParseByteSize(log_max_size);
    if (!log_bytes.ok())
      return InvalidArgumentError("--log-max-size: " + log_bytes.status().message());
    config.log_max_bytes = *log_bytes;
    config.http_listen = http_listen;
    config.log_format = *ParseLogFormat(log_format);  // CLI11 checked both
    config.log_level = *ParseLogLevel(log_level);
    if (!tokens_file.empty()) {
      auto tokens = LoadTokens(tokens_file);  // the only read: both listeners get what it held
      if (!tokens.ok()) return InvalidArgumentError("--tokens: " + tokens.status().message());
      config.tokens = std::move(tokens).value();
    }
    // A refusal to serve (FAILED_PRECONDITION) is not bad usage: Daemon::Start logs it, exit 1.
    if (Status s = CheckDaemonConfig(config);
        !s.ok() && s.code() != StatusCode::kFailedPrecondition) {
      return s;
    }
    return Status::Ok();
  };
  RETURN_IF_ERROR(Located(convert(), places));
  return config;
}

int ReportFlagError(const Status& error) {
  if (error.code() == StatusCode::kCancelled) {
    std::cout << error.message() << std::flush;
    return 0;
  }
  std::cerr << "kilnd: " << error.message();
  if (error.message().empty() || error.message().back() != '\n') std::cerr << "\n";
  return 2;
}

}  // namespace kiln
