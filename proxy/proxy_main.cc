#include "proxy/proxy_main.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <array>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <tuple>

#include "common/descriptors.h"
#include "common/logging.h"
#include "common/regular_file.h"
#include "kiln/version.h"
#include "proxy/endpoints_file.h"
#include "proxy/kilnd_client.h"
#include "proxy/proxy.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

struct ProxyFlags {
  std::string kilnd;
  std::string token;
  std::string tls_ca, tls_cert, tls_key;  // PEM contents
  std::string id;
  fs::path endpoints_file;
  LogFormat log_format = LogFormat::kText;
  LogLevel log_level = LogLevel::kInfo;
};

// The token is the file's first line without the spaces around it (a trailing newline is what
// editors and `echo` leave).
StatusOr<std::string> ReadToken(const fs::path& path) {
  StatusOr<std::string> text = ReadRegularFile(path, 64 << 10, "--token-file " + path.string());
  if (!text.ok()) return text.status();
  std::string line = text->substr(0, text->find('\n'));
  const char* space = " \t\r\f\v";
  const size_t first = line.find_first_not_of(space);
  if (first == std::string::npos) {
    return InvalidArgumentError("--token-file " + path.string() + ": the first line is empty");
  }
  return line.substr(first, line.find_last_not_of(space) - first + 1);
}

std::string DefaultId() {
  std::array<char, 256> host{};
  if (::gethostname(host.data(), host.size() - 1) != 0) host[0] = '\0';
  return std::string(host.data()) + ":" + std::to_string(::getpid());
}

// kCancelled carries --help or --version text for stdout.
StatusOr<ProxyFlags> ParseFlags(int argc, char** argv) {
  ProxyFlags flags;
  std::string token_file, endpoints_file;
  std::string log_format = "text", log_level = "info";
  CLI::App app(
      "kiln-proxy: the stable addresses of the services with expose:, fed by kilnd's "
      "WatchEndpoints stream; keeps serving what it knew while kilnd is down",
      "kiln-proxy");
  app.set_version_flag("--version", std::string("kiln-proxy ") + kVersion);
  app.add_option("--kilnd", flags.kilnd,
                 "kilnd's gRPC API: unix:PATH (STATE/kiln.sock) or HOST:PORT; without it the "
                 "endpoints file is the only source (static mode)");
  app.add_option("--token-file", token_file,
                 "file whose first line is the API token sent to kilnd (with kilnd --tokens)");
  std::string tls_ca, tls_cert, tls_key;
  app.add_option("--tls-ca", tls_ca,
                 "PEM CA that signed kilnd's certificate: TLS to a HOST:PORT --kilnd");
  app.add_option("--tls-cert", tls_cert, "PEM client certificate (mutual TLS; with --tls-key)");
  app.add_option("--tls-key", tls_key, "PEM client key (mutual TLS; with --tls-cert)");
  app.add_option("--id", flags.id, "this proxy's name in its reports (default HOSTNAME:PID)");
  app.add_option("--endpoints-file", endpoints_file,
                 "served at start-up if it exists, then rewritten with each snapshot from kilnd "
                 "(proto JSON of an EndpointsSnapshot)");
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
  if (flags.kilnd.empty() && endpoints_file.empty()) {
    return InvalidArgumentError(
        "give --kilnd, --endpoints-file or both: there is nothing to serve");
  }
  if (!token_file.empty()) {
    StatusOr<std::string> token = ReadToken(token_file);
    if (!token.ok()) return InvalidArgumentError(token.status().message());
    flags.token = std::move(token).value();
  }
  if (tls_cert.empty() != tls_key.empty()) {
    return InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if ((!tls_ca.empty() || !tls_cert.empty()) &&
      (flags.kilnd.empty() || flags.kilnd.starts_with("unix:"))) {
    return InvalidArgumentError("--tls-ca, --tls-cert and --tls-key are for a HOST:PORT --kilnd");
  }
  for (const auto& [flag, path, out] : {std::tuple{"--tls-ca", &tls_ca, &flags.tls_ca},
                                        std::tuple{"--tls-cert", &tls_cert, &flags.tls_cert},
                                        std::tuple{"--tls-key", &tls_key, &flags.tls_key}}) {
    if (path->empty()) continue;
    StatusOr<std::string> pem = ReadRegularFile(*path, 1 << 20, std::string(flag) + " " + *path);
    if (!pem.ok()) return InvalidArgumentError(pem.status().message());
    *out = std::move(pem).value();
  }
  if (flags.id.empty()) flags.id = DefaultId();
  flags.endpoints_file = endpoints_file;
  flags.log_format = *ParseLogFormat(log_format);  // CLI11 checked both
  flags.log_level = *ParseLogLevel(log_level);
  return flags;
}

int64_t UnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int RunKilnProxy(int argc, char** argv) {
  StatusOr<ProxyFlags> flags = ParseFlags(argc, argv);
  if (!flags.ok()) {
    const Status error = flags.status();
    const std::string& message = error.message();
    if (error.code() == StatusCode::kCancelled) {
      std::cout << message << std::flush;
      return 0;
    }
    std::cerr << "kiln-proxy: " << message;
    if (message.empty() || message.back() != '\n') std::cerr << "\n";
    return 2;
  }
  SetupLogging(flags->log_format, flags->log_level);
  const int64_t started_unix_ms = UnixMillis();

  // Two descriptors per connection, and a pipe pair per direction with zero-copy forwarding:
  // the soft limit of 1024 a shell gives would cap the proxy at a few hundred connections.
  if (auto nofile = RaiseNofileLimit(); nofile.ok()) {
    LogDebug("descriptor limit", {{"soft", static_cast<int64_t>(nofile->soft)},
                                  {"hard", static_cast<int64_t>(nofile->hard)}});
  } else {
    LogWarn("cannot raise the descriptor limit", {{"error", nofile.status().message()}});
  }

  // This thread runs the io_context: it is the Proxy's thread from here on.
  boost::asio::io_context io(1);
  std::optional<Proxy> proxy;
  proxy.emplace(io);

  // What the proxy served before it was restarted, until kilnd says otherwise.
  KilndClient::Options client_options;
  if (!flags->endpoints_file.empty()) {
    StatusOr<v1::EndpointsSnapshot> kept = ReadEndpointsFile(flags->endpoints_file);
    if (kept.ok()) {
      std::vector<std::string> skipped;
      proxy->Apply(RoutesFromSnapshot(*kept, &skipped));
      for (const std::string& why : skipped) {
        LogWarn("endpoint left out of the endpoints file", {{"why", why}});
      }
      client_options.kilnd_id = kept->kilnd_id();
      client_options.version = kept->version();
      LogInfo("serving the endpoints file",
              {{"file", flags->endpoints_file.string()},
               {"kilnd_id", kept->kilnd_id()},
               {"version", kept->version()},
               {"services", static_cast<int64_t>(kept->services_size())}});
    } else if (kept.status().code() == StatusCode::kNotFound && !flags->kilnd.empty()) {
      LogInfo("no endpoints file yet; waiting for kilnd",
              {{"file", flags->endpoints_file.string()}});
    } else if (flags->kilnd.empty()) {
      // Static mode: the file is all there is to serve.
      LogError("cannot serve the endpoints file", {{"error", kept.status().message()}});
      return 1;
    } else {
      LogError("endpoints file unusable; starting empty until kilnd answers",
               {{"file", flags->endpoints_file.string()}, {"error", kept.status().message()}});
    }
  }

  std::optional<KilndClient> client;
  if (!flags->kilnd.empty()) {
    client_options.target = flags->kilnd;
    client_options.token = flags->token;
    client_options.tls_ca = flags->tls_ca;
    client_options.tls_cert = flags->tls_cert;
    client_options.tls_key = flags->tls_key;
    client_options.proxy_id = flags->id;
    client_options.endpoints_file = flags->endpoints_file;
    client_options.started_unix_ms = started_unix_ms;
    client.emplace(io, *proxy, std::move(client_options));
    client->Start();
  }

  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    LogInfo("shutting down; closing the listeners",
            {{"signal", signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
    if (client) client->RequestStop();  // the client threads are joined once io has stopped
    proxy.reset();
    io.stop();
  });

  LogInfo("kiln-proxy ready", {{"version", kVersion},
                               {"id", flags->id},
                               {"kilnd", flags->kilnd.empty() ? "none (static)" : flags->kilnd},
                               {"pid", static_cast<int64_t>(::getpid())}});
  auto work = boost::asio::make_work_guard(io);  // runs until a signal
  io.run();
  client.reset();
  LogInfo("kiln-proxy stopped");
  return 0;
}

}  // namespace kiln
