#pragma once

// Webhook notifications (`kilnd --notify URL`): events of the chosen kinds and services are
// POSTed as JSON to each URL, optionally signed with HMAC-SHA256, on a thread of the notifier's
// own, so that a slow or failing receiver never holds up the reconciler. A bounded queue: what
// does not fit is dropped and counted. Each delivery is retried with exponential backoff.
//
// Metrics: kiln_notifications_total{result}: delivered, retried (an attempt failed, another
// follows), failed (every attempt failed), dropped (the queue was full).

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/metrics.h"
#include "common/status.h"
#include "storage/records.h"

namespace kiln {

// http(s)://HOST[:PORT][/PATH]. https verifies the receiver's certificate against the
// machine's trust store (SSL_CERT_FILE / SSL_CERT_DIR replace it, as for OpenSSL's tools).
struct WebhookUrl {
  std::string text;  // as given
  bool tls = false;  // https
  std::string host;
  std::string port = "80";  // 443 for https
  std::string target = "/";
};
StatusOr<WebhookUrl> ParseWebhookUrl(const std::string& url);

// The failure kinds notified when --notify-on is not given.
std::set<EventKind> DefaultNotifyKinds();
// "rollout_failed,rolled_back" -> kinds; INVALID_ARGUMENT naming an unknown kind.
StatusOr<std::set<EventKind>> ParseNotifyKinds(const std::string& list);

// The JSON body of one notification.
std::string NotificationBody(const EventRecord& e, const std::string& version,
                             const std::string& dashboard_url);
// "sha256=<hex>" of HMAC-SHA256(secret, body): the X-Kiln-Signature header.
std::string NotificationSignature(const std::string& secret, const std::string& body);

class Notifier {
 public:
  struct Options {
    std::vector<WebhookUrl> urls;
    std::set<EventKind> kinds;
    std::set<std::string> services;                // empty: every service
    std::string secret;                            // empty: no signature header
    int attempts = 5;                              // per URL and notification
    std::chrono::milliseconds first_backoff{500};  // doubles after each failed attempt
    std::chrono::milliseconds timeout{5000};       // per attempt (connect, send, answer)
    size_t max_queued = 256;
    Metrics* metrics = nullptr;
  };

  explicit Notifier(Options options);
  // Stops at once: what is still queued or being retried is abandoned (and logged).
  ~Notifier();
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  // kilnd's dashboard, for the link in each body (known once HTTP listens).
  void SetDashboardUrl(const std::string& url);
  // Whether `e` passes the kind and service filters.
  bool Wants(const EventRecord& e) const;
  // Any thread; never blocks on the network. `version` is the event revision's version.
  void Notify(const EventRecord& e, const std::string& version);

 private:
  struct Delivery {
    size_t url = 0;
    std::string body;
    std::string service;
    std::string kind;
    int attempt = 0;
    std::chrono::steady_clock::time_point due;
  };
  void Run();
  Status Post(const WebhookUrl& url, const std::string& body) const;
  void Count(const char* result) const;

  const Options options_;
  std::mutex mu_;  // guards queue_, stopping_ and dashboard_url_
  std::condition_variable wake_;
  std::deque<Delivery> queue_;
  bool stopping_ = false;
  std::string dashboard_url_;
  std::thread thread_;
};

}  // namespace kiln
