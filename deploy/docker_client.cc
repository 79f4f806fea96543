#include "deploy/docker_client.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <charconv>
#include <exception>
#include <nlohmann/json.hpp>
#include <optional>

#include "common/cancel_quietly.h"
#include "common/logging.h"

namespace kiln::docker {
namespace asio = boost::asio;
namespace http = boost::beast::http;
using local = asio::local::stream_protocol;
using boost::system::error_code;

namespace {

// The newest API version this client was written against, and the oldest it can use (Docker
// 19.03). An engine that speaks a newer one is talked to in this one.
constexpr int kMaxMajor = 1, kMaxMinor = 45;
constexpr int kMinMajor = 1, kMinMinor = 40;
constexpr size_t kMaxResponseBytes = 64 << 20;

std::optional<std::pair<int, int>> ParseVersion(std::string_view v) {
  size_t dot = v.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  int major = 0, minor = 0;
  auto r1 = std::from_chars(v.data(), v.data() + dot, major);
  auto r2 = std::from_chars(v.data() + dot + 1, v.data() + v.size(), minor);
  if (r1.ec != std::errc() || r2.ec != std::errc() || r1.ptr != v.data() + dot ||
      r2.ptr != v.data() + v.size()) {
    return std::nullopt;
  }
  return std::make_pair(major, minor);
}

http::verb VerbOf(Method m) {
  switch (m) {
    case Method::kGet:
      return http::verb::get;
    case Method::kPost:
      return http::verb::post;
    case Method::kDelete:
      return http::verb::delete_;
  }
  return http::verb::get;
}

const char* NameOf(Method m) {
  switch (m) {
    case Method::kGet:
      return "GET";
    case Method::kPost:
      return "POST";
    case Method::kDelete:
      return "DELETE";
  }
  return "?";
}

// One connection's socket and the timer that closes it when the call takes too long.
struct Connection {
  explicit Connection(const asio::any_io_executor& ex) : socket(ex), timer(ex) {}
  local::socket socket;
  asio::steady_timer timer;
  bool timed_out = false;
};

// Cancels a connection's timer when the call ends, however it ends: an armed timer would keep
// the io_context busy (CallSync's private one runs until it fires) and the connection alive.
struct DisarmOnExit {
  Connection& c;
  ~DisarmOnExit() { CancelQuietly(c.timer, "Docker call timer"); }
};

void ArmTimeout(const std::shared_ptr<Connection>& c, Duration timeout) {
  c->timer.expires_after(timeout);
  c->timer.async_wait([c](const error_code& ec) {
    if (ec) return;  // cancelled: the call ended in time
    c->timed_out = true;
    error_code ignored;
    c->socket.close(ignored);
  });
}

http::request<http::string_body> MakeRequest(Method method, const std::string& target,
                                             std::string body, const std::string& content_type) {
  http::request<http::string_body> req{VerbOf(method), target, 11};
  req.set(http::field::host, "docker");  // required by HTTP/1.1; the engine ignores it
  req.set(http::field::user_agent, "kiln");
  if (!body.empty() || method == Method::kPost) {
    req.set(http::field::content_type, content_type);
    req.body() = std::move(body);
  }
  req.prepare_payload();
  return req;
}

}  // namespace

StatusOr<Endpoint> ParseEndpoint(std::string_view text) {
  Endpoint e;
  e.text = std::string(text);
  if (text.substr(0, 7) == "unix://") {
    e.kind = Endpoint::Kind::kUnix;
    e.path = std::string(text.substr(7));
    if (e.path.empty() || e.path[0] != '/') {
      return InvalidArgumentError("\"" + e.text +
                                  "\": a unix socket needs an absolute path, as in "
                                  "unix:///run/docker.sock");
    }
    return e;
  }
  if (text.substr(0, 6) == "tcp://") {
    return InvalidArgumentError("\"" + e.text +
                                "\": Docker engines over TCP (with TLS) are not supported yet; "
                                "use a unix:// socket");
  }
  return InvalidArgumentError("\"" + e.text + "\": not a Docker engine address (unix:///PATH)");
}

std::string ErrorMessage(const Response& r) {
  nlohmann::json j = nlohmann::json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("message") && j["message"].is_string()) {
    return j["message"].get<std::string>();
  }
  std::string body = r.body.substr(0, 300);
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
  if (!body.empty()) return body;
  return "HTTP " + std::to_string(r.status);
}

void StreamControl::Cancel() {
  cancelled_ = true;
  if (close_) close_();
}

Client::Client(Options options) : options_(std::move(options)) {}

asio::awaitable<StatusOr<Response>> Client::Raw(Method method, std::string target, std::string body,
                                                std::string content_type, Duration timeout) {
  if (timeout.count() <= 0) timeout = options_.timeout;
  auto c = std::make_shared<Connection>(co_await asio::this_coro::executor);
  ArmTimeout(c, timeout);
  DisarmOnExit disarm{*c};
  const std::string what = std::string(NameOf(method)) + " " + target;
  auto fail = [&](std::string_view step, const error_code& ec) -> Status {
    if (c->timed_out) {
      return Status(StatusCode::kDeadlineExceeded, "Docker engine " + options_.endpoint.text +
                                                       ": no answer to " + what + " within " +
                                                       std::to_string(timeout.count()) + "ms");
    }
    return UnavailableError("Docker engine " + options_.endpoint.text + " unreachable (" +
                            std::string(step) + " " + what + "): " + ec.message());
  };
  error_code ec;
  co_await c->socket.async_connect(local::endpoint(options_.endpoint.path),
                                   asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("connect for", ec);
  auto req = MakeRequest(method, target, std::move(body), content_type);
  co_await http::async_write(c->socket, req, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("sending", ec);
  boost::beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxResponseBytes);
  co_await http::async_read(c->socket, buffer, parser,
                            asio::redirect_error(asio::use_awaitable, ec));
  CancelQuietly(c->timer, "Docker call timer");
  if (ec) co_return fail("reading the answer to", ec);
  Response r;
  r.status = static_cast<int>(parser.get().result_int());
  r.api_version = std::string(parser.get()["Api-Version"]);
  r.body = std::move(parser.get().body());
  co_return r;
}

asio::awaitable<Status> Client::Negotiate(Duration timeout) {
  if (!api_version_.empty()) co_return Status::Ok();
  StatusOr<Response> ping = co_await Raw(Method::kGet, "/_ping", {}, {}, timeout);
  if (!ping.ok()) co_return ping.status();
  std::string version = ping->api_version;
  if (version.empty()) {
    StatusOr<Response> v = co_await Raw(Method::kGet, "/version", {}, {}, timeout);
    if (!v.ok()) co_return v.status();
    nlohmann::json j = nlohmann::json::parse(v->body, nullptr, false);
    if (j.is_object() && j.contains("ApiVersion") && j["ApiVersion"].is_string()) {
      version = j["ApiVersion"].get<std::string>();
    }
  }
  std::optional<std::pair<int, int>> v = ParseVersion(version);
  if (!v) {
    co_return UnavailableError("Docker engine " + options_.endpoint.text +
                               ": cannot tell its API version (\"" + version + "\")");
  }
  if (*v < std::make_pair(kMinMajor, kMinMinor)) {
    co_return FailedPreconditionError("Docker engine " + options_.endpoint.text + " speaks API " +
                                      version + ", older than " + std::to_string(kMinMajor) + "." +
                                      std::to_string(kMinMinor) + ", the oldest kiln can use");
  }
  if (*v > std::make_pair(kMaxMajor, kMaxMinor)) v = std::make_pair(kMaxMajor, kMaxMinor);
  api_version_ = std::to_string(v->first) + "." + std::to_string(v->second);
  LogInfo("Docker engine API version negotiated",
          {{"engine", options_.endpoint.text}, {"api_version", api_version_}});
  co_return Status::Ok();
}

asio::awaitable<Status> Client::Ping(Duration timeout) {
  StatusOr<Response> r = co_await Raw(Method::kGet, "/_ping", {}, {}, timeout);
  if (!r.ok()) co_return r.status();
  if (r->status != 200) {
    co_return UnavailableError("Docker engine " + options_.endpoint.text + ": /_ping answered " +
                               ErrorMessage(*r));
  }
  co_return Status::Ok();
}

asio::awaitable<StatusOr<Response>> Client::Call(Method method, std::string target,
                                                 std::string body, Duration timeout) {
  co_return co_await CallWithBody(method, std::move(target), std::move(body), "application/json",
                                  timeout);
}

// Holds a turn for the scope of a call, however the call ends.
class Client::Turn {
 public:
  explicit Turn(Client& client) : client_(client) {}
  ~Turn() { client_.Release(); }
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;

 private:
  Client& client_;
};

asio::awaitable<void> Client::Acquire() {
  if (options_.max_in_flight <= 0 || in_flight_ < options_.max_in_flight) {
    ++in_flight_;
    co_return;
  }
  auto timer = std::make_shared<asio::steady_timer>(co_await asio::this_coro::executor,
                                                    asio::steady_timer::time_point::max());
  waiting_.push_back(timer);
  error_code ec;
  co_await timer->async_wait(asio::redirect_error(asio::use_awaitable, ec));
  // Cancelled by Release, which passed its turn on: in_flight_ already counts this call.
}

void Client::Release() {
  while (!waiting_.empty()) {
    std::shared_ptr<asio::steady_timer> next = waiting_.front().lock();
    waiting_.pop_front();
    // A waiter whose coroutine is gone (its io_context stopped) takes no turn.
    if (next) {
      CancelQuietly(*next, "Docker call turn");
      return;
    }
  }
  --in_flight_;
}

asio::awaitable<StatusOr<Response>> Client::CallWithBody(Method method, std::string target,
                                                         std::string body, std::string content_type,
                                                         Duration timeout) {
  Status negotiated = co_await Negotiate({});
  if (!negotiated.ok()) co_return negotiated;
  co_await Acquire();
  Turn turn(*this);
  co_return co_await Raw(method, "/v" + api_version_ + target, std::move(body),
                         std::move(content_type), timeout);
}

asio::awaitable<Status> Client::Stream(std::string target,
                                       std::function<void(std::string_view)> on_line,
                                       std::shared_ptr<StreamControl> control) {
  Status negotiated = co_await Negotiate({});
  if (!negotiated.ok()) co_return negotiated;
  if (control->cancelled()) co_return Status(StatusCode::kCancelled, "cancelled");
  target = "/v" + api_version_ + target;
  auto c = std::make_shared<Connection>(co_await asio::this_coro::executor);
  control->close_ = [c] {
    error_code ignored;
    c->socket.close(ignored);
  };
  struct Detach {
    StreamControl& control;
    ~Detach() { control.close_ = nullptr; }
  } detach{*control};
  ArmTimeout(c, options_.timeout);
  DisarmOnExit disarm{*c};
  auto fail = [&](std::string_view step, const error_code& ec) -> Status {
    if (control->cancelled()) return Status(StatusCode::kCancelled, "cancelled");
    if (c->timed_out) {
      return Status(StatusCode::kDeadlineExceeded,
                    "Docker engine " + options_.endpoint.text + ": no answer to GET " + target);
    }
    return UnavailableError("Docker engine " + options_.endpoint.text + " unreachable (" +
                            std::string(step) + " GET " + target + "): " + ec.message());
  };
  error_code ec;
  co_await c->socket.async_connect(local::endpoint(options_.endpoint.path),
                                   asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("connect for", ec);
  auto req = MakeRequest(Method::kGet, target, {}, {});
  co_await http::async_write(c->socket, req, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("sending", ec);
  boost::beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  std::string partial;  // a line not yet ended by '\n'
  auto on_chunk = [&](std::uint64_t, boost::string_view data, error_code&) -> std::size_t {
    partial.append(data.data(), data.size());
    size_t start = 0;
    for (size_t nl = partial.find('\n'); nl != std::string::npos; nl = partial.find('\n', start)) {
      if (nl > start) on_line(std::string_view(partial).substr(start, nl - start));
      start = nl + 1;
    }
    partial.erase(0, start);
    if (partial.size() > kMaxResponseBytes) partial.clear();  // no line is that long
    return data.size();
  };
  parser.on_chunk_body(on_chunk);
  co_await http::async_read_header(c->socket, buffer, parser,
                                   asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return fail("reading the answer to", ec);
  CancelQuietly(c->timer,
                "Docker call timer");  // the body streams for as long as the engine keeps it open
  if (parser.get().result_int() != 200) {
    // An error answer is short and carries the engine's message.
    co_await http::async_read(c->socket, buffer, parser,
                              asio::redirect_error(asio::use_awaitable, ec));
    Response r{static_cast<int>(parser.get().result_int()), parser.get().body(), {}};
    co_return UnavailableError("Docker engine " + options_.endpoint.text + ": GET " + target +
                               ": " + ErrorMessage(r));
  }
  while (!parser.is_done()) {
    co_await http::async_read_some(c->socket, buffer, parser,
                                   asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return fail("reading", ec);
  }
  co_return Status::Ok();
}

StatusOr<Response> Client::CallSync(Method method, std::string target, std::string body,
                                    Duration timeout, std::string content_type) {
  asio::io_context io;
  std::optional<StatusOr<Response>> out;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        // No turn: the calls holding them run on the io_context this thread is blocking.
        Status negotiated = co_await Negotiate({});
        if (!negotiated.ok()) {
          out.emplace(negotiated);
          co_return;
        }
        out.emplace(co_await Raw(method, "/v" + api_version_ + target, std::move(body),
                                 std::move(content_type), timeout));
      },
      [&](const std::exception_ptr& e) {
        if (!e) return;
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          out.emplace(InternalError(std::string("Docker call failed: ") + ex.what()));
        }
      });
  io.run();
  if (!out) return InternalError("Docker call did not finish");
  return std::move(*out);
}

}  // namespace kiln::docker
