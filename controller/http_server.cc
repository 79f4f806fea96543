#include "controller/http_server.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <map>

#include "common/logging.h"
#include "controller/api_server.h"
#include "storage/state_store.h"

namespace kiln {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

std::string JsonError(const std::string& message) {
  std::string out = "{\"error\":\"";
  for (char c : message) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"}";
}

int HttpCode(StatusCode c) {
  switch (c) {
    case StatusCode::kNotFound: return 404;
    case StatusCode::kInvalidArgument: return 400;
    case StatusCode::kOutOfRange: return 410;
    default: return 503;
  }
}

std::map<std::string, std::string> Query(std::string_view q) {
  std::map<std::string, std::string> out;
  while (!q.empty()) {
    size_t amp = q.find('&');
    std::string_view kv = q.substr(0, amp);
    size_t eq = kv.find('=');
    out[std::string(kv.substr(0, eq))] = eq == std::string_view::npos ? "" : std::string(kv.substr(eq + 1));
    if (amp == std::string_view::npos) break;
    q.remove_prefix(amp + 1);
  }
  return out;
}

}  // namespace

struct HttpServer::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io_in, Options o, Sources s) : io(io_in), options(std::move(o)), sources(std::move(s)), acceptor(io_in) {}

  struct Response {
    unsigned status = 200;
    std::string content_type = "application/json";
    std::string body;
    std::string allow;
  };

  Response Route(http::verb method, std::string_view target) {
    std::string_view path = target.substr(0, target.find('?'));
    std::string_view query = target.find('?') == std::string_view::npos ? "" : target.substr(target.find('?') + 1);
    const bool known = path == "/" || path == "/metrics" || path == "/healthz" || path == "/readyz" ||
                       path == "/api/v1/services" || path.rfind("/api/v1/services/", 0) == 0 ||
                       path == "/api/v1/events";
    if (!known) return {404, "application/json", JsonError("no such path: " + std::string(path)), ""};
    if (method != http::verb::get && method != http::verb::head) {
      return {405, "application/json", JsonError("only GET and HEAD are allowed here"), "GET, HEAD"};
    }
    if (path == "/") return {200, "text/html; charset=utf-8", DashboardHtml(), ""};
    if (path == "/metrics") return {200, "text/plain; version=0.0.4; charset=utf-8", sources.metrics(), ""};
    if (path == "/healthz") return {200, "application/json", "{\"status\":\"alive\"}", ""};
    if (path == "/readyz") {
      Readiness r = sources.readiness();
      return {r.ready ? 200u : 503u, "application/json", r.json, ""};
    }
    StatusOr<std::string> body = InternalError("unrouted");
    if (path == "/api/v1/services") {
      body = ServicesJson(*sources.reader);
    } else if (path == "/api/v1/events") {
      auto q = Query(query);
      char* end = nullptr;
      long long since = std::strtoll(q["since"].c_str(), &end, 10);
      if (!q["since"].empty() && (*end != '\0' || since < 0)) {
        return {400, "application/json", JsonError("since must be a sequence number, got \"" + q["since"] + "\""), ""};
      }
      body = EventsJson(*sources.reader, since, q["service"], 500);
    } else {
      std::string name(path.substr(std::string_view("/api/v1/services/").size()));
      body = ServiceJson(*sources.reader, name);
    }
    if (!body.ok()) return {static_cast<unsigned>(HttpCode(body.status().code())), "application/json", JsonError(body.status().message()), ""};
    return {200, "application/json", *body, ""};
  }

  class Session : public std::enable_shared_from_this<Session> {
   public:
    Session(tcp::socket socket, std::shared_ptr<Impl> server) : stream_(std::move(socket)), server_(std::move(server)) {}
    ~Session() { --server_->connections; }

    void Read() {
      parser_.emplace();
      parser_->header_limit(static_cast<uint32_t>(server_->options.header_limit));
      parser_->body_limit(server_->options.body_limit);
      stream_.expires_after(server_->options.read_timeout);  // a slow client is dropped
      http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec == http::error::header_limit || ec == http::error::body_limit) {
          return self->Send({ec == http::error::header_limit ? 431u : 413u, "application/json",
                             JsonError(ec.message()), ""}, false, 11);
        }
        if (ec) return;  // closed, timed out or garbage: drop it
        auto& req = self->parser_->get();
        Response r = self->server_->Route(req.method(), std::string_view(req.target().data(), req.target().size()));
        if (req.method() == http::verb::head) r.body.clear();
        self->Send(std::move(r), req.keep_alive(), req.version());
      });
    }

   private:
    void Send(Response r, bool keep_alive, unsigned version) {
      auto res = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(r.status), version);
      res->set(http::field::server, "kilnd");
      res->set(http::field::content_type, r.content_type);
      res->set(http::field::cache_control, "no-store");
      if (!r.allow.empty()) res->set(http::field::allow, r.allow);
      res->keep_alive(keep_alive);
      res->body() = std::move(r.body);
      res->prepare_payload();
      http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
        if (ec || !res->keep_alive()) {
          beast::error_code ignored;
          self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
          return;
        }
        self->Read();
      });
    }

    beast::tcp_stream stream_;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::string_body>> parser_;
    std::shared_ptr<Impl> server_;
  };

  void Accept() {
    acceptor.async_accept([self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        if (self->connections >= self->options.max_connections) {
          beast::error_code ignored;
          socket.close(ignored);  // over the cap: refuse rather than queue without bound
        } else {
          ++self->connections;
          std::make_shared<Session>(std::move(socket), self)->Read();
        }
      }
      self->Accept();
    });
  }

  asio::io_context& io;
  Options options;
  Sources sources;
  tcp::acceptor acceptor;
  int connections = 0;  // on the io_context's thread only
};

HttpServer::HttpServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  beast::error_code ignored;
  impl_->acceptor.close(ignored);
}

int HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(asio::io_context& io, const Options& options, Sources sources) {
  size_t colon = options.listen.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgumentError("--http-listen: expected HOST:PORT, got \"" + options.listen + "\"");
  }
  std::string host = options.listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";
  beast::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  int port = std::atoi(options.listen.c_str() + colon + 1);
  if (ec || port < 0 || port > 65535) {
    return InvalidArgumentError("--http-listen: bad address \"" + options.listen + "\"");
  }
  auto impl = std::make_shared<Impl>(io, options, std::move(sources));
  tcp::endpoint ep(addr, static_cast<uint16_t>(port));
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return UnavailableError("cannot listen on " + options.listen + " for HTTP: " + ec.message());
  impl->Accept();
  LogInfo("HTTP listening", {{"listen", options.listen}, {"port", impl->acceptor.local_endpoint().port()}});
  return std::unique_ptr<HttpServer>(new HttpServer(impl));
}

}  // namespace kiln
