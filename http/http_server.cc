#include "http/http_server.h"

#include <sys/socket.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cerrno>
#include <cstring>
#include <list>
#include <map>
#include <nlohmann/json.hpp>

#include "api/api_server.h"
#include "common/cancel_quietly.h"
#include "common/descriptors.h"
#include "common/logging.h"
#include "storage/state_store.h"

namespace kiln {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
namespace ssl = asio::ssl;

namespace {

// Messages can carry what a client sent (a path, a query value): control characters are
// escaped and bytes that are not UTF-8 replaced, so the body is always valid JSON.
std::string JsonError(const std::string& message) {
  return nlohmann::json{{"error", message}}.dump(-1, ' ', false,
                                                 nlohmann::json::error_handler_t::replace);
}

int HttpCode(StatusCode c) {
  switch (c) {
    case StatusCode::kNotFound:
      return 404;
    case StatusCode::kInvalidArgument:
      return 400;
    case StatusCode::kOutOfRange:
      return 410;
    default:
      return 503;
  }
}

std::map<std::string, std::string> Query(std::string_view q) {
  std::map<std::string, std::string> out;
  while (!q.empty()) {
    size_t amp = q.find('&');
    std::string_view kv = q.substr(0, amp);
    size_t eq = kv.find('=');
    out[std::string(kv.substr(0, eq))] =
        eq == std::string_view::npos ? "" : std::string(kv.substr(eq + 1));
    if (amp == std::string_view::npos) break;
    q.remove_prefix(amp + 1);
  }
  return out;
}

// What a path needs before it is served.
enum class Access { kOpen, kToken };

}  // namespace

struct HttpServer::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io_in, Options o, Sources s)
      : io(io_in), options(std::move(o)), sources(std::move(s)), acceptor(io_in) {}

  struct Response {
    unsigned status = 200;
    std::string content_type = "application/json";
    std::string body;
    std::string allow;
    bool challenge = false;  // 401: add WWW-Authenticate
  };

  Access AccessOf(std::string_view path) const {
    if (!options.tokens) return Access::kOpen;
    if (path == "/healthz" || path == "/readyz") return Access::kOpen;
    if (path == "/metrics") return options.metrics_auth ? Access::kToken : Access::kOpen;
    return Access::kToken;  // the dashboard and /api/v1
  }

  Response Route(http::verb method, std::string_view target, std::string_view authorization) {
    std::string_view path = target.substr(0, target.find('?'));
    std::string_view query =
        target.find('?') == std::string_view::npos ? "" : target.substr(target.find('?') + 1);
    const bool known = path == "/" || path == "/metrics" || path == "/healthz" ||
                       path == "/readyz" || path == "/api/v1/services" ||
                       path.rfind("/api/v1/services/", 0) == 0 || path == "/api/v1/events" ||
                       path == "/api/v1/sync";
    if (!known)
      return {404, "application/json", JsonError("no such path: " + std::string(path)), "", false};
    if (path == "/api/v1/sync") return Sync(method, authorization);
    if (method != http::verb::get && method != http::verb::head) {
      return {405, "application/json", JsonError("only GET and HEAD are allowed here"), "GET, HEAD",
              false};
    }
    if (AccessOf(path) == Access::kToken) {
      StatusOr<Caller> caller = AuthenticateBearer(*options.tokens, authorization);
      if (!caller.ok()) {
        // The page holds no data: it asks for a token and sends it with its own requests.
        if (path == "/") return {401, "text/html; charset=utf-8", DashboardHtml(), "", true};
        return {401, "application/json", JsonError(caller.status().message()), "", true};
      }
    }
    if (path == "/") return {200, "text/html; charset=utf-8", DashboardHtml(), "", false};
    if (path == "/metrics")
      return {200, "text/plain; version=0.0.4; charset=utf-8", sources.metrics(), "", false};
    if (path == "/healthz") return {200, "application/json", "{\"status\":\"alive\"}", "", false};
    if (path == "/readyz") {
      Readiness r = sources.readiness();
      return {r.ready ? 200u : 503u, "application/json", r.json, "", false};
    }
    StatusOr<std::string> body = InternalError("unrouted");
    std::optional<git::SourceStatus> git_snapshot;
    if (sources.git_status) git_snapshot = sources.git_status();
    const git::SourceStatus* git_status = git_snapshot ? &*git_snapshot : nullptr;
    if (path == "/api/v1/services") {
      std::optional<std::vector<DockerHostStatus>> hosts;
      if (sources.docker_hosts) hosts = sources.docker_hosts();
      body = ServicesJson(*sources.reader, RealClockInstance(), sources.endpoints, git_status,
                          hosts ? &*hosts : nullptr);
    } else if (path == "/api/v1/events") {
      auto q = Query(query);
      char* end = nullptr;
      long long since = std::strtoll(q["since"].c_str(), &end, 10);
      if (!q["since"].empty() && (*end != '\0' || since < 0)) {
        return {400, "application/json",
                JsonError("since must be a sequence number, got \"" + q["since"] + "\""), "",
                false};
      }
      body = EventsJson(*sources.reader, since, q["service"], 500);
    } else {
      std::string name(path.substr(std::string_view("/api/v1/services/").size()));
      constexpr std::string_view kEndpoints = "/endpoints";
      constexpr std::string_view kHistory = "/history";
      if (name.size() > kEndpoints.size() &&
          name.compare(name.size() - kEndpoints.size(), kEndpoints.size(), kEndpoints) == 0) {
        name.resize(name.size() - kEndpoints.size());
        body = EndpointsJson(*sources.reader, name);
      } else if (name.size() > kHistory.size() && name.ends_with(kHistory)) {
        name.resize(name.size() - kHistory.size());
        body = HistoryJson(*sources.reader, name);
      } else {
        body =
            ServiceJson(*sources.reader, name, RealClockInstance(), sources.endpoints, git_status);
      }
    }
    if (!body.ok()) {
      return {static_cast<unsigned>(HttpCode(body.status().code())), "application/json",
              JsonError(body.status().message()), "", false};
    }
    return {200, "application/json", *body, "", false};
  }

  // POST /api/v1/sync: the git source is fetched now rather than at its next poll. The one write
  // over HTTP; with tokens it needs the operator role, as the gRPC Sync does. 202 with
  // {"fetch": N}: done once the source's fetches_done reaches N.
  Response Sync(http::verb method, std::string_view authorization) {
    if (method != http::verb::post) {
      return {405, "application/json", JsonError("only POST is allowed here"), "POST", false};
    }
    if (options.tokens) {
      StatusOr<Caller> caller = AuthenticateBearer(*options.tokens, authorization);
      if (!caller.ok())
        return {401, "application/json", JsonError(caller.status().message()), "", true};
      if (caller->role != Role::kOperator) {
        return {403, "application/json",
                JsonError(caller->name +
                          " is not an operator; POST /api/v1/sync needs the operator role"),
                "", false};
      }
    }
    if (!sources.sync) {
      return {409, "application/json",
              JsonError("the manifests are a directory, not a git source: nothing to sync"), "",
              false};
    }
    const int64_t fetch = sources.sync();
    return {202, "application/json", nlohmann::json{{"fetch", fetch}}.dump(), "", false};
  }

  // What the server knows of each connection, to evict an idle one when the cap is reached.
  class Connection {
   public:
    virtual ~Connection() = default;
    // True while it waits for a request's headers (or its TLS handshake): nothing in progress.
    bool idle() const { return idle_; }
    std::chrono::steady_clock::time_point idle_since() const { return idle_since_; }
    // Closes it; it no longer counts as idle (its end runs as soon as the io_context gets to it).
    void EvictNow() {
      idle_ = false;
      Evict();
    }

   protected:
    virtual void Evict() = 0;
    void SetIdle(bool idle) {
      idle_ = idle;
      if (idle) idle_since_ = std::chrono::steady_clock::now();
    }

   private:
    bool idle_ = true;
    std::chrono::steady_clock::time_point idle_since_ = std::chrono::steady_clock::now();
  };

  // One connection; Stream is beast::tcp_stream or beast::ssl_stream<beast::tcp_stream>.
  template <class Stream>
  class Session : public Connection, public std::enable_shared_from_this<Session<Stream>> {
   public:
    static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

    Session(tcp::socket socket, std::shared_ptr<Impl> server)
        : stream_(MakeStream(std::move(socket), *server)), server_(std::move(server)) {
      self_in_list_ = server_->connections.insert(server_->connections.end(), this);
    }
    ~Session() override { server_->connections.erase(self_in_list_); }

    void Run() {
      if constexpr (kTls) {
        beast::get_lowest_layer(stream_).expires_after(server_->options.header_timeout);
        stream_.async_handshake(ssl::stream_base::server,
                                [self = this->shared_from_this()](beast::error_code ec) {
                                  if (ec) return;  // not TLS, a bad certificate, too slow: drop it
                                  self->Read();
                                });
      } else {
        Read();
      }
    }

   protected:
    void Evict() override {
      beast::error_code ignored;
      beast::get_lowest_layer(stream_).socket().close(ignored);  // its pending read ends
    }

   private:
    static Stream MakeStream(tcp::socket socket, Impl& server) {
      if constexpr (kTls) {
        return Stream(std::move(socket), *server.tls);
      } else {
        return Stream(std::move(socket));
      }
    }

    void Read() {
      SetIdle(true);
      parser_.emplace();
      parser_->header_limit(static_cast<uint32_t>(server_->options.header_limit));
      parser_->body_limit(server_->options.body_limit);
      // All of the headers within the deadline: a client that trickles them is dropped.
      beast::get_lowest_layer(stream_).expires_after(server_->options.header_timeout);
      http::async_read_header(stream_, buffer_, *parser_,
                              [self = this->shared_from_this()](beast::error_code ec, size_t) {
                                self->SetIdle(false);
                                if (ec) return self->Failed(ec);
                                if (self->parser_->is_done()) return self->Handle();
                                beast::get_lowest_layer(self->stream_)
                                    .expires_after(self->server_->options.read_timeout);
                                http::async_read(self->stream_, self->buffer_, *self->parser_,
                                                 [self](beast::error_code ec2, size_t) {
                                                   if (ec2) return self->Failed(ec2);
                                                   self->Handle();
                                                 });
                              });
    }

    void Failed(beast::error_code ec) {
      if (ec == http::error::header_limit || ec == http::error::body_limit) {
        return Send({ec == http::error::header_limit ? 431u : 413u, "application/json",
                     JsonError(ec.message()), "", false},
                    false, 11);
      }
      // Closed, timed out, evicted or garbage: drop it.
    }

    void Handle() {
      auto& req = parser_->get();
      std::string_view auth(req[http::field::authorization].data(),
                            req[http::field::authorization].size());
      Response r = server_->Route(req.method(),
                                  std::string_view(req.target().data(), req.target().size()), auth);
      if (req.method() == http::verb::head) r.body.clear();
      Send(std::move(r), req.keep_alive(), req.version());
    }

    void Send(Response r, bool keep_alive, unsigned version) {
      auto res = std::make_shared<http::response<http::string_body>>(
          static_cast<http::status>(r.status), version);
      res->set(http::field::server, "kilnd");
      res->set(http::field::content_type, r.content_type);
      res->set(http::field::cache_control, "no-store");
      res->set("X-Content-Type-Options", "nosniff");
      if (r.content_type.rfind("text/html", 0) == 0) {
        // The page's own script and style only; it talks to this server alone.
        res->set("Content-Security-Policy",
                 "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                 "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
        res->set("Referrer-Policy", "no-referrer");
      }
      if (r.challenge) res->set(http::field::www_authenticate, "Bearer realm=\"kilnd\"");
      if (!r.allow.empty()) res->set(http::field::allow, r.allow);
      res->keep_alive(keep_alive);
      res->body() = std::move(r.body);
      res->prepare_payload();
      beast::get_lowest_layer(stream_).expires_after(server_->options.read_timeout);
      http::async_write(stream_, *res,
                        [self = this->shared_from_this(), res](beast::error_code ec, size_t) {
                          if (ec) return;
                          if (res->keep_alive()) return self->Read();
                          self->Close();
                        });
    }

    void Close() {
      if constexpr (kTls) {
        stream_.async_shutdown([self = this->shared_from_this()](beast::error_code) {
          beast::error_code ignored;
          beast::get_lowest_layer(self->stream_)
              .socket()
              .shutdown(tcp::socket::shutdown_both, ignored);
        });
      } else {
        beast::error_code ignored;
        stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
      }
    }

    Stream stream_;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::string_body>> parser_;
    std::shared_ptr<Impl> server_;
    std::list<Connection*>::iterator self_in_list_;
  };

  // At the cap, the connection that has waited longest without sending a request makes room;
  // false when every connection is busy with a request.
  bool EvictOldestIdle() {
    Connection* oldest = nullptr;
    for (Connection* c : connections) {
      if (c->idle() && (oldest == nullptr || c->idle_since() < oldest->idle_since())) oldest = c;
    }
    if (oldest == nullptr) return false;
    oldest->EvictNow();
    ++evicted;
    return true;
  }

  // Accepts with accept4(SOCK_CLOEXEC): Asio 1.74's accept does not ask for close-on-exec, and
  // marking a socket after accept() would leave a window in which a spawn on another thread
  // inherits it.
  void Accept() {
    acceptor.async_wait(tcp::acceptor::wait_read, [self =
                                                       shared_from_this()](beast::error_code ec) {
      if (ec == asio::error::operation_aborted) return;
      while (!ec) {
        int fd = ::accept4(self->acceptor.native_handle(), nullptr, nullptr,
                           SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0 && errno == EINTR) continue;
        if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
          // Out of descriptors: the connection waits in the backlog; try again shortly rather
          // than spin on a listener that stays readable.
          LogWarn("HTTP cannot accept a connection",
                  {{"error", std::string(std::strerror(errno))}});
          self->retry_timer.expires_after(std::chrono::milliseconds(100));
          self->retry_timer.async_wait([self](beast::error_code e) {
            if (!e) self->Accept();
          });
          return;
        }
        if (fd < 0) break;  // EAGAIN: the backlog is drained; or the client gave up already
        tcp::socket socket(self->io);
        beast::error_code assign_ec;
        socket.assign(self->acceptor.local_endpoint().protocol(), fd, assign_ec);
        if (assign_ec) {
          ::close(fd);
          continue;
        }
        self->Admit(std::move(socket));
      }
      self->Accept();
    });
  }

  void Admit(tcp::socket socket) {
    const bool room =
        static_cast<int>(connections.size()) < options.max_connections || EvictOldestIdle();
    if (!room) {
      beast::error_code ignored;
      socket.close(ignored);  // every connection busy: refuse rather than queue without bound
    } else if (tls) {
      std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(std::move(socket),
                                                                      shared_from_this())
          ->Run();
    } else {
      std::make_shared<Session<beast::tcp_stream>>(std::move(socket), shared_from_this())->Run();
    }
  }

  asio::io_context& io;
  Options options;
  Sources sources;
  std::unique_ptr<ssl::context> tls;  // set for HTTPS
  tcp::acceptor acceptor;
  asio::steady_timer retry_timer{io};  // accepting again after running out of descriptors
  std::list<Connection*> connections;  // open sessions; on the io_context's thread only
  int64_t evicted = 0;                 // idle connections closed to make room
};

HttpServer::HttpServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  beast::error_code ignored;
  impl_->acceptor.close(ignored);
  CancelQuietly(impl_->retry_timer, "HTTP accept retry timer");
}

int HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

namespace {

StatusOr<std::unique_ptr<ssl::context>> MakeTlsContext(const HttpServer::Options& o) {
  auto ctx = std::make_unique<ssl::context>(ssl::context::tls_server);
  beast::error_code ec;
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                       ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 |
                       ssl::context::single_dh_use,
                   ec);
  if (!ec) ctx->use_certificate_chain_file(o.tls_cert, ec);
  if (ec)
    return InvalidArgumentError("cannot use --tls-cert " + o.tls_cert +
                                " for HTTPS: " + ec.message());
  ctx->use_private_key_file(o.tls_key, ssl::context::pem, ec);
  if (ec)
    return InvalidArgumentError("cannot use --tls-key " + o.tls_key +
                                " for HTTPS: " + ec.message());
  if (!o.client_ca.empty()) {
    ctx->load_verify_file(o.client_ca, ec);
    if (!ec) ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
    if (ec)
      return InvalidArgumentError("cannot use --client-ca " + o.client_ca +
                                  " for HTTPS: " + ec.message());
  }
  return ctx;
}

}  // namespace

namespace {

// The endpoint to bind, or why these options cannot be served.
StatusOr<tcp::endpoint> CheckedEndpoint(const HttpServer::Options& options) {
  size_t colon = options.listen.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgumentError("--http-listen: expected HOST:PORT, got \"" + options.listen +
                                "\"");
  }
  std::string host = options.listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";
  beast::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  char* end = nullptr;
  long port = std::strtol(options.listen.c_str() + colon + 1, &end, 10);
  if (ec || end == options.listen.c_str() + colon + 1 || *end != '\0' || port < 0 || port > 65535) {
    return InvalidArgumentError("--http-listen: bad address \"" + options.listen + "\"");
  }
  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty();
  if (tls && (options.tls_cert.empty() || options.tls_key.empty())) {
    return InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!options.client_ca.empty() && !tls)
    return InvalidArgumentError("--client-ca needs --tls-cert and --tls-key");
  if (!addr.is_loopback() && !(tls && options.tokens)) {
    return FailedPreconditionError(
        "refusing to serve HTTP on " + options.listen +
        " without TLS and tokens: anyone who can reach it could read every service, instance and "
        "event. Give --tls-cert, --tls-key and --tokens, or listen on 127.0.0.1");
  }
  if (options.metrics_auth && !options.tokens) {
    return InvalidArgumentError("--http-metrics-auth needs --tokens");
  }
  return tcp::endpoint(addr, static_cast<uint16_t>(port));
}

}  // namespace

Status HttpServer::CheckOptions(const Options& options) {
  return CheckedEndpoint(options).status();
}

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(asio::io_context& io,
                                                        const Options& options, Sources sources) {
  ASSIGN_OR_RETURN(tcp::endpoint ep, CheckedEndpoint(options));
  const bool tls = !options.tls_cert.empty();
  beast::error_code ec;
  auto impl = std::make_shared<Impl>(io, options, std::move(sources));
  if (tls) {
    ASSIGN_OR_RETURN(impl->tls, MakeTlsContext(options));
  }
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) {
    if (Status s = SetCloseOnExec(impl->acceptor.native_handle()); !s.ok()) {
      return s.WithContext("HTTP listener on " + options.listen);
    }
  }
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) impl->acceptor.non_blocking(true, ec);  // Accept() drains the backlog
  if (ec)
    return UnavailableError("cannot listen on " + options.listen + " for HTTP: " + ec.message());
  impl->Accept();
  LogInfo("HTTP listening", {{"listen", options.listen},
                             {"port", impl->acceptor.local_endpoint().port()},
                             {"tls", tls},
                             {"tokens", options.tokens.has_value()},
                             {"metrics_auth", options.metrics_auth}});
  return std::unique_ptr<HttpServer>(new HttpServer(impl));
}

}  // namespace kiln
