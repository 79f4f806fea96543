#include "deploy/docker_driver.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdio>
#include <exception>
#include <map>
#include <nlohmann/json.hpp>

#include "common/cancel_quietly.h"
#include "common/logging.h"
#include "common/url.h"
#include "deploy/docker_client.h"

namespace kiln {
namespace asio = boost::asio;
using docker::Method;
using docker::Response;
using nlohmann::json;

namespace {

constexpr std::string_view kHandlePrefix = "docker:";

void ReplaceAll(std::string& s, std::string_view from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
}

json ParseJson(const std::string& body) { return json::parse(body, nullptr, false); }

// Members of the engine's answers, read without trusting their shape: a missing member or one of
// another type reads as null, "", false or nullopt.
const json& Member(const json& j, const char* key) {
  static const json kNull;
  if (!j.is_object()) return kNull;
  auto it = j.find(key);
  return it == j.end() ? kNull : *it;
}

std::string StringAt(const json& j, const char* key) {
  const json& v = Member(j, key);
  return v.is_string() ? v.get<std::string>() : std::string();
}

bool BoolAt(const json& j, const char* key) {
  const json& v = Member(j, key);
  return v.is_boolean() && v.get<bool>();
}

std::optional<int64_t> IntAt(const json& j, const char* key) {
  const json& v = Member(j, key);
  if (!v.is_number_integer()) return std::nullopt;
  return v.get<int64_t>();
}

// `name@sha256:<64 hex>` split into the repository name and the digest.
struct ImageRef {
  std::string name;    // "registry.example/web"
  std::string digest;  // "sha256:<hex>"
};

StatusOr<ImageRef> ParseImage(const std::string& image) {
  size_t at = image.rfind('@');
  if (at == std::string::npos || at == 0 || image.compare(at + 1, 7, "sha256:") != 0 ||
      image.size() - at - 8 != 64) {
    return InvalidArgumentError("image \"" + image + "\" is not pinned as name@sha256:<64 hex>");
  }
  return ImageRef{image.substr(0, at), image.substr(at + 1)};
}

StatusOr<std::string> ContainerIdOf(const InstanceHandle& h) {
  if (!IsDockerHandle(h.id) || h.id.size() == kHandlePrefix.size()) {
    return InvalidArgumentError("instance " + h.instance + ": not a Docker handle: \"" + h.id +
                                "\"");
  }
  return h.id.substr(kHandlePrefix.size());
}

// The engine's time in since= form ("<seconds>.<nanoseconds>"), from the system clock (the
// engine behind a unix socket shares it).
std::string SinceOf(int64_t unix_nanos) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%lld.%09lld", static_cast<long long>(unix_nanos / 1'000'000'000),
                static_cast<long long>(unix_nanos % 1'000'000'000));
  return buf;
}

int64_t NowUnixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The host port the engine published `container_port` on (any published port when 0).
int PublishedPort(const json& inspect, int container_port) {
  const json& ports = Member(Member(inspect, "NetworkSettings"), "Ports");
  if (!ports.is_object()) return 0;
  for (const auto& [key, bindings] : ports.items()) {
    if (container_port > 0 && key != std::to_string(container_port) + "/tcp") continue;
    if (!bindings.is_array()) continue;
    for (const json& b : bindings) {
      std::string port = StringAt(b, "HostPort");
      if (!port.empty()) return std::atoi(port.c_str());
    }
  }
  return 0;
}

void LogIfThrown(const std::exception_ptr& e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    LogError("Docker driver: a call failed unexpectedly", {{"error", ex.what()}});
  }
}

}  // namespace

bool IsDockerHandle(const std::string& id) { return id.rfind(kHandlePrefix, 0) == 0; }

Status CheckDockerEndpoint(const std::string& endpoint) {
  return docker::ParseEndpoint(endpoint).status();
}

struct DockerDriver::Impl : std::enable_shared_from_this<Impl> {
  // A container whose end this driver reports: started or adopted, not yet ended or stopped.
  struct Watch {
    InstanceHandle handle;
    std::string service;
    int64_t revision = 0;
    bool starting = false;  // Start has not reported yet: an exit waits for it
    bool stopping = false;  // Stop reports its end, not the exit callback
    std::optional<ExitInfo> exit_during_start;
  };

  Impl(asio::io_context& io_in, Options o, docker::Endpoint endpoint)
      : io(io_in),
        options(std::move(o)),
        client({.endpoint = std::move(endpoint), .timeout = options.request_timeout}),
        reconnect_timer(io),
        events_since(NowUnixNanos()) {}

  std::string Engine() const { return client.endpoint().text; }

  Status EngineError(const Response& r, const std::string& what) const {
    return UnavailableError("Docker engine " + Engine() + ": " + what + ": " +
                            docker::ErrorMessage(r));
  }

  // ---- start ------------------------------------------------------------------------------

  // The image to create the container from (its ID), pulling it first when the engine lacks it.
  asio::awaitable<StatusOr<std::string>> EnsureImage(const std::string& image) {
    StatusOr<ImageRef> ref = ParseImage(image);
    if (!ref.ok()) co_return ref.status();
    auto image_id = [&](const std::string& name) -> asio::awaitable<StatusOr<std::string>> {
      StatusOr<Response> r = co_await client.Call(Method::kGet, "/images/" + name + "/json");
      if (!r.ok()) co_return r.status();
      if (r->status == 404) co_return std::string();
      if (r->status != 200) co_return EngineError(*r, "inspecting image " + name);
      std::string id = StringAt(ParseJson(r->body), "Id");
      if (id.empty()) co_return EngineError(*r, "inspecting image " + name + ": no Id");
      co_return id;
    };
    // By repository digest, then by image ID (a `docker import`ed image has only the latter).
    StatusOr<std::string> id = co_await image_id(image);
    if (!id.ok() || !id->empty()) co_return id;
    id = co_await image_id(ref->digest);
    if (!id.ok() || !id->empty()) co_return id;

    LogInfo("pulling image", {{"image", image}, {"engine", Engine()}});
    StatusOr<Response> pull = co_await client.Call(
        Method::kPost,
        "/images/create?fromImage=" + UrlEncode(ref->name) + "&tag=" + UrlEncode(ref->digest), {},
        options.pull_timeout);
    if (!pull.ok()) co_return pull.status();
    // The engine answers 200 and reports progress, and a failure, as JSON lines.
    std::string pull_error;
    if (pull->status == 200) {
      size_t start = 0;
      while (start < pull->body.size()) {
        size_t nl = pull->body.find('\n', start);
        if (nl == std::string::npos) nl = pull->body.size();
        json line = ParseJson(pull->body.substr(start, nl - start));
        std::string err = StringAt(line, "error");
        if (!err.empty()) pull_error = err;
        start = nl + 1;
      }
    } else {
      pull_error = docker::ErrorMessage(*pull);
    }
    if (pull->status == 404 || pull->status == 401 || pull->status == 403 ||
        pull_error.find("denied") != std::string::npos ||
        pull_error.find("not found") != std::string::npos ||
        pull_error.find("unauthorized") != std::string::npos) {
      co_return InvalidArgumentError("image " + image + " not found on engine " + Engine() +
                                     " and its pull was refused: " + pull_error);
    }
    if (!pull_error.empty() || pull->status != 200) {
      co_return UnavailableError("image " + image + " not found on engine " + Engine() +
                                 " and pulling it failed: " + pull_error);
    }
    // The digest is checked: the engine must now hold the image under exactly that pin.
    id = co_await image_id(image);
    if (!id.ok()) co_return id.status();
    if (id->empty()) {
      co_return InvalidArgumentError("image " + image + ": pulled, but engine " + Engine() +
                                     " holds no image with that digest");
    }
    LogInfo("image pulled", {{"image", image}, {"engine", Engine()}, {"id", *id}});
    co_return id;
  }

  json CreateBody(const InstanceSpec& spec, const std::string& image_id) const {
    json env = json::array();
    std::map<std::string, std::string> vars = spec.env;
    vars["KILN_CONTROLLER"] = options.controller_id;
    vars["KILN_SERVICE"] = spec.service;
    vars["KILN_REVISION"] = std::to_string(spec.revision);
    vars["KILN_INSTANCE"] = spec.instance;
    if (spec.container_port > 0) vars["PORT"] = std::to_string(spec.container_port);
    for (const auto& [k, v] : vars) {
      std::string entry = k;
      entry += '=';
      entry += v;
      env.push_back(std::move(entry));
    }
    json body = {
        {"Image", image_id},
        {"Env", env},
        {"Labels",
         {{"kiln.instance", spec.instance},
          {"kiln.service", spec.service},
          {"kiln.revision", std::to_string(spec.revision)},
          {"kiln.controller", options.controller_id}}},
        {"HostConfig", {{"RestartPolicy", {{"Name", "no"}}}}},
    };
    if (!spec.command.empty()) {
      json cmd = json::array();
      for (std::string a : spec.command) {
        ReplaceAll(a, "{port}", std::to_string(spec.container_port));
        ReplaceAll(a, "{instance}", spec.instance);
        ReplaceAll(a, "{service}", spec.service);
        ReplaceAll(a, "{revision}", std::to_string(spec.revision));
        cmd.push_back(a);
      }
      body["Cmd"] = cmd;
    }
    if (spec.container_port > 0) {
      const std::string key = std::to_string(spec.container_port) + "/tcp";
      body["ExposedPorts"] = {{key, json::object()}};
      body["HostConfig"]["PortBindings"] = {
          {key, json::array({{{"HostIp", options.publish_ip}, {"HostPort", ""}}})}};
    }
    return body;
  }

  // Removes a container, whatever its state; failures are logged (List finds it again).
  asio::awaitable<void> Remove(const std::string& id, const std::string& instance) {
    StatusOr<Response> r =
        co_await client.Call(Method::kDelete, "/containers/" + id + "?force=1&v=1");
    if (!r.ok() || (r->status != 204 && r->status != 404)) {
      LogWarn("cannot remove a container",
              {{"instance", instance},
               {"container", id.substr(0, 12)},
               {"error", r.ok() ? docker::ErrorMessage(*r) : r.status().message()}});
    }
  }

  asio::awaitable<StatusOr<InstanceHandle>> DoStart(const InstanceSpec& spec) {
    if (spec.image.empty()) {
      co_return InvalidArgumentError("the Docker driver needs an image");
    }
    StatusOr<std::string> image_id = co_await EnsureImage(spec.image);
    if (!image_id.ok()) co_return image_id.status();

    const std::string name = "kiln-" + spec.instance;
    StatusOr<Response> created =
        co_await client.Call(Method::kPost, "/containers/create?name=" + UrlEncode(name),
                             CreateBody(spec, *image_id).dump());
    if (!created.ok()) co_return created.status();
    if (created->status == 409) {
      co_return AlreadyExistsError("a container named " + name + " exists on engine " + Engine() +
                                   ": " + docker::ErrorMessage(*created));
    }
    if (created->status == 404) {
      co_return InvalidArgumentError("image " + spec.image + " is gone from engine " + Engine() +
                                     ": " + docker::ErrorMessage(*created));
    }
    if (created->status != 201) {
      co_return EngineError(*created, "creating container " + name);
    }
    const std::string id = StringAt(ParseJson(created->body), "Id");
    if (id.empty()) co_return EngineError(*created, "creating container " + name + ": no Id");

    InstanceHandle handle;
    handle.instance = spec.instance;
    handle.id = std::string(kHandlePrefix) + id;
    handle.host = options.publish_ip;
    auto watch = std::make_shared<Watch>();
    watch->handle = handle;
    watch->service = spec.service;
    watch->revision = spec.revision;
    watch->starting = true;
    watches[id] = watch;  // before the start: its die event may come at once

    auto fail = [&](Status s) -> asio::awaitable<StatusOr<InstanceHandle>> {
      watches.erase(id);
      co_await Remove(id, spec.instance);
      co_return s;
    };
    StatusOr<Response> started =
        co_await client.Call(Method::kPost, "/containers/" + id + "/start");
    if (!started.ok()) co_return co_await fail(started.status());
    if (started->status != 204 && started->status != 304) {
      const std::string msg = docker::ErrorMessage(*started);
      if (msg.find("port is already allocated") != std::string::npos ||
          msg.find("address already in use") != std::string::npos) {
        co_return co_await fail(
            UnavailableError("port conflict on engine " + Engine() + " for " + name + ": " + msg));
      }
      if (msg.find("executable file not found") != std::string::npos ||
          msg.find("no such file or directory") != std::string::npos) {
        co_return co_await fail(
            InvalidArgumentError("image " + spec.image + " cannot run the command: " + msg));
      }
      co_return co_await fail(EngineError(*started, "starting container " + name));
    }
    StatusOr<Response> inspected =
        co_await client.Call(Method::kGet, "/containers/" + id + "/json");
    if (!inspected.ok()) co_return co_await fail(inspected.status());
    if (inspected->status != 200) {
      co_return co_await fail(EngineError(*inspected, "inspecting container " + name));
    }
    json info = ParseJson(inspected->body);
    handle.port = PublishedPort(info, spec.container_port);
    handle.pid = IntAt(Member(info, "State"), "Pid").value_or(0);
    watch->handle = handle;
    watch->starting = false;
    LogInfo("container started", {{"service", spec.service},
                                  {"revision", spec.revision},
                                  {"instance", spec.instance},
                                  {"container", id.substr(0, 12)},
                                  {"image", spec.image},
                                  {"port", handle.port}});
    co_return handle;
  }

  // ---- exits ------------------------------------------------------------------------------

  // How a container ended, from inspect (nullopt when it is gone or the engine cannot say).
  asio::awaitable<std::optional<ExitInfo>> ExitOf(const std::string& id,
                                                  const std::string& instance) {
    StatusOr<Response> r = co_await client.Call(Method::kGet, "/containers/" + id + "/json");
    if (!r.ok() || r->status != 200) co_return std::nullopt;
    json info = ParseJson(r->body);
    const json& st = Member(info, "State");
    if (!st.is_object() || BoolAt(st, "Running")) co_return std::nullopt;
    ExitInfo e;
    e.instance = instance;
    if (std::optional<int64_t> code = IntAt(st, "ExitCode")) e.exit_code = static_cast<int>(*code);
    if (BoolAt(st, "OOMKilled")) e.detail = "OOMKilled: out of memory";
    co_return e;
  }

  void Report(const std::shared_ptr<Watch>& w, const ExitInfo& e) {
    LogInfo("container ended", {{"service", w->service},
                                {"revision", w->revision},
                                {"instance", w->handle.instance},
                                {"how", e.Describe()}});
    if (exit_fn) exit_fn(e);
  }

  // A die event (or a container found ended after the stream dropped): report it once.
  asio::awaitable<void> OnEnded(std::string id, std::optional<int> event_code) {
    auto it = watches.find(id);
    if (it == watches.end() || it->second->stopping) co_return;
    std::shared_ptr<Watch> w = it->second;
    std::optional<ExitInfo> e = co_await ExitOf(id, w->handle.instance);
    auto now = watches.find(id);
    if (now == watches.end() || now->second != w || w->stopping) co_return;  // reported or stopped
    if (!e) {
      if (!event_code) co_return;  // still running after all
      e = ExitInfo{};
      e->instance = w->handle.instance;
      e->exit_code = event_code;
    }
    if (w->starting) {
      w->exit_during_start = e;
      co_return;
    }
    watches.erase(id);
    Report(w, *e);
    co_await Remove(id, w->handle.instance);
  }

  void OnEventLine(std::string_view line) {
    if (shutting_down) return;
    json ev = json::parse(line, nullptr, false);
    if (!ev.is_object()) return;
    if (std::optional<int64_t> t = IntAt(ev, "timeNano")) events_since = std::max(events_since, *t);
    std::string action = StringAt(ev, "Action");
    if (action.empty()) action = StringAt(ev, "status");
    if (action != "die") return;
    std::string id;
    std::optional<int> code;
    const json& actor = Member(ev, "Actor");
    id = StringAt(actor, "ID");
    std::string c = StringAt(Member(actor, "Attributes"), "exitCode");
    if (!c.empty()) code = std::atoi(c.c_str());
    if (id.empty()) id = StringAt(ev, "id");
    if (id.empty() || !watches.count(id)) return;
    Spawn([self = shared_from_this(), id, code]() { return self->OnEnded(id, code); });
  }

  // Any watched container that is no longer running: after the stream dropped, in case its die
  // event is not in the engine's memory any more (the engine restarted).
  asio::awaitable<void> CheckWatched() {
    std::vector<std::string> ids;
    for (const auto& [id, w] : watches) {
      if (!w->starting && !w->stopping) ids.push_back(id);
    }
    for (const std::string& id : ids) {
      StatusOr<Response> r = co_await client.Call(Method::kGet, "/containers/" + id + "/json");
      if (!r.ok()) co_return;  // the engine is still away; the next reconnect looks again
      auto it = watches.find(id);
      if (it == watches.end()) continue;
      if (r->status == 404) {
        std::shared_ptr<Watch> w = it->second;
        if (w->stopping || w->starting) continue;
        watches.erase(it);
        ExitInfo e;
        e.instance = w->handle.instance;
        e.status_known = false;
        e.detail = "its container was removed by someone else";
        Report(w, e);
        continue;
      }
      const json info = ParseJson(r->body);
      const json& st = Member(info, "State");
      if (st.is_object() && !BoolAt(st, "Running")) {
        co_await OnEnded(id, std::nullopt);
      }
    }
  }

  asio::awaitable<void> EventsLoop() {
    json filters = json::object();
    filters["type"] = json::array({"container"});
    filters["event"] = json::array({"die"});
    filters["label"] = json::array({"kiln.controller=" + options.controller_id});
    Duration backoff{100};
    bool dropped = false;
    while (!shutting_down) {
      const std::string target =
          "/events?since=" + SinceOf(events_since) + "&filters=" + UrlEncode(filters.dump());
      if (dropped) co_await CheckWatched();
      // `this` lives as long as this coroutine: the co_spawn that runs it holds a reference.
      Status s = co_await client.Stream(
          target, [this](std::string_view line) { OnEventLine(line); }, events_control);
      if (shutting_down) break;
      if (s.ok() || s.code() == StatusCode::kCancelled) backoff = Duration{100};
      if (!dropped || backoff >= Duration{2000}) {
        LogWarn("Docker engine's event stream ended; reconnecting",
                {{"engine", Engine()}, {"error", s.ok() ? "closed by the engine" : s.message()}});
      }
      dropped = true;
      events_control = std::make_shared<docker::StreamControl>();
      reconnect_timer.expires_after(backoff);
      boost::system::error_code ec;
      co_await reconnect_timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      backoff = std::min(backoff * 2, Duration{5000});
    }
  }

  // ---- stop -------------------------------------------------------------------------------

  asio::awaitable<StatusOr<ExitInfo>> DoStop(InstanceHandle handle, Duration grace) {
    StatusOr<std::string> id = ContainerIdOf(handle);
    if (!id.ok()) co_return id.status();
    std::shared_ptr<Watch> w;
    if (auto it = watches.find(*id); it != watches.end()) {
      w = it->second;
      w->stopping = true;
    }
    auto forget = [&] {
      if (auto it = watches.find(*id); it != watches.end() && it->second == w) watches.erase(it);
    };
    const auto seconds = std::chrono::ceil<std::chrono::seconds>(grace).count();
    StatusOr<Response> stopped = co_await client.Call(
        Method::kPost, "/containers/" + *id + "/stop?t=" + std::to_string(seconds), {},
        grace + options.request_timeout);
    if (!stopped.ok()) {
      if (w) w->stopping = false;  // still ours to watch
      co_return stopped.status().WithContext("stop " + handle.instance);
    }
    ExitInfo gone;
    gone.instance = handle.instance;
    gone.status_known = false;
    if (stopped->status == 404) {
      forget();
      co_return gone;  // already removed: the stop is done
    }
    if (stopped->status != 204 && stopped->status != 304) {
      if (w) w->stopping = false;
      co_return EngineError(*stopped, "stopping " + handle.instance);
    }
    std::optional<ExitInfo> e = co_await ExitOf(*id, handle.instance);
    co_await Remove(*id, handle.instance);
    forget();
    co_return e ? *e : gone;
  }

  // ---- synchronous ------------------------------------------------------------------------

  StatusOr<json> InspectSync(const std::string& id) {
    StatusOr<Response> r =
        client.CallSync(Method::kGet, "/containers/" + id + "/json", {}, options.sync_timeout);
    if (!r.ok()) return r.status();
    if (r->status == 404) return json();
    if (r->status != 200) return EngineError(*r, "inspecting container " + id.substr(0, 12));
    return ParseJson(r->body);
  }

  template <typename F>
  void Spawn(F f) {
    asio::co_spawn(io, std::move(f), LogIfThrown);
  }

  asio::io_context& io;
  Options options;
  docker::Client client;
  std::map<std::string, std::shared_ptr<Watch>> watches;  // by container id
  ExitFn exit_fn;
  std::shared_ptr<docker::StreamControl> events_control = std::make_shared<docker::StreamControl>();
  asio::steady_timer reconnect_timer;
  int64_t events_since;  // unix ns of the newest event seen (or of the driver's start)
  bool shutting_down = false;
};

StatusOr<std::unique_ptr<DockerDriver>> DockerDriver::Create(asio::io_context& io,
                                                             Options options) {
  ASSIGN_OR_RETURN(docker::Endpoint endpoint, docker::ParseEndpoint(options.endpoint));
  if (options.controller_id.empty()) {
    return InvalidArgumentError("the Docker driver needs a controller id");
  }
  auto impl = std::make_shared<Impl>(io, std::move(options), std::move(endpoint));
  impl->Spawn([impl]() { return impl->EventsLoop(); });
  return std::unique_ptr<DockerDriver>(new DockerDriver(std::move(impl)));
}

DockerDriver::DockerDriver(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

DockerDriver::~DockerDriver() {
  impl_->shutting_down = true;
  impl_->exit_fn = nullptr;
  impl_->events_control->Cancel();
  CancelQuietly(impl_->reconnect_timer, "Docker events reconnect timer");
}

const std::string& DockerDriver::endpoint() const { return impl_->client.endpoint().text; }

void DockerDriver::SetExitCallback(ExitFn fn) { impl_->exit_fn = std::move(fn); }

void DockerDriver::Start(const InstanceSpec& spec, StartFn done) {
  impl_->Spawn([impl = impl_, spec, done = std::move(done)]() -> asio::awaitable<void> {
    // Never inline: the caller hears of the start after Start returned.
    co_await asio::post(impl->io, asio::use_awaitable);
    StatusOr<InstanceHandle> r = co_await impl->DoStart(spec);
    if (!r.ok()) {
      Status s = r.status().WithContext("start " + spec.instance);
      LogWarn("container did not start", {{"service", spec.service},
                                          {"revision", spec.revision},
                                          {"instance", spec.instance},
                                          {"error", s.message()}});
      done(s);
      co_return;
    }
    done(*r);
    // An end that came while starting is reported once the start is.
    StatusOr<std::string> id = ContainerIdOf(*r);
    auto it = id.ok() ? impl->watches.find(*id) : impl->watches.end();
    if (it != impl->watches.end() && it->second->exit_during_start) {
      co_await impl->OnEnded(*id, it->second->exit_during_start->exit_code);
    }
  });
}

void DockerDriver::Stop(const InstanceHandle& handle, Duration grace, StopFn done) {
  impl_->Spawn([impl = impl_, handle, grace, done = std::move(done)]() -> asio::awaitable<void> {
    co_await asio::post(impl->io, asio::use_awaitable);
    StatusOr<ExitInfo> r = co_await impl->DoStop(handle, grace);
    if (r.ok()) {
      LogInfo("container stopped", {{"instance", handle.instance}, {"how", r->Describe()}});
    }
    done(std::move(r));
  });
}

void DockerDriver::Ping(Duration timeout, std::function<void(Status)> done) {
  impl_->Spawn([impl = impl_, timeout, done = std::move(done)]() -> asio::awaitable<void> {
    co_await asio::post(impl->io, asio::use_awaitable);
    Status s = co_await impl->client.Ping(timeout);
    done(std::move(s));
  });
}

void DockerDriver::ForgetAll() { impl_->watches.clear(); }

void DockerDriver::RemoveUnwatched(std::function<void(StatusOr<int>)> done) {
  impl_->Spawn([impl = impl_, done = std::move(done)]() -> asio::awaitable<void> {
    co_await asio::post(impl->io, asio::use_awaitable);
    json filters = json::object();
    filters["label"] = json::array({"kiln.controller=" + impl->options.controller_id});
    StatusOr<Response> r = co_await impl->client.Call(
        Method::kGet, "/containers/json?all=1&filters=" + UrlEncode(filters.dump()));
    if (!r.ok()) {
      done(r.status());
      co_return;
    }
    if (r->status != 200) {
      done(impl->EngineError(*r, "listing containers"));
      co_return;
    }
    const json list = ParseJson(r->body);
    int removed = 0;
    for (size_t i = 0; list.is_array() && i < list.size(); ++i) {
      const std::string id = StringAt(list[i], "Id");
      if (id.empty() || impl->watches.count(id)) continue;
      const std::string instance = StringAt(Member(list[i], "Labels"), "kiln.instance");
      co_await impl->Remove(id, instance);
      LogInfo(
          "container removed: its instance was given up while its engine was away",
          {{"instance", instance}, {"container", id.substr(0, 12)}, {"engine", impl->Engine()}});
      ++removed;
    }
    done(removed);
  });
}

StatusOr<bool> DockerDriver::IsRunning(const InstanceHandle& handle) {
  ASSIGN_OR_RETURN(std::string id, ContainerIdOf(handle));
  ASSIGN_OR_RETURN(json info, impl_->InspectSync(id));
  return !info.is_null();
}

StatusOr<std::vector<RunningInstance>> DockerDriver::List() {
  json filters = json::object();
  filters["label"] = json::array({"kiln.controller=" + impl_->options.controller_id});
  StatusOr<Response> r = impl_->client.CallSync(
      Method::kGet, "/containers/json?all=1&filters=" + UrlEncode(filters.dump()), {},
      impl_->options.sync_timeout);
  if (!r.ok()) return r.status();
  if (r->status != 200) return impl_->EngineError(*r, "listing containers");
  json list = ParseJson(r->body);
  if (!list.is_array()) return impl_->EngineError(*r, "listing containers: not a list");
  std::vector<RunningInstance> out;
  for (const json& c : list) {
    const json& labels = Member(c, "Labels");
    RunningInstance ri;
    ri.handle.instance = StringAt(labels, "kiln.instance");
    if (ri.handle.instance.empty()) continue;
    ri.handle.id = std::string(kHandlePrefix) + StringAt(c, "Id");
    ri.handle.host = impl_->options.publish_ip;
    ri.service = StringAt(labels, "kiln.service");
    ri.revision = std::atoll(StringAt(labels, "kiln.revision").c_str());
    const json& ports = Member(c, "Ports");
    for (size_t i = 0; ports.is_array() && i < ports.size() && ri.handle.port == 0; ++i) {
      ri.handle.port = static_cast<int>(IntAt(ports[i], "PublicPort").value_or(0));
    }
    out.push_back(std::move(ri));
  }
  return out;
}

Status DockerDriver::Adopt(const InstanceHandle& handle) {
  ASSIGN_OR_RETURN(std::string id, ContainerIdOf(handle));
  if (impl_->watches.count(id)) return Status::Ok();
  ASSIGN_OR_RETURN(json info, impl_->InspectSync(id));
  if (info.is_null()) {
    return NotFoundError("instance " + handle.instance +
                         " is gone: its container no longer exists");
  }
  const json& state = Member(info, "State");
  const json& labels = Member(Member(info, "Config"), "Labels");
  if (StringAt(labels, "kiln.controller") != impl_->options.controller_id) {
    return NotFoundError("instance " + handle.instance + ": container " + id.substr(0, 12) +
                         " is not this controller's");
  }
  if (!BoolAt(state, "Running")) {
    const int64_t code = IntAt(state, "ExitCode").value_or(0);
    impl_->Spawn([impl = impl_, id, name = handle.instance]() { return impl->Remove(id, name); });
    return NotFoundError("instance " + handle.instance +
                         " is gone: its container exited with code " + std::to_string(code) +
                         "; removing it");
  }
  auto w = std::make_shared<Impl::Watch>();
  w->handle = handle;
  w->handle.port = PublishedPort(info, 0);
  if (handle.port != 0) w->handle.port = handle.port;
  w->service = StringAt(labels, "kiln.service");
  w->revision = std::atoll(StringAt(labels, "kiln.revision").c_str());
  impl_->watches[id] = w;
  LogInfo("container adopted", {{"service", w->service},
                                {"revision", w->revision},
                                {"instance", handle.instance},
                                {"container", id.substr(0, 12)}});
  return Status::Ok();
}

}  // namespace kiln
