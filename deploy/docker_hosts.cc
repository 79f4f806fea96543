#include "deploy/docker_hosts.h"

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <set>
#include <tuple>

#include "common/cancel_quietly.h"
#include "common/logging.h"
#include "deploy/docker_driver.h"

namespace kiln {
namespace asio = boost::asio;

namespace {

constexpr std::string_view kPrefix = "docker:";

bool IsValidHostName(const std::string& n) {
  if (n.empty() || n.size() > 63 || n.front() == '-' || n.back() == '-') return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
  });
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const std::string& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// "web-12" -> "web" (instance names are <service>-<id>).
std::string ServiceOfInstance(const std::string& instance) {
  size_t dash = instance.rfind('-');
  return dash == std::string::npos ? instance : instance.substr(0, dash);
}

}  // namespace

std::optional<std::pair<std::string, std::string>> ParseDockerHandle(const std::string& id) {
  if (id.rfind(kPrefix, 0) != 0) return std::nullopt;
  const std::string rest = id.substr(kPrefix.size());
  size_t slash = rest.find('/');
  if (slash == std::string::npos) return std::make_pair(std::string(kDefaultDockerHostName), rest);
  return std::make_pair(rest.substr(0, slash), rest.substr(slash + 1));
}

StatusOr<DockerHostConfig> ParseDockerHostFlag(const std::string& flag) {
  DockerHostConfig c;
  if (flag.rfind("name=", 0) == 0) {
    size_t comma = flag.find(',');
    if (comma == std::string::npos) {
      return InvalidArgumentError(
          "\"" + flag + "\": expected name=NAME,unix:///PATH (a comma, then the address)");
    }
    c.name = flag.substr(5, comma - 5);
    c.endpoint = flag.substr(comma + 1);
    if (!IsValidHostName(c.name)) {
      return InvalidArgumentError("\"" + flag + "\": host name \"" + c.name +
                                  "\" must be 1 to 63 characters of a-z, 0-9 and '-', not "
                                  "starting or ending with '-'");
    }
  } else {
    c.name = kDefaultDockerHostName;
    c.endpoint = flag;
  }
  if (Status s = CheckDockerEndpoint(c.endpoint); !s.ok()) {
    return InvalidArgumentError("\"" + flag + "\": " + s.message());
  }
  return c;
}

StatusOr<std::vector<DockerHostConfig>> ParseDockerHostFlags(
    const std::vector<std::string>& flags) {
  std::vector<DockerHostConfig> out;
  std::set<std::string> names, endpoints;
  for (const std::string& f : flags) {
    ASSIGN_OR_RETURN(DockerHostConfig c, ParseDockerHostFlag(f));
    if (!names.insert(c.name).second) {
      return InvalidArgumentError("host name \"" + c.name + "\" is given twice" +
                                  (c.name == kDefaultDockerHostName
                                       ? std::string(" (a bare address is named \"") +
                                             kDefaultDockerHostName +
                                             "\"; name each engine: name=NAME,ADDRESS)"
                                       : std::string()));
    }
    if (!endpoints.insert(c.endpoint).second) {
      return InvalidArgumentError("engine " + c.endpoint +
                                  " is given twice: one engine is one host");
    }
    out.push_back(std::move(c));
  }
  std::sort(out.begin(), out.end(),
            [](const DockerHostConfig& a, const DockerHostConfig& b) { return a.name < b.name; });
  return out;
}

struct DockerHostsDriver::Host {
  Host(asio::io_context& io, DockerHostConfig c) : config(std::move(c)), timer(io) {}
  DockerHostConfig config;
  std::unique_ptr<DockerDriver> driver;
  asio::steady_timer timer;
  bool up = true;
  bool coming_back = false;  // answered again; its untracked containers are being removed
  std::optional<std::chrono::steady_clock::time_point> failing_since;
  std::string last_error;
  int64_t since_ms = 0;
};

StatusOr<std::unique_ptr<DockerHostsDriver>> DockerHostsDriver::Create(asio::io_context& io,
                                                                       Options options) {
  if (options.hosts.empty()) return InvalidArgumentError("no Docker host given");
  std::unique_ptr<DockerHostsDriver> d(new DockerHostsDriver(io, std::move(options)));
  for (const DockerHostConfig& c : d->options_.hosts) {
    auto h = std::make_unique<Host>(io, c);
    DockerDriver::Options o;
    o.endpoint = c.endpoint;
    o.controller_id = d->options_.controller_id;
    o.publish_ip = d->options_.publish_ip;
    ASSIGN_OR_RETURN(h->driver, DockerDriver::Create(io, o));
    h->since_ms = UnixMs();
    d->hosts_.push_back(std::move(h));
  }
  for (auto& h : d->hosts_) {
    Host* raw = h.get();
    DockerHostsDriver* self = d.get();
    raw->driver->SetExitCallback([self, raw](const ExitInfo& e) {
      auto it = self->placed_.find(e.instance);
      if (it != self->placed_.end() && it->second.host == raw->config.name) {
        self->placed_.erase(it);
        self->Publish();
      }
      if (self->exit_fn_) self->exit_fn_(e);
    });
    d->SchedulePing(*raw);
  }
  d->Publish();
  return d;
}

DockerHostsDriver::DockerHostsDriver(asio::io_context& io, Options options)
    : io_(io), options_(std::move(options)) {}

DockerHostsDriver::~DockerHostsDriver() {
  *alive_ = false;
  for (auto& h : hosts_) CancelQuietly(h->timer, "Docker host ping timer");
}

void DockerHostsDriver::SetHostCallback(HostFn fn) { host_fn_ = std::move(fn); }

std::vector<DockerHostStatus> DockerHostsDriver::Hosts() const {
  std::lock_guard<std::mutex> lock(snapshot_mu_);
  return snapshot_;
}

void DockerHostsDriver::Publish() {
  std::vector<DockerHostStatus> out;
  for (const auto& h : hosts_) {
    DockerHostStatus s;
    s.name = h->config.name;
    s.endpoint = h->config.endpoint;
    s.up = h->up && !h->coming_back;
    s.last_error = h->last_error;
    s.since_ms = h->since_ms;
    for (const auto& [instance, p] : placed_) {
      if (p.host != s.name || p.abandoned) continue;
      ++s.instances;
      ++s.per_service[p.service];
    }
    out.push_back(std::move(s));
  }
  for (const auto& [name, left] : missing_) {
    DockerHostStatus s;
    s.name = name;
    s.configured = false;
    s.up = false;
    s.left_running = left;
    s.last_error = "not configured in this kilnd (no --docker-host name=" + name + ",...)";
    out.push_back(std::move(s));
  }
  std::lock_guard<std::mutex> lock(snapshot_mu_);
  snapshot_ = std::move(out);
}

DockerHostsDriver::Host* DockerHostsDriver::Find(const std::string& name) {
  for (auto& h : hosts_) {
    if (h->config.name == name) return h.get();
  }
  return nullptr;
}

std::string DockerHostsDriver::HostOfHandle(const std::string& id) const {
  auto parts = ParseDockerHandle(id);
  return parts ? parts->first : std::string();
}

StatusOr<std::pair<DockerHostsDriver::Host*, InstanceHandle>> DockerHostsDriver::Route(
    const InstanceHandle& handle) {
  if (handle.id.rfind(kPrefix, 0) != 0) {
    return InvalidArgumentError("instance " + handle.instance + ": not a Docker handle: \"" +
                                handle.id + "\"");
  }
  auto [host, container] = *ParseDockerHandle(handle.id);
  Host* h = Find(host);
  if (h == nullptr) {
    return FailedPreconditionError("instance " + handle.instance + " runs on Docker host \"" +
                                   host + "\", which this kilnd does not have (start it with " +
                                   "--docker-host name=" + host + ",ADDRESS)");
  }
  InstanceHandle inner = handle;
  inner.id = std::string(kPrefix) + container;
  return std::make_pair(h, inner);
}

void DockerHostsDriver::SetExitCallback(ExitFn fn) { exit_fn_ = std::move(fn); }

void DockerHostsDriver::Start(const InstanceSpec& spec, StartFn done) {
  auto fail = [this, &done](Status s) {
    asio::post(io_, [done = std::move(done), s = std::move(s)] { done(s); });
  };
  // The hosts the spec allows, configured or not.
  std::vector<Host*> allowed;
  std::vector<std::string> unknown;
  if (spec.hosts.empty()) {
    for (auto& h : hosts_) allowed.push_back(h.get());
  } else {
    for (const std::string& name : spec.hosts) {
      if (Host* h = Find(name)) {
        allowed.push_back(h);
      } else {
        unknown.push_back(name);
      }
    }
  }
  if (allowed.empty()) {
    std::vector<std::string> have;
    for (auto& h : hosts_) have.push_back(h->config.name);
    return fail(InvalidArgumentError("start " + spec.instance + ": hosts: [" + Join(unknown) +
                                     "] in the manifest: no such Docker host in this kilnd (it "
                                     "has " +
                                     Join(have) + ")"));
  }
  // Fewest of this service, then fewest overall, then by name (hosts_ is sorted by name).
  std::map<std::string, std::pair<int, int>> counts;
  for (const auto& [instance, p] : placed_) {
    if (p.abandoned) continue;
    auto& c = counts[p.host];
    c.first += p.service == spec.service;
    ++c.second;
  }
  Host* best = nullptr;
  std::pair<int, int> best_count;
  std::vector<std::string> down;
  for (Host* h : allowed) {
    if (!h->up || h->coming_back) {
      down.push_back(h->config.name);
      continue;
    }
    std::pair<int, int> c = counts[h->config.name];
    if (best == nullptr || c < best_count) {
      best = h;
      best_count = c;
    }
  }
  if (best == nullptr) {
    return fail(UnavailableError("start " + spec.instance + ": every Docker host it may run on " +
                                 "is down (" + Join(down) + ")"));
  }
  const std::string host = best->config.name;
  placed_[spec.instance] = Placed{.host = host, .service = spec.service};
  Publish();
  LogInfo("instance placed",
          {{"service", spec.service}, {"instance", spec.instance}, {"docker_host", host}});
  best->driver->Start(spec, [this, alive = alive_, host, instance = spec.instance,
                             done = std::move(done)](StatusOr<InstanceHandle> r) {
    if (!*alive) return done(r);
    auto it = placed_.find(instance);
    const bool abandoned = it != placed_.end() && it->second.abandoned;
    if (!r.ok() || abandoned) {
      if (it != placed_.end()) placed_.erase(it);
      Publish();
      if (r.ok()) {
        // Its container is removed with the rest when the host answers again.
        return done(UnavailableError("start " + instance + ": Docker host " + host +
                                     " went down while it started"));
      }
      return done(r.status().WithContext("on Docker host " + host));
    }
    if (it != placed_.end()) it->second.started = true;
    InstanceHandle h = *r;
    h.id = std::string(kPrefix) + host + "/" + h.id.substr(kPrefix.size());
    done(h);
  });
}

void DockerHostsDriver::Stop(const InstanceHandle& handle, Duration grace, StopFn done) {
  StatusOr<std::pair<Host*, InstanceHandle>> route = Route(handle);
  if (!route.ok()) {
    asio::post(io_, [done = std::move(done), s = route.status()] { done(s); });
    return;
  }
  Host* h = route->first;
  if (!h->up) {
    // Given up with its host; its container is removed when the host answers again.
    placed_.erase(handle.instance);
    Publish();
    ExitInfo gone;
    gone.instance = handle.instance;
    gone.status_known = false;
    gone.detail = "its Docker host " + h->config.name +
                  " is down; the container is removed when it answers again";
    asio::post(io_, [done = std::move(done), gone] { done(gone); });
    return;
  }
  if (auto it = placed_.find(handle.instance); it != placed_.end()) it->second.stopping = true;
  h->driver->Stop(route->second, grace,
                  [this, alive = alive_, instance = handle.instance,
                   done = std::move(done)](StatusOr<ExitInfo> r) {
                    if (*alive && r.ok()) {
                      placed_.erase(instance);
                      Publish();
                    } else if (*alive) {
                      if (auto it = placed_.find(instance); it != placed_.end()) {
                        it->second.stopping = false;
                      }
                    }
                    done(std::move(r));
                  });
}

StatusOr<bool> DockerHostsDriver::IsRunning(const InstanceHandle& handle) {
  ASSIGN_OR_RETURN(auto route, Route(handle));
  if (!route.first->up) return false;
  return route.first->driver->IsRunning(route.second);
}

StatusOr<std::vector<RunningInstance>> DockerHostsDriver::List() {
  std::vector<RunningInstance> all;
  for (auto& h : hosts_) {
    if (!h->up) continue;
    StatusOr<std::vector<RunningInstance>> some = h->driver->List();
    if (!some.ok()) return some.status().WithContext("Docker host " + h->config.name);
    for (RunningInstance& r : *some) {
      r.handle.id =
          std::string(kPrefix) + h->config.name + "/" + r.handle.id.substr(kPrefix.size());
      all.push_back(std::move(r));
    }
  }
  return all;
}

Status DockerHostsDriver::Adopt(const InstanceHandle& handle) {
  StatusOr<std::pair<Host*, InstanceHandle>> route = Route(handle);
  if (!route.ok()) {
    if (route.status().code() == StatusCode::kFailedPrecondition) {
      ++missing_[HostOfHandle(handle.id)];
      Publish();
      return FailedPreconditionError(route.status().message() +
                                     "; its container was left running there");
    }
    return route.status();
  }
  Host* h = route->first;
  if (!h->up) {
    return UnavailableError("instance " + handle.instance + ": its Docker host " + h->config.name +
                            " is down");
  }
  RETURN_IF_ERROR(h->driver->Adopt(route->second));
  placed_[handle.instance] = Placed{
      .host = h->config.name, .service = ServiceOfInstance(handle.instance), .started = true};
  Publish();
  return Status::Ok();
}

// ---- health ---------------------------------------------------------------------------------

void DockerHostsDriver::SchedulePing(Host& h) {
  h.timer.expires_after(options_.ping_interval);
  h.timer.async_wait([this, alive = alive_, hp = &h](const boost::system::error_code& ec) {
    if (ec || !*alive) return;
    hp->driver->Ping(options_.ping_timeout, [this, alive, hp](const Status& s) {
      if (!*alive) return;
      OnPing(*hp, s);
    });
  });
}

void DockerHostsDriver::OnPing(Host& h, const Status& s) {
  const auto now = std::chrono::steady_clock::now();
  if (!s.ok()) {
    h.last_error = s.message();
    if (!h.failing_since) h.failing_since = now;
    if (h.up && now - *h.failing_since >= options_.down_after) {
      MarkDown(h, s.message());
    }
    Publish();
    return SchedulePing(h);
  }
  h.failing_since.reset();
  if (h.up || h.coming_back) {
    if (h.up) h.last_error.clear();
    Publish();
    return SchedulePing(h);
  }
  // Down, and it answers again: remove what kiln gave up there before placing anything on it.
  h.coming_back = true;
  h.up = true;
  Publish();
  h.driver->RemoveUnwatched([this, alive = alive_, hp = &h](StatusOr<int> removed) {
    if (!*alive) return;
    if (!removed.ok()) {
      // Still not itself: down again, and the next answer tries again.
      hp->up = false;
      hp->coming_back = false;
      hp->last_error = removed.status().message();
      Publish();
      return SchedulePing(*hp);
    }
    hp->coming_back = false;
    hp->last_error.clear();
    hp->since_ms = UnixMs();
    Publish();
    const std::string message = "Docker host " + hp->config.name + " (" + hp->config.endpoint +
                                ") answers again; " + std::to_string(*removed) +
                                " container(s) of instances given up there removed";
    LogInfo("Docker host up", {{"docker_host", hp->config.name}, {"removed", *removed}});
    if (host_fn_) host_fn_(hp->config.name, true, message);
    SchedulePing(*hp);
  });
}

void DockerHostsDriver::MarkDown(Host& h, const std::string& why) {
  h.up = false;
  h.since_ms = UnixMs();
  h.driver->ForgetAll();
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(options_.down_after);
  const std::string message = "Docker host " + h.config.name + " (" + h.config.endpoint +
                              ") has not answered for " + std::to_string(seconds.count()) +
                              "s: marked down; its instances are lost and replaced elsewhere (" +
                              why + ")";
  LogError("Docker host down", {{"docker_host", h.config.name}, {"error", why}});
  if (host_fn_) host_fn_(h.config.name, false, message);
  std::vector<std::string> lost;
  for (auto it = placed_.begin(); it != placed_.end();) {
    Placed& p = it->second;
    if (p.host != h.config.name || p.stopping) {
      ++it;
      continue;
    }
    if (!p.started) {
      p.abandoned = true;  // its Start reports the failure
      ++it;
      continue;
    }
    lost.push_back(it->first);
    it = placed_.erase(it);
  }
  Publish();
  for (const std::string& instance : lost) {
    ExitInfo e;
    e.instance = instance;
    e.status_known = false;
    e.lost = true;
    e.detail = "its Docker host " + h.config.name + " is down";
    if (exit_fn_) exit_fn_(e);
  }
}

}  // namespace kiln
