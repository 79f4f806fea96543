#include "cli/rollout_status.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <ostream>
#include <sstream>
#include <thread>

#include "common/limits.h"
#include "common/regular_file.h"
#include "common/status.h"
#include "spec/manifest.h"

namespace kiln {
namespace {

namespace pb = ::kiln::v1;
using SteadyTime = std::chrono::steady_clock::time_point;

constexpr auto kPollInterval = std::chrono::milliseconds(300);
constexpr auto kRetryInterval = std::chrono::seconds(1);

std::string Lower(std::string_view proto_name, std::string_view prefix) {
  std::string n(proto_name.substr(prefix.size()));
  for (char& c : n) c = c == '_' ? ' ' : static_cast<char>(std::tolower(c));
  return n;
}

std::string StrategyText(pb::Strategy s) {
  std::string n = Lower(pb::Strategy_Name(s), "STRATEGY_");
  for (char& c : n) c = c == ' ' ? '-' : c;
  return n;
}

// What the service's manifest file declares now, read here the way kilnd reads it: the template
// hash of `service`, or the file's errors. nullopt when the file cannot be read from here (kilnd
// on another machine, a relative path): then kilnctl cannot know and does not wait for it.
struct Declared {
  std::string template_hash;
  std::string error;  // the file does not load; kilnd keeps the last good state
};
std::optional<Declared> DeclaredInFile(const std::string& file, const std::string& service) {
  std::error_code ec;
  if (file.empty() || !std::filesystem::path(file).is_absolute() ||
      !std::filesystem::is_regular_file(file, ec)) {
    return std::nullopt;
  }
  StatusOr<std::string> text = ReadRegularFile(file, kMaxManifestFileBytes, "cannot read");
  if (!text.ok()) return std::nullopt;
  ManifestFile parsed = ParseManifest(file, *text, {});
  if (!parsed.ok()) return Declared{"", parsed.errors.front().ToString()};
  for (const ServiceSpec& s : parsed.services) {
    if (s.name == service) return Declared{s.tmpl.Hash(), ""};
  }
  return std::nullopt;  // moved to another file, or removed: kilnd says what it makes of that
}

// One wait, as a small state machine over successive GetService answers.
class RolloutWait {
 public:
  RolloutWait(pb::Kiln::Stub& stub, const PrepareCall& prepare, const RolloutWaitOptions& o,
              std::ostream& out, std::ostream& err)
      : stub_(stub), prepare_(prepare), o_(o), out_(out), err_(err), want_(o.revision) {
    if (o.timeout.count() > 0) deadline_ = std::chrono::steady_clock::now() + o.timeout;
  }

  int Run() {
    for (;;) {
      pb::GetServiceResponse resp;
      grpc::Status s = Call([&](grpc::ClientContext& ctx) {
        pb::GetServiceRequest req;
        req.set_name(o_.service);
        return stub_.GetService(&ctx, req, &resp);
      });
      if (!s.ok()) {
        if (std::optional<int> rc = Unreachable(s)) return *rc;
        continue;
      }
      if (std::optional<int> rc = Step(resp.service())) return *rc;
      if (TimedOut()) return TimeoutExit();
      std::this_thread::sleep_for(kPollInterval);
    }
  }

 private:
  // One call with a deadline of at most what is left of the wait.
  template <typename Fn>
  grpc::Status Call(Fn fn) {
    grpc::ClientContext ctx;
    Duration d = o_.call_timeout;
    if (deadline_) {
      auto left =
          std::chrono::duration_cast<Duration>(*deadline_ - std::chrono::steady_clock::now());
      d = std::max(Duration(1), std::min(d, left));
    }
    prepare_(ctx, d);
    grpc::Status s = fn(ctx);
    if (s.ok()) {
      if (lost_) out_ << o_.service << ": reached kilnd again" << std::endl;
      lost_ = false;
      reached_ = true;
    }
    return s;
  }

  // kilnd did not answer. A wait that has reached it once, or has a timeout, retries: kilnd
  // restarting (or being upgraded) says nothing about the rollout, which goes on without it.
  std::optional<int> Unreachable(const grpc::Status& s) {
    const bool down = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                      s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!down) {
      err_ << "kilnctl: " << StatusCodeName(static_cast<StatusCode>(s.error_code())) << ": "
           << s.error_message() << "\n";
      return kRolloutCallFailed;
    }
    // A call cut short by the wait's own deadline is the timeout, not kilnd going away.
    if (TimedOut()) return TimeoutExit();
    if (!reached_ && !deadline_) {
      err_ << "kilnctl: cannot reach kilnd at " << o_.addr
           << " (is it running? set --addr or KILN_ADDR): " << s.error_message() << "\n";
      return kRolloutCallFailed;
    }
    if (!lost_) {
      err_ << "kilnctl: cannot reach kilnd at " << o_.addr << " (" << s.error_message()
           << "); retrying " << (deadline_ ? "until the timeout" : "until it answers") << "\n";
      lost_ = true;
    }
    std::this_thread::sleep_for(kRetryInterval);
    return std::nullopt;
  }

  bool TimedOut() const { return deadline_ && std::chrono::steady_clock::now() >= *deadline_; }

  int TimeoutExit() {
    err_ << "kilnctl: timed out after " << FormatDuration(o_.timeout)
         << " waiting for the rollout of " << o_.service;
    if (want_ > 0) err_ << " to revision " << want_;
    err_ << (last_.empty() ? "" : "; last seen: " + last_)
         << (lost_ ? "; kilnd was not answering" : "") << "\n";
    return kRolloutTimedOut;
  }

  void Progress(const std::string& line) {
    if (line != last_) out_ << line << std::endl;
    last_ = line;
  }

  // What one answer says; a code when the wait is over.
  std::optional<int> Step(const pb::Service& sv) {
    const pb::ServiceSummary& sum = sv.summary();
    if (want_ == 0) {
      if (!CaughtUp(sv)) {
        if (!declared_error_.empty()) return kRolloutCallFailed;
        return std::nullopt;
      }
      if (sum.target_revision() == 0) {
        Progress(o_.service + ": waiting for its first revision" +
                 (sum.manifest_error().empty()
                      ? ""
                      : " (manifest error: " + sum.manifest_error() + ")"));
        return std::nullopt;
      }
      want_ = sum.target_revision();
    }
    const pb::Rollout& r = sv.rollout();
    if (r.to_revision() == want_) return OnRollout(sv);
    if (sum.target_revision() == want_) {
      Progress(o_.service + ": waiting for the rollout to revision " + std::to_string(want_) +
               " to start" + Counts(sv));
      return std::nullopt;
    }
    return OnTargetElsewhere(sv);
  }

  // Whether kilnd has loaded what the manifest file declares now (always true when kilnctl
  // cannot read the file). Right after an edit it may not have: the wait must not end on the
  // rollout before it.
  bool CaughtUp(const pb::Service& sv) {
    if (!checked_file_) {
      declared_ = DeclaredInFile(sv.manifest_file(), o_.service);
      checked_file_ = true;
      if (declared_ && !declared_->error.empty()) {
        declared_error_ = declared_->error;
        err_ << "kilnctl: the manifest of " << o_.service << " does not load, so kilnd keeps its "
             << "last good state: " << declared_error_ << "\n";
        return false;
      }
    }
    if (!declared_ || declared_->template_hash.empty()) return true;
    const int64_t desired = sv.summary().desired_revision();
    if (desired > 0 && HashOf(desired) == declared_->template_hash) return true;
    Progress(o_.service + ": waiting for kilnd to load " + sv.manifest_file() +
             (sv.summary().manifest_error().empty()
                  ? ""
                  : " (kilnd reports: " + sv.summary().manifest_error() + ")"));
    return false;
  }

  // The template hash of a revision ("" when it cannot be read now).
  std::string HashOf(int64_t revision) {
    pb::GetHistoryResponse h;
    grpc::Status s = Call([&](grpc::ClientContext& ctx) {
      pb::GetHistoryRequest req;
      req.set_service(o_.service);
      return stub_.GetHistory(&ctx, req, &h);
    });
    for (const pb::Revision& rev : h.revisions()) {
      if (rev.number() == revision) return rev.template_hash();
    }
    return "";
  }

  std::string Counts(const pb::Service& sv) const {
    int old_live = 0;
    for (const auto& cnt : sv.revisions()) {
      if (cnt.revision() != want_) old_live += cnt.total();
    }
    int available = 0;
    for (const auto& cnt : sv.revisions()) {
      if (cnt.revision() == want_) available = cnt.available();
    }
    return ", " + std::to_string(available) + "/" + std::to_string(sv.summary().replicas()) +
           " available, " + std::to_string(old_live) + " old instance(s) left";
  }

  // The latest rollout is the one waited for.
  std::optional<int> OnRollout(const pb::Service& sv) {
    const pb::Rollout& r = sv.rollout();
    const std::string head = o_.service + ": rollout to revision " + std::to_string(want_) + " (" +
                             StrategyText(r.strategy()) + ")";
    switch (r.state()) {
      case pb::ROLLOUT_STATE_COMPLETED:
        Progress(head + ": completed" + Counts(sv));
        out_ << o_.service << ": rollout complete" << std::endl;
        return kRolloutCompleted;
      case pb::ROLLOUT_STATE_FAILED:
        // An automatic rollback is decided in the pass that fails the rollout: say it too.
        if (sv.summary().target_revision() != want_) return WhyNotCompleted(sv);
        err_ << "kilnctl: rollout of " << o_.service << " to revision " << want_
             << " failed: " << r.reason() << "\n";
        return kRolloutFailed;
      case pb::ROLLOUT_STATE_SUPERSEDED:
        return OnTargetElsewhere(sv);
      default:
        Progress(head + ": " + Lower(pb::RolloutState_Name(r.state()), "ROLLOUT_STATE_") +
                 Counts(sv));
        return std::nullopt;
    }
  }

  // kilnd converges to another revision than the one waited for: its rollout is over one way or
  // the other. The history says whether it ever completed; the events why it did not.
  std::optional<int> OnTargetElsewhere(const pb::Service& sv) {
    const int64_t target = sv.summary().target_revision();
    pb::GetHistoryResponse h;
    grpc::Status s = Call([&](grpc::ClientContext& ctx) {
      pb::GetHistoryRequest req;
      req.set_service(o_.service);
      return stub_.GetHistory(&ctx, req, &h);
    });
    if (!s.ok()) return Unreachable(s);
    const pb::Revision* rev = nullptr;
    for (const pb::Revision& r : h.revisions()) {
      if (r.number() == want_) rev = &r;
    }
    if (rev == nullptr) {
      if (h.revisions_size() > 0 && want_ > h.revisions(0).number()) {
        Progress(o_.service + ": waiting for revision " + std::to_string(want_) +
                 " to be written (the latest is " + std::to_string(h.revisions(0).number()) + ")");
        return std::nullopt;
      }
      err_ << "kilnctl: " << o_.service << " has no revision " << want_
           << " (pruned by history_limit, or never written)\n";
      return kRolloutCallFailed;
    }
    if (rev->available_unix_ms() > 0) {
      out_ << o_.service << ": rollout to revision " << want_ << " complete";
      if (target != want_) out_ << " (the target is now revision " << target << ")";
      out_ << std::endl;
      return kRolloutCompleted;
    }
    return WhyNotCompleted(sv);
  }

  // The rollout to want_ never completed and kilnd no longer converges to it.
  int WhyNotCompleted(const pb::Service& sv) {
    const pb::ServiceSummary& sum = sv.summary();
    std::string failed, rolled_back;
    grpc::Status s = Call([&](grpc::ClientContext& ctx) {
      pb::WatchEventsRequest req;
      req.set_service(o_.service);
      auto reader = stub_.WatchEvents(&ctx, req);
      pb::Event e;
      while (reader->Read(&e)) {
        if (e.kind() == "rollout_failed" && e.revision() == want_) {
          failed = e.message();
          rolled_back.clear();
        } else if (e.kind() == "rolled_back" && !failed.empty()) {
          rolled_back = e.message();  // names the pin's reason: automatic, or who did it
        }
      }
      return reader->Finish();
    });
    if (!failed.empty()) {
      err_ << "kilnctl: " << failed;
      if (!rolled_back.empty()) err_ << "; " << rolled_back;
      err_ << "\n";
      return kRolloutFailed;
    }
    err_ << "kilnctl: the rollout of " << o_.service << " to revision " << want_
         << " will not complete: the target is now revision " << sum.target_revision();
    if (sum.pinned_revision() == sum.target_revision() && !sv.pin_reason().empty()) {
      err_ << " (pinned: " << sv.pin_reason() << ")";
    } else if (sum.desired_revision() == sum.target_revision()) {
      err_ << " (its manifest declares it)";
    }
    if (!s.ok()) err_ << "; `kilnctl events --service " << o_.service << "` says more";
    err_ << "\n";
    return kRolloutAbandoned;
  }

  pb::Kiln::Stub& stub_;
  const PrepareCall& prepare_;
  const RolloutWaitOptions& o_;
  std::ostream& out_;
  std::ostream& err_;
  int64_t want_;
  std::optional<SteadyTime> deadline_;
  std::string last_;      // the last progress line printed
  bool reached_ = false;  // kilnd answered at least once
  bool lost_ = false;     // the last call could not reach kilnd
  bool checked_file_ = false;
  std::optional<Declared> declared_;
  std::string declared_error_;
};

}  // namespace

int WaitForRollout(pb::Kiln::Stub& stub, const PrepareCall& prepare,
                   const RolloutWaitOptions& options, std::ostream& out, std::ostream& err) {
  return RolloutWait(stub, prepare, options, out, err).Run();
}

}  // namespace kiln
