#include "deploy/prober.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <cstring>

#include "common/descriptors.h"
#include "common/duration.h"
#include "common/unique_fd.h"
#include "deploy/proc.h"

namespace kiln {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

using DoneFn = std::function<void(ProbeResult)>;

// A probe in flight. Cancel() makes it end soon without reporting.
class ProbeOp {
 public:
  virtual ~ProbeOp() = default;
  virtual void Cancel() = 0;
};

std::string Endpoint(const ProbeTarget& t, int port) { return t.host + ":" + std::to_string(port); }

int PortOf(const ProbeTarget& t) { return t.check.port > 0 ? t.check.port : t.port; }

std::string TimeoutReason(const ProbeTarget& t) {
  return "timeout after " + FormatDuration(t.check.timeout);
}

// Errors that are kilnd's own lack of resources, not anything the instance did.
bool IsLocalError(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM || err == EAGAIN;
}
bool IsLocalError(const error_code& ec) {
  return ec.category() == boost::system::system_category() && IsLocalError(ec.value());
}

// Opens `s` close-on-exec before it connects: Asio 1.74 opens sockets without SOCK_CLOEXEC, and a
// probe's socket open while an instance is spawned (on this same thread) would stay in it.
error_code OpenCloseOnExec(tcp::socket& s, const tcp::endpoint& ep) {
  error_code ec;
  s.open(ep.protocol(), ec);
  if (ec) return ec;
  if (!SetCloseOnExec(s.native_handle()).ok()) {
    ec = boost::system::errc::make_error_code(boost::system::errc::bad_file_descriptor);
    error_code ignored;
    s.close(ignored);
  }
  return ec;
}

std::string ConnectFailure(const error_code& ec, const std::string& where) {
  if (ec == asio::error::connection_refused) return "connect refused " + where;
  return "connect to " + where + " failed: " + ec.message();
}

class HttpProbe final : public ProbeOp, public std::enable_shared_from_this<HttpProbe> {
 public:
  HttpProbe(asio::io_context& io, ProbeTarget t, DoneFn done)
      : stream_(io), target_(std::move(t)), done_(std::move(done)) {}

  void Start() {
    error_code ec;
    auto addr = asio::ip::make_address(target_.host, ec);
    const int port = PortOf(target_);
    where_ = Endpoint(target_, port) + target_.check.http_path;
    if (ec) return Finish(false, "bad probe address " + target_.host);
    stream_.expires_after(target_.check.timeout);
    const tcp::endpoint ep(addr, static_cast<uint16_t>(port));
    if (error_code open_ec = OpenCloseOnExec(stream_.socket(), ep); open_ec) {
      // Reported from the event loop, like every other result.
      return asio::post(stream_.get_executor(), [self = shared_from_this(), open_ec] {
        self->Finish(false,
                     "cannot open a socket to probe " + self->where_ + ": " + open_ec.message(),
                     IsLocalError(open_ec));
      });
    }
    stream_.async_connect(ep, [self = shared_from_this(), port](const error_code& ec) {
      if (ec) {
        return self->Fail(ec, ConnectFailure(ec, Endpoint(self->target_, port)));
      }
      self->Send();
    });
  }

  void Cancel() override {
    cancelled_ = true;
    stream_.cancel();
  }

 private:
  void Send() {
    req_ = {http::verb::get, target_.check.http_path, 11};
    req_.set(http::field::host, target_.host);
    req_.set(http::field::user_agent, "kiln-probe");
    req_.set(http::field::connection, "close");
    http::async_write(stream_, req_, [self = shared_from_this()](const error_code& ec, size_t) {
      if (ec) return self->Fail(ec, "http probe " + self->where_ + ": " + ec.message());
      self->parser_.body_limit(64 * 1024);
      http::async_read(
          self->stream_, self->buffer_, self->parser_, [self](const error_code& ec, size_t) {
            if (ec) return self->Fail(ec, "http probe " + self->where_ + ": " + ec.message());
            unsigned code = self->parser_.get().result_int();
            self->Finish(code >= 200 && code < 400,
                         "http " + std::to_string(code) + " from " + self->where_);
          });
    });
  }

  void Fail(const error_code& ec, std::string reason) {
    if (ec == beast::error::timeout) reason = TimeoutReason(target_);
    Finish(false, std::move(reason), IsLocalError(ec));
  }

  void Finish(bool healthy, std::string reason, bool local = false) {
    error_code ignored;
    stream_.socket().close(ignored);
    if (cancelled_ || !done_) return;
    auto done = std::move(done_);
    done({.instance = target_.instance,
          .healthy = healthy,
          .reason = std::move(reason),
          .local_error = local});
  }

  beast::tcp_stream stream_;
  ProbeTarget target_;
  DoneFn done_;
  std::string where_;
  http::request<http::empty_body> req_;
  http::response_parser<http::string_body> parser_;
  beast::flat_buffer buffer_;
  bool cancelled_ = false;
};

class TcpProbe final : public ProbeOp, public std::enable_shared_from_this<TcpProbe> {
 public:
  TcpProbe(asio::io_context& io, ProbeTarget t, DoneFn done)
      : socket_(io), timer_(io), target_(std::move(t)), done_(std::move(done)) {}

  void Start() {
    error_code ec;
    auto addr = asio::ip::make_address(target_.host, ec);
    const int port = PortOf(target_);
    if (ec) return Finish(false, "bad probe address " + target_.host);
    timer_.expires_after(target_.check.timeout);
    timer_.async_wait([self = shared_from_this()](const error_code& ec) {
      if (ec) return;
      self->timed_out_ = true;
      error_code ignored;
      self->socket_.close(ignored);
    });
    const tcp::endpoint ep(addr, static_cast<uint16_t>(port));
    if (error_code open_ec = OpenCloseOnExec(socket_, ep); open_ec) {
      return asio::post(socket_.get_executor(), [self = shared_from_this(), open_ec, port] {
        self->Finish(false,
                     "cannot open a socket to probe " + Endpoint(self->target_, port) + ": " +
                         open_ec.message(),
                     IsLocalError(open_ec));
      });
    }
    socket_.async_connect(ep, [self = shared_from_this(), port](const error_code& ec) {
      std::string where = Endpoint(self->target_, port);
      if (self->timed_out_) return self->Finish(false, TimeoutReason(self->target_));
      if (ec) return self->Finish(false, ConnectFailure(ec, where), IsLocalError(ec));
      self->Finish(true, "tcp connect to " + where + " ok");
    });
  }

  void Cancel() override {
    cancelled_ = true;
    timer_.cancel();
    error_code ignored;
    socket_.close(ignored);
  }

 private:
  void Finish(bool healthy, std::string reason, bool local = false) {
    timer_.cancel();
    error_code ignored;
    socket_.close(ignored);
    if (cancelled_ || !done_) return;
    auto done = std::move(done_);
    done({.instance = target_.instance,
          .healthy = healthy,
          .reason = std::move(reason),
          .local_error = local});
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  ProbeTarget target_;
  DoneFn done_;
  bool timed_out_ = false;
  bool cancelled_ = false;
};

// Runs the check's command in its own process group; exit code 0 is healthy.
class ExecProbe final : public ProbeOp, public std::enable_shared_from_this<ExecProbe> {
 public:
  ExecProbe(asio::io_context& io, ProbeTarget t, DoneFn done)
      : io_(io), pidfd_(io), timer_(io), target_(std::move(t)), done_(std::move(done)) {}

  void Start() {
    std::vector<std::string> argv = target_.check.exec;
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : target_.env) env_strings.push_back(k + "=" + v);
    if (!target_.env.count("PATH")) env_strings.push_back("PATH=/usr/local/bin:/usr/bin:/bin");
    std::vector<char*> cargv, cenv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    for (auto& e : env_strings) cenv.push_back(e.data());
    cenv.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    // Nothing else of kilnd's goes along: no listening socket, no pidfd, no log.
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    int rc = posix_spawnp(&pid_, cargv[0], &actions, &attr, cargv.data(), cenv.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
      auto self = shared_from_this();
      std::string reason = "exec cannot run " + argv[0] + ": " + std::strerror(rc);
      asio::post(io_,
                 [self, reason, local = IsLocalError(rc)] { self->Finish(false, reason, local); });
      return;
    }
    int fd = proc::PidfdOpen(pid_);
    if (fd < 0) {  // cannot happen for our own unreaped child; be safe anyway
      ::waitpid(pid_, nullptr, 0);
      auto self = shared_from_this();
      const int err = errno;
      asio::post(io_, [self, err] {
        self->Finish(false,
                     std::string("exec probe cannot watch its process: ") + std::strerror(err),
                     /*local=*/true);
      });
      return;
    }
    pidfd_.assign(fd);
    timer_.expires_after(target_.check.timeout);
    timer_.async_wait([self = shared_from_this()](const error_code& ec) {
      if (ec) return;
      self->timed_out_ = true;
      ::kill(-self->pid_, SIGKILL);
    });
    pidfd_.async_wait(asio::posix::stream_descriptor::wait_read,
                      [self = shared_from_this()](const error_code&) { self->Reap(); });
  }

  void Cancel() override {
    cancelled_ = true;
    if (pid_ > 0) ::kill(-pid_, SIGKILL);  // still unreaped, so the group id is still ours
  }

 private:
  void Reap() {
    timer_.cancel();
    int status = 0;
    ::waitpid(pid_, &status, 0);
    error_code ignored;
    pidfd_.close(ignored);
    pid_ = -1;
    if (timed_out_) return Finish(false, TimeoutReason(target_));
    if (WIFEXITED(status)) {
      int code = WEXITSTATUS(status);
      return Finish(code == 0, "exec exited with code " + std::to_string(code));
    }
    Finish(false, "exec killed by signal " + std::to_string(WTERMSIG(status)));
  }

  void Finish(bool healthy, std::string reason, bool local = false) {
    if (cancelled_ || !done_) return;
    auto done = std::move(done_);
    done({.instance = target_.instance,
          .healthy = healthy,
          .reason = std::move(reason),
          .local_error = local});
  }

  asio::io_context& io_;
  asio::posix::stream_descriptor pidfd_;
  asio::steady_timer timer_;
  ProbeTarget target_;
  DoneFn done_;
  pid_t pid_ = -1;
  bool timed_out_ = false;
  bool cancelled_ = false;
};

std::shared_ptr<ProbeOp> StartProbe(asio::io_context& io, const ProbeTarget& t, DoneFn done) {
  switch (t.check.kind) {
    case ProbeKind::kHttp: {
      auto op = std::make_shared<HttpProbe>(io, t, std::move(done));
      op->Start();
      return op;
    }
    case ProbeKind::kTcp: {
      auto op = std::make_shared<TcpProbe>(io, t, std::move(done));
      op->Start();
      return op;
    }
    case ProbeKind::kExec: {
      auto op = std::make_shared<ExecProbe>(io, t, std::move(done));
      op->Start();
      return op;
    }
    case ProbeKind::kNone:
      break;
  }
  asio::post(io, [done = std::move(done), instance = t.instance] {
    done({.instance = instance, .healthy = true, .reason = "no health check: running"});
  });
  return nullptr;
}

}  // namespace

struct Prober::Impl : std::enable_shared_from_this<Impl> {
  struct Watched {
    explicit Watched(asio::io_context& io) : timer(io) {}
    ProbeTarget target;
    TransitionFn on_transition;
    asio::steady_timer timer;
    enum class State { kUnknown, kHealthy, kUnhealthy } state = State::kUnknown;
    int failures = 0;
    std::optional<ProbeResult> last;
    std::shared_ptr<ProbeOp> inflight;
    bool stopped = false;
  };

  explicit Impl(asio::io_context& io_in) : io(io_in) {}

  void Run(const std::shared_ptr<Watched>& w) {
    std::weak_ptr<Impl> weak = weak_from_this();
    w->inflight = StartProbe(io, w->target, [weak, w](ProbeResult r) {
      auto self = weak.lock();
      if (!self || w->stopped) return;
      w->inflight.reset();
      self->Record(w, std::move(r));
      w->timer.expires_after(w->target.check.interval);
      w->timer.async_wait([weak, w](const error_code& ec) {
        auto self = weak.lock();
        if (ec || !self || w->stopped) return;
        self->Run(w);
      });
    });
  }

  void Record(const std::shared_ptr<Watched>& w, ProbeResult r) {
    using State = Watched::State;
    w->last = r;
    if (r.local_error) {
      // Not the instance's doing: its state and failure count stay as they are.
    } else if (r.healthy) {
      w->failures = 0;
      r.transition = w->state != State::kHealthy;
      w->state = State::kHealthy;
    } else {
      ++w->failures;
      if (w->state == State::kHealthy && w->failures >= w->target.check.failure_threshold) {
        w->state = State::kUnhealthy;
        r.transition = true;
      }
    }
    w->on_transition(r);
  }

  void Stop(const std::shared_ptr<Watched>& w) {
    w->stopped = true;
    w->timer.cancel();
    if (w->inflight) w->inflight->Cancel();
    w->inflight.reset();
  }

  asio::io_context& io;
  std::map<std::string, std::shared_ptr<Watched>> watched;
};

Prober::Prober(asio::io_context& io) : impl_(std::make_shared<Impl>(io)) {}

Prober::~Prober() {
  for (auto& [name, w] : impl_->watched) impl_->Stop(w);
}

void Prober::Watch(const ProbeTarget& target, TransitionFn on_transition) {
  Unwatch(target.instance);
  auto w = std::make_shared<Impl::Watched>(impl_->io);
  w->target = target;
  w->on_transition = std::move(on_transition);
  impl_->watched[target.instance] = w;
  impl_->Run(w);
}

void Prober::Unwatch(const std::string& instance) {
  auto it = impl_->watched.find(instance);
  if (it == impl_->watched.end()) return;
  impl_->Stop(it->second);
  impl_->watched.erase(it);
}

std::optional<ProbeResult> Prober::Last(const std::string& instance) const {
  auto it = impl_->watched.find(instance);
  if (it == impl_->watched.end()) return std::nullopt;
  return it->second->last;
}

size_t Prober::WatchedCount() const { return impl_->watched.size(); }

void Prober::ProbeOnce(const ProbeTarget& target, std::function<void(ProbeResult)> done) {
  StartProbe(impl_->io, target, std::move(done));
}

}  // namespace kiln
