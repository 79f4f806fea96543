#pragma once

// A small client of the Docker Engine API: HTTP/1.1 over the engine's unix socket, on Asio
// coroutines, every call bounded by a timeout. Beast stays inside docker_client.cc: this header
// is included by the Docker driver only, and keeps to Asio's coroutine types.
//
// The API version is negotiated once per client: GET /_ping (its Api-Version header; else GET
// /version's ApiVersion), capped at the newest version this client was written against, and every
// later request is prefixed with it ("/v1.41/containers/json").

// clang-format off
#include <utility>  // first: Asio 1.74's awaitable.hpp uses std::exchange without including it
// clang-format on

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/clock.h"
#include "common/status.h"

namespace boost::asio {
class io_context;
}

namespace kiln::docker {

// Where an engine listens, from --docker-host.
struct Endpoint {
  enum class Kind { kUnix, kTcp };
  Kind kind = Kind::kUnix;
  std::string path;  // kUnix: the socket's path
  std::string host;  // kTcp
  int port = 0;      // kTcp
  std::string text;  // as given: "unix:///run/docker.sock"
};

// "unix:///path" (an absolute path). "tcp://HOST:PORT" is recognised and refused as not yet
// supported (it needs TLS, see docs/operations.md); anything else is INVALID_ARGUMENT.
StatusOr<Endpoint> ParseEndpoint(std::string_view text);

enum class Method { kGet, kPost, kDelete };

struct Response {
  int status = 0;
  std::string body;
  std::string api_version;  // the Api-Version header, when the engine sent one
};

// The engine's own words for an error response: its JSON {"message": ...}, else the body, else
// the HTTP status.
std::string ErrorMessage(const Response& r);

// Ends a Stream from outside: closes its connection. Safe to call at any time, more than once.
class StreamControl {
 public:
  void Cancel();
  bool cancelled() const { return cancelled_; }

 private:
  friend class Client;
  bool cancelled_ = false;
  std::function<void()> close_;  // set while the stream's connection is open
};

// REQUIRES: used from one thread (the one running the io_context its coroutines run on).
class Client {
 public:
  struct Options {
    Endpoint endpoint;
    Duration timeout{30'000};  // default for a call: connect, send, and the whole response
    // Calls (Call, CallWithBody) in flight on this engine at once; the rest wait their turn, and
    // the wait does not count against their timeout. An engine asked to create and start a
    // hundred containers at once answers none of them in time on a small machine. CallSync,
    // Stream and Ping do not wait for a turn.
    int max_in_flight = 8;
  };

  explicit Client(Options options);

  const Endpoint& endpoint() const { return options_.endpoint; }
  // "1.41" once negotiated, "" before.
  const std::string& api_version() const { return api_version_; }

  // One request with the negotiated version's prefix (`target` is "/containers/json?all=1").
  // A body is sent as JSON. Errors: UNAVAILABLE when the engine cannot be reached (naming the
  // socket), DEADLINE_EXCEEDED after `timeout` (Duration 0: the client's default). Any HTTP
  // status is a Response, not an error: the caller knows what a 404 means for its call.
  boost::asio::awaitable<StatusOr<Response>> Call(Method method, std::string target,
                                                  std::string body = {}, Duration timeout = {});

  // The same, with a body of another content type (an image tar for /images/create?fromSrc=-).
  boost::asio::awaitable<StatusOr<Response>> CallWithBody(Method method, std::string target,
                                                          std::string body,
                                                          std::string content_type,
                                                          Duration timeout = {});

  // A streaming GET (/events): calls `on_line` with each line of the body as it arrives, until
  // the engine ends the response, the connection drops or `control` cancels it. Returns how it
  // ended (OK: the engine ended it; CANCELLED: cancelled). Connecting and the response's header
  // are bounded by the default timeout; the body is not.
  boost::asio::awaitable<Status> Stream(std::string target,
                                        std::function<void(std::string_view)> on_line,
                                        std::shared_ptr<StreamControl> control);

  // GET /_ping without the version prefix (and without negotiating): OK when the engine answers
  // 200 within `timeout`. Host health checks use it, so a hung engine costs one timeout.
  boost::asio::awaitable<Status> Ping(Duration timeout);

  // Call, run to its end on a private io_context of the calling thread (for the synchronous parts
  // of the Driver interface). Blocks for at most about `timeout`.
  StatusOr<Response> CallSync(Method method, std::string target, std::string body = {},
                              Duration timeout = {}, std::string content_type = "application/json");

 private:
  boost::asio::awaitable<Status> Negotiate(Duration timeout);
  boost::asio::awaitable<StatusOr<Response>> Raw(Method method, std::string target,
                                                 std::string body, std::string content_type,
                                                 Duration timeout);

  // A turn among max_in_flight: Acquire waits for one, Release hands it to the next waiter.
  class Turn;
  boost::asio::awaitable<void> Acquire();
  void Release();

  Options options_;
  std::string api_version_;
  int in_flight_ = 0;
  // Waiters park on a timer that never expires; Release cancels the first one still waited on.
  std::deque<std::weak_ptr<boost::asio::steady_timer>> waiting_;
};

}  // namespace kiln::docker
