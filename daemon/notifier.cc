#include "daemon/notifier.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>

#include "common/logging.h"
#include "kiln/version.h"

namespace kiln {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

constexpr const char* kResults[] = {"delivered", "retried", "failed", "dropped"};

std::string Rfc3339(int64_t unix_ms) {
  const std::time_t secs = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(unix_ms % 1000));
  return buf;
}

}  // namespace

StatusOr<WebhookUrl> ParseWebhookUrl(const std::string& url) {
  WebhookUrl out;
  out.text = url;
  std::string rest;
  if (url.rfind("https://", 0) == 0) {
    out.tls = true;
    out.port = "443";
    rest = url.substr(std::string_view("https://").size());
  } else if (url.rfind("http://", 0) == 0) {
    rest = url.substr(std::string_view("http://").size());
  } else {
    return InvalidArgumentError("--notify " + url + ": expected http(s)://HOST[:PORT][/PATH]");
  }
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    out.target = rest.substr(slash);
    rest = rest.substr(0, slash);
  }
  const size_t colon = rest.rfind(':');
  if (colon != std::string::npos && rest.find(']') == std::string::npos) {
    out.port = rest.substr(colon + 1);
    rest = rest.substr(0, colon);
    if (out.port.empty() || !std::all_of(out.port.begin(), out.port.end(),
                                         [](char c) { return c >= '0' && c <= '9'; })) {
      return InvalidArgumentError("--notify " + url + ": bad port");
    }
  }
  if (rest.empty()) return InvalidArgumentError("--notify " + url + ": no host");
  out.host = rest;
  return out;
}

std::set<EventKind> DefaultNotifyKinds() {
  return {EventKind::kRolloutFailed, EventKind::kRolledBack, EventKind::kManifestError};
}

StatusOr<std::set<EventKind>> ParseNotifyKinds(const std::string& list) {
  std::set<EventKind> out;
  size_t begin = 0;
  while (begin <= list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    const std::string word = list.substr(begin, end - begin);
    if (!word.empty()) {
      std::optional<EventKind> kind = ParseEventKind(word);
      if (!kind) return InvalidArgumentError("--notify-on: unknown event kind \"" + word + "\"");
      out.insert(*kind);
    }
    begin = end + 1;
  }
  if (out.empty()) return InvalidArgumentError("--notify-on: no event kind given");
  return out;
}

std::string NotificationBody(const EventRecord& e, const std::string& version,
                             const std::string& dashboard_url) {
  nlohmann::json j = {{"service", e.service},      {"revision", e.revision},
                      {"version", version},        {"kind", std::string(EventKindName(e.kind))},
                      {"message", e.message},      {"actor", e.actor},
                      {"instance", e.instance},    {"time", Rfc3339(e.time_ms)},
                      {"dashboard", dashboard_url}};
  return j.dump();
}

std::string NotificationSignature(const std::string& secret, const std::string& body) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(body.data()), body.size(), mac, &len);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "sha256=";
  for (unsigned int i = 0; i < len; ++i) {
    out += kHex[mac[i] >> 4];
    out += kHex[mac[i] & 0xf];
  }
  return out;
}

Notifier::Notifier(Options options) : options_(std::move(options)) {
  if (options_.metrics != nullptr) {
    options_.metrics->Declare("kiln_notifications_total", "counter",
                              "Webhook notification attempts by result (delivered; retried: an "
                              "attempt failed and another follows; failed: every attempt failed; "
                              "dropped: the queue was full).");
    for (const char* r : kResults)
      options_.metrics->Add("kiln_notifications_total", {{"result", r}}, 0);
  }
  thread_ = std::thread([this] { Run(); });
}

Notifier::~Notifier() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Notifier::SetDashboardUrl(const std::string& url) {
  std::lock_guard lock(mu_);
  dashboard_url_ = url;
}

bool Notifier::Wants(const EventRecord& e) const {
  if (!options_.kinds.count(e.kind)) return false;
  return options_.services.empty() || options_.services.count(e.service) > 0;
}

void Notifier::Count(const char* result) const {
  if (options_.metrics != nullptr)
    options_.metrics->Add("kiln_notifications_total", {{"result", result}});
}

void Notifier::Notify(const EventRecord& e, const std::string& version) {
  if (!Wants(e)) return;
  const std::string kind(EventKindName(e.kind));
  {
    std::lock_guard lock(mu_);
    const std::string body = NotificationBody(e, version, dashboard_url_);
    for (size_t i = 0; i < options_.urls.size(); ++i) {
      if (queue_.size() >= options_.max_queued) {
        Count("dropped");
        LogWarn("notification dropped: queue full",
                {{"service", e.service}, {"event", kind}, {"url", options_.urls[i].text}});
        continue;
      }
      queue_.push_back(Delivery{.url = i,
                                .body = body,
                                .service = e.service,
                                .kind = kind,
                                .attempt = 0,
                                .due = std::chrono::steady_clock::now()});
    }
  }
  wake_.notify_all();
}

void Notifier::Run() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    if (queue_.empty()) {
      wake_.wait(lock);
      continue;
    }
    auto next =
        std::min_element(queue_.begin(), queue_.end(),
                         [](const Delivery& a, const Delivery& b) { return a.due < b.due; });
    if (next->due > std::chrono::steady_clock::now()) {
      wake_.wait_until(lock, next->due);
      continue;
    }
    Delivery d = std::move(*next);
    queue_.erase(next);
    lock.unlock();
    const WebhookUrl& url = options_.urls[d.url];
    const Status s = Post(url, d.body);
    ++d.attempt;
    lock.lock();
    if (s.ok()) {
      Count("delivered");
      LogInfo(
          "notification delivered",
          {{"service", d.service}, {"event", d.kind}, {"url", url.text}, {"attempt", d.attempt}});
      continue;
    }
    if (d.attempt >= options_.attempts) {
      Count("failed");
      LogError("notification not delivered; giving up", {{"service", d.service},
                                                         {"event", d.kind},
                                                         {"url", url.text},
                                                         {"attempts", d.attempt},
                                                         {"error", s.message()}});
      continue;
    }
    const auto backoff = options_.first_backoff * (int64_t{1} << std::min(d.attempt - 1, 16));
    Count("retried");
    LogWarn("notification failed; retrying",
            {{"service", d.service},
             {"event", d.kind},
             {"url", url.text},
             {"attempt", d.attempt},
             {"retry_in_ms", static_cast<int64_t>(backoff.count())},
             {"error", s.message()}});
    d.due = std::chrono::steady_clock::now() + backoff;
    queue_.push_back(std::move(d));
  }
  if (!queue_.empty()) {
    LogWarn("notifications abandoned at shutdown",
            {{"count", static_cast<int64_t>(queue_.size())}});
  }
}

namespace {

// Sends `req` on a connected (and for TLS, handshaken) stream and reads the answer into `parser`;
// `result` is set by the last step that ran.
template <typename Stream>
void Exchange(Stream& stream, const http::request<http::string_body>& req,
              beast::flat_buffer& buffer, http::response_parser<http::string_body>& parser,
              std::optional<beast::error_code>& result) {
  http::async_write(stream, req, [&](beast::error_code ec, size_t) {
    if (ec) {
      result = ec;
      return;
    }
    http::async_read(stream, buffer, parser, [&](beast::error_code ec2, size_t) { result = ec2; });
  });
}

}  // namespace

Status Notifier::Post(const WebhookUrl& url, const std::string& body) const {
  asio::io_context io;
  tcp::resolver resolver(io);
  // https: the machine's trust store (OpenSSL's default paths; SSL_CERT_FILE or SSL_CERT_DIR
  // replace it), the peer's certificate checked against the URL's host, SNI for a name.
  asio::ssl::context tls(asio::ssl::context::tls_client);
  std::optional<beast::ssl_stream<beast::tcp_stream>> tls_stream;
  std::optional<beast::tcp_stream> plain_stream;
  if (url.tls) {
    beast::error_code ec;
    tls.set_default_verify_paths(ec);
    if (ec) return UnavailableError("cannot load the trust store: " + ec.message());
    tls.set_verify_mode(asio::ssl::verify_peer);
    tls_stream.emplace(io, tls);
    tls_stream->set_verify_callback(asio::ssl::host_name_verification(url.host));
    beast::error_code ip_ec;
    (void)asio::ip::make_address(url.host, ip_ec);
    if (ip_ec && !SSL_set_tlsext_host_name(tls_stream->native_handle(), url.host.c_str())) {
      return UnavailableError("cannot set the TLS server name " + url.host);
    }
  } else {
    plain_stream.emplace(io);
  }
  beast::tcp_stream& stream = url.tls ? tls_stream->next_layer() : *plain_stream;
  http::request<http::string_body> req{http::verb::post, url.target, 11};
  req.set(http::field::host, url.host + ":" + url.port);
  req.set(http::field::user_agent, std::string("kilnd/") + kVersion);
  req.set(http::field::content_type, "application/json");
  if (!options_.secret.empty()) {
    req.set("X-Kiln-Signature", NotificationSignature(options_.secret, body));
  }
  req.body() = body;
  req.prepare_payload();
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(std::uint64_t{64} * 1024);
  std::optional<beast::error_code> result;
  // Every step in the one io_context below, which runs at most `timeout`; handlers that did not
  // run by then are destroyed with it, never called.
  resolver.async_resolve(
      url.host, url.port, [&](beast::error_code ec, const tcp::resolver::results_type& found) {
        if (ec) {
          result = ec;
          return;
        }
        stream.async_connect(found, [&](beast::error_code ec2, const tcp::endpoint&) {
          if (ec2) {
            result = ec2;
            return;
          }
          if (!url.tls) {
            Exchange(*plain_stream, req, buffer, parser, result);
            return;
          }
          tls_stream->async_handshake(asio::ssl::stream_base::client, [&](beast::error_code ec3) {
            if (ec3) {
              result = ec3;
              return;
            }
            Exchange(*tls_stream, req, buffer, parser, result);
          });
        });
      });
  io.run_for(options_.timeout);
  if (!result)
    return UnavailableError("no answer within " + std::to_string(options_.timeout.count()) + " ms");
  if (*result) {
    std::string why = result->message();
    // OpenSSL's reason ("certificate verify failed") says little without the verify result.
    if (url.tls) {
      const long verify = SSL_get_verify_result(tls_stream->native_handle());
      if (verify != X509_V_OK) why += ": " + std::string(X509_verify_cert_error_string(verify));
    }
    return UnavailableError(why);
  }
  const unsigned code = parser.get().result_int();
  if (code < 200 || code > 299) return UnavailableError("answered HTTP " + std::to_string(code));
  return Status::Ok();
}

}  // namespace kiln
