#pragma once

// The integration tests' HTTP client: one request per connection to kilnd on loopback, over
// plain TCP or any stream (TLS) the caller has connected.

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

namespace kiln::testing {

struct HttpReply {
  int status = 0;  // 0: no response (refused, closed, timed out)
  std::string body;
  std::string content_type;
  std::string allow;
  std::string www_authenticate;
};

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

// Sends one request on a connected stream and reads the reply.
template <class Stream>
HttpReply HttpExchange(Stream& stream, const std::string& target,
                       boost::beast::http::verb method = boost::beast::http::verb::get,
                       const HttpHeaders& headers = {}) {
  namespace http = boost::beast::http;
  http::request<http::empty_body> req{method, target, 11};
  req.set(http::field::host, "127.0.0.1");
  for (const auto& [name, value] : headers) req.set(name, value);
  boost::beast::error_code ec;
  http::write(stream, req, ec);
  if (ec) return {};
  boost::beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(stream, buffer, res, ec);
  if (ec) return {};
  return {static_cast<int>(res.result_int()), res.body(),
          std::string(res[http::field::content_type]), std::string(res[http::field::allow]),
          std::string(res[http::field::www_authenticate])};
}

// One request to 127.0.0.1:port, within 10 s.
inline HttpReply HttpRequest(int port, const std::string& target,
                             boost::beast::http::verb method = boost::beast::http::verb::get,
                             const HttpHeaders& headers = {}) {
  boost::asio::io_context io;
  boost::beast::tcp_stream stream(io);
  stream.expires_after(std::chrono::seconds(10));
  boost::beast::error_code ec;
  stream.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)}, ec);
  if (ec) return {};
  return HttpExchange(stream, target, method, headers);
}

}  // namespace kiln::testing
