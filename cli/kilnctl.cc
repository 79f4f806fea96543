#include "cli/kilnctl.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>
#include <thread>

#include "cli/logs.h"
#include "cli/rollout_status.h"
#include "common/duration.h"
#include "common/limits.h"
#include "common/regular_file.h"
#include "common/status.h"
#include "kiln/v1/kiln.grpc.pb.h"
#include "kiln/version.h"
#include "spec/manifest.h"

namespace kiln {
namespace {

namespace pb = ::kiln::v1;
using Rows = std::vector<std::vector<std::string>>;

// Prints rows as aligned columns: the width of each column is its widest cell.
void PrintTable(std::ostream& out, const Rows& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()));
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out << line << "\n";
  }
}

void EmitYaml(YAML::Emitter& y, const nlohmann::json& j) {
  if (j.is_object()) {
    y << YAML::BeginMap;
    for (auto it = j.begin(); it != j.end(); ++it) {
      y << YAML::Key << it.key() << YAML::Value;
      EmitYaml(y, it.value());
    }
    y << YAML::EndMap;
  } else if (j.is_array()) {
    y << YAML::BeginSeq;
    for (const auto& v : j) EmitYaml(y, v);
    y << YAML::EndSeq;
  } else if (j.is_string()) {
    y << j.get<std::string>();
  } else {
    y << j.dump();
  }
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

// Prints a response as JSON or YAML; false when the format is "table" (the caller prints).
bool PrintStructured(const google::protobuf::Message& m, const std::string& format,
                     std::ostream& out) {
  if (format == "json") {
    out << ToJson(m);
    return true;
  }
  if (format == "yaml") {
    YAML::Emitter y;
    EmitYaml(y, nlohmann::json::parse(ToJson(m)));
    out << y.c_str() << "\n";
    return true;
  }
  return false;
}

// How long from `since_ms` to `until_ms` (default: now), "12s", "5m", "3h", "2d".
std::string Age(int64_t since_ms, int64_t until_ms = 0) {
  if (since_ms <= 0) return "-";
  int64_t now = until_ms > 0 ? until_ms
                             : std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
  int64_t s = std::max<int64_t>(0, (now - since_ms) / 1000);
  if (s < 120) return std::to_string(s) + "s";
  if (s < 7200) return std::to_string(s / 60) + "m";
  if (s < 172800) return std::to_string(s / 3600) + "h";
  return std::to_string(s / 86400) + "d";
}

std::string Time(int64_t ms) {
  if (ms <= 0) return "-";
  std::time_t t = ms / 1000;
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", std::gmtime(&t));
  return buf;
}

// A proto enum value's name as kilnctl prints it: without its prefix, in lower case, with '_'
// kept or written as `sep` ("INSTANCE_STATE_HEALTHY" -> "healthy", "BLUE_GREEN" -> "blue-green").
std::string Label(const std::string& proto_name, std::string_view prefix, char sep = '_') {
  std::string n = proto_name.substr(prefix.size());
  for (char& c : n) c = c == '_' ? sep : static_cast<char>(std::tolower(c));
  return n;
}

std::string StateName(pb::InstanceState s) {
  return Label(pb::InstanceState_Name(s), "INSTANCE_STATE_");
}

std::string RolloutStateName(pb::RolloutState s) {
  return Label(pb::RolloutState_Name(s), "ROLLOUT_STATE_");
}

std::string EndpointStateName(pb::EndpointState s) {
  return Label(pb::EndpointState_Name(s), "ENDPOINT_STATE_", '-');
}

std::string StrategyLabel(pb::Strategy s) { return Label(pb::Strategy_Name(s), "STRATEGY_", '-'); }

// How to reach kilnd.
struct Connection {
  std::string addr;
  std::string token;
  std::string ca, cert, key;
  int timeout_s = 10;
};

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class Client {
 public:
  explicit Client(Connection c) : conn_(std::move(c)) {
    std::string target = conn_.addr;
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!conn_.ca.empty() || !conn_.cert.empty()) {
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = ReadAll(conn_.ca);
      ssl.pem_cert_chain = conn_.cert.empty() ? "" : ReadAll(conn_.cert);
      ssl.pem_private_key = conn_.key.empty() ? "" : ReadAll(conn_.key);
      creds = grpc::SslCredentials(ssl);
    }
    stub_ = pb::Kiln::NewStub(grpc::CreateChannel(target, creds));
  }

  void Prepare(grpc::ClientContext& ctx, bool stream = false) const {
    if (!stream)
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(conn_.timeout_s));
    if (!conn_.token.empty()) ctx.AddMetadata("authorization", "Bearer " + conn_.token);
  }

  pb::Kiln::Stub& stub() { return *stub_; }
  const Connection& conn() const { return conn_; }

 private:
  Connection conn_;
  std::unique_ptr<pb::Kiln::Stub> stub_;
};

// One line for a failed call; daemon down is said plainly.
int Fail(const grpc::Status& s, const Connection& c, std::ostream& err) {
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
      s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    err << "kilnctl: cannot reach kilnd at " << c.addr
        << " (is it running? set --addr or KILN_ADDR): " << s.error_message() << "\n";
    return 1;
  }
  // kiln's status codes are gRPC's, one to one.
  err << "kilnctl: " << StatusCodeName(static_cast<StatusCode>(s.error_code())) << ": "
      << s.error_message() << "\n";
  return 1;
}

// One read call: prints the response as JSON/YAML, or the table `rows(response)` makes.
template <typename Req, typename Resp, typename RowsFn>
int Query(Client& c, grpc::Status (pb::Kiln::Stub::*rpc)(grpc::ClientContext*, const Req&, Resp*),
          const Req& req, const std::string& format, std::ostream& out, std::ostream& err,
          RowsFn rows) {
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  Resp resp;
  grpc::Status s = (c.stub().*rpc)(&ctx, req, &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  if (!PrintStructured(resp, format, out)) PrintTable(out, rows(resp));
  return 0;
}

std::vector<std::string> InstanceRow(const pb::Instance& i, const std::string& indent = "") {
  // A draining instance of an exposed service says how its drain goes.
  std::string reason = i.drain().empty() ? i.reason() : i.drain() + "; " + i.reason();
  return {indent + i.id(), std::to_string(i.revision()), StateName(i.state()),
          i.available() ? "yes" : "no", std::to_string(i.port()),
          // A container's: its pid on its Docker host, and which host.
          std::to_string(i.pid()) + (i.container_id().empty() ? "" : " on " + i.host()),
          Age(i.created_unix_ms()), reason};
}

// "http 503 from 127.0.0.1:20001/healthz (failing 12s, first: connect refused ...)".
std::string ProbeCell(const pb::Instance& i) {
  if (i.last_probe().empty()) return "-";
  std::string out = i.last_probe();
  if (!i.last_probe_ok() && i.probe_failing_since_unix_ms() > 0) {
    out += " (failing " + Age(i.probe_failing_since_unix_ms());
    if (i.first_probe_failure() != i.last_probe()) out += ", first: " + i.first_probe_failure();
    out += ")";
  }
  return out;
}

std::string ConditionsLine(const pb::ServiceSummary& s) {
  std::string out;
  for (const auto& c : s.conditions()) {
    if (c.type() == "Degraded" && !c.status()) continue;
    if (!out.empty()) out += ", ";
    out += c.type() + (c.status() ? "" : "=false") + " (" + c.reason() + ")";
  }
  return out;
}

// `--manifests git+...`: what was fetched and what runs, one line each, aligned with status.
void PrintGitSource(const pb::GitSourceStatus& g, std::ostream& out) {
  auto commit = [](const pb::Commit& c) {
    return c.id().substr(0, 12) + " \"" + c.subject() + "\" (" + c.author() + ", " +
           Time(c.time_unix_ms()) + ")";
  };
  out << "Git:        " << g.url() << "#" << g.branch() << " (fetched every "
      << FormatDuration(Duration(g.poll_interval_ms())) << ", last " << Age(g.last_fetch_unix_ms())
      << " ago)\n";
  out << "Deployed:   " << (g.has_deployed() ? commit(g.deployed()) : "-") << "\n";
  out << "Seen:       " << (g.has_seen() ? commit(g.seen()) : "-") << "\n";
  if (!g.manifest_error().empty()) out << "Git manifest error: " << g.manifest_error() << "\n";
  if (!g.fetch_error().empty()) {
    out << "Fetch error: " << g.fetch_error() << " (last good fetch "
        << (g.last_success_unix_ms() > 0 ? Age(g.last_success_unix_ms()) + " ago" : "never")
        << "; the last good state runs)\n";
  }
}

// The Docker hosts: HOST, ENGINE, HEALTH (up, down for how long and why, or not configured
// with the containers left there), INSTANCES (by service).
void PrintDockerHosts(const pb::ListServicesResponse& resp, std::ostream& out) {
  Rows rows = {{"HOST", "ENGINE", "HEALTH", "INSTANCES"}};
  for (const pb::DockerHost& h : resp.docker_hosts()) {
    std::string health;
    if (!h.configured()) {
      health = "not configured: " + std::to_string(h.left_running()) +
               " container(s) of stored instances left running there";
    } else if (h.up()) {
      health = "up";
    } else {
      health = "down for " + Age(h.since_unix_ms()) +
               (h.last_error().empty() ? "" : " (" + h.last_error() + ")");
    }
    std::string count = std::to_string(h.instances());
    std::map<std::string, int32_t> by(h.instances_by_service().begin(),
                                      h.instances_by_service().end());
    std::string each;
    for (const auto& [svc, n] : by)
      each += (each.empty() ? "" : ", ") + svc + " " + std::to_string(n);
    if (!each.empty()) count += " (" + each + ")";
    rows.push_back({h.name(), h.endpoint().empty() ? "-" : h.endpoint(), health, count});
  }
  PrintTable(out, rows);
}

int ShowHosts(Client& c, const std::string& format, std::ostream& out, std::ostream& err) {
  pb::ListServicesResponse resp;
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  grpc::Status s = c.stub().ListServices(&ctx, pb::ListServicesRequest(), &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  pb::ListServicesResponse only;
  *only.mutable_docker_hosts() = resp.docker_hosts();
  if (PrintStructured(only, format, out)) return 0;
  if (resp.docker_hosts().empty()) {
    out << "no Docker hosts: kilnd runs without --docker-host\n";
    return 0;
  }
  PrintDockerHosts(resp, out);
  return 0;
}

int ShowStatus(Client& c, const std::string& service, const std::string& format, std::ostream& out,
               std::ostream& err) {
  if (service.empty()) {
    pb::ListServicesResponse resp;
    grpc::ClientContext ctx;
    c.Prepare(ctx);
    grpc::Status s = c.stub().ListServices(&ctx, pb::ListServicesRequest(), &resp);
    if (!s.ok()) return Fail(s, c.conn(), err);
    if (PrintStructured(resp, format, out)) return 0;
    Rows rows = {{"SERVICE", "VERSION", "REVISION", "AVAILABLE", "LIVE", "PINNED", "CONDITIONS"}};
    for (const auto& sv : resp.services()) {
      rows.push_back(
          {sv.name(), sv.version(), std::to_string(sv.target_revision()),
           std::to_string(sv.available()) + "/" + std::to_string(sv.replicas()),
           std::to_string(sv.live()),
           sv.pinned_revision() ? "pinned to " + std::to_string(sv.pinned_revision()) : "-",
           ConditionsLine(sv) + (sv.manifest_error().empty() ? "" : "; manifest error") +
               (sv.backoff().empty() ? "" : "; " + sv.backoff())});
    }
    PrintTable(out, rows);
    if (resp.has_git()) {
      out << "\n";
      PrintGitSource(resp.git(), out);
    }
    if (!resp.docker_hosts().empty()) {
      out << "\n";
      PrintDockerHosts(resp, out);
    }
    return 0;
  }
  pb::GetServiceRequest req;
  req.set_name(service);
  pb::GetServiceResponse resp;
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  grpc::Status s = c.stub().GetService(&ctx, req, &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  if (PrintStructured(resp, format, out)) return 0;
  const pb::Service& sv = resp.service();
  const pb::ServiceSummary& sum = sv.summary();
  out << "Service:    " << sum.name() << (sum.retired() ? " (retired)" : "")
      << (sum.paused() ? " (paused)" : "") << "\n";
  out << "Version:    " << sum.version() << " (revision " << sum.target_revision() << ")\n";
  out << "Manifest:   revision " << sum.desired_revision() << " from " << sv.manifest_file()
      << "\n";
  out << "Pinned:     "
      << (!sv.pin_status().empty() ? sv.pin_status()
          : sum.pinned_revision()
              ? "revision " + std::to_string(sum.pinned_revision()) + " — " + sv.pin_reason()
              : "no")
      << "\n";
  if (resp.has_git()) PrintGitSource(resp.git(), out);
  out << "Instances:  " << sum.available() << " available of " << sum.replicas() << " wanted, "
      << sum.live() << " live\n";
  out << "Strategy:   " << StrategyLabel(sv.update().strategy()) << "\n";
  if (sum.has_expose()) {
    out << "Address:    " << sum.expose().host() << ":" << sum.expose().port() << " (drain "
        << FormatDuration(Duration(sum.expose().drain_ms())) << ")";
    if (sv.proxy_routes().empty()) out << "; no proxy reporting";
    for (const auto& route : sv.proxy_routes()) {
      int ready = 0;
      int64_t open = 0;
      for (const auto& e : route.endpoints()) {
        ready += e.state() == pb::PROXY_ENDPOINT_STATE_ACTIVE;
        open += e.open_connections();
      }
      out << "; " << route.proxy() << ": "
          << (route.bind_error().empty() ? std::to_string(ready) + " in pool, " +
                                               std::to_string(open) + " open connections"
                                         : "cannot listen: " + route.bind_error());
    }
    out << "\n";
  }
  if (sv.has_rollout()) {
    const auto& r = sv.rollout();
    out << "Rollout:    " << r.from_revision() << " -> " << r.to_revision() << " "
        << RolloutStateName(r.state()) << (r.reason().empty() ? "" : ": " + r.reason())
        << " (started " << Age(r.started_unix_ms()) << " ago)\n";
  }
  if (!sum.manifest_error().empty()) out << "Manifest error: " << sum.manifest_error() << "\n";
  if (!sum.backoff().empty()) out << "Held back:  " << sum.backoff() << "\n";
  out << "\nConditions:\n";
  Rows cond = {{"  TYPE", "STATUS", "REASON", "MESSAGE"}};
  for (const auto& cd : sum.conditions()) {
    cond.push_back({"  " + cd.type(), cd.status() ? "True" : "False", cd.reason(), cd.message()});
  }
  PrintTable(out, cond);
  out << "\nInstances:\n";
  Rows inst = {
      {"  ID", "REVISION", "STATE", "AVAILABLE", "PORT", "PID", "AGE", "REASON", "LAST PROBE"}};
  for (const auto& i : sv.instances()) {
    inst.push_back(InstanceRow(i, "  "));
    inst.back().push_back(ProbeCell(i));
  }
  PrintTable(out, inst);
  return 0;
}

int Instances(Client& c, const std::string& service, bool all, const std::string& format,
              std::ostream& out, std::ostream& err) {
  pb::ListInstancesRequest req;
  req.set_service(service);
  req.set_include_finished(all);
  return Query(
      c, &pb::Kiln::Stub::ListInstances, req, format, out, err,
      [](const pb::ListInstancesResponse& r) {
        Rows rows = {{"ID", "REVISION", "STATE", "AVAILABLE", "PORT", "PID", "AGE", "REASON"}};
        for (const auto& i : r.instances()) rows.push_back(InstanceRow(i));
        return rows;
      });
}

int Endpoints(Client& c, const std::string& service, const std::string& format, std::ostream& out,
              std::ostream& err) {
  pb::GetEndpointsRequest req;
  req.set_service(service);
  return Query(c, &pb::Kiln::Stub::GetEndpoints, req, format, out, err,
               [](const pb::GetEndpointsResponse& r) {
                 Rows rows = {{"SERVICE", "INSTANCE", "ADDRESS", "STATE", "REVISION", "VERSION"}};
                 for (const auto& s : r.services()) {
                   for (const auto& e : s.endpoints()) {
                     rows.push_back(
                         {s.service(), e.instance(), e.host() + ":" + std::to_string(e.port()),
                          EndpointStateName(e.state()), std::to_string(e.revision()), e.version()});
                   }
                 }
                 return rows;
               });
}

// The history's COMMIT cell: the commit that last changed the revision's manifest file (short
// id), "+dirty" when the file had uncommitted changes, "-" outside git.
std::string CommitCell(const pb::Revision& r) {
  std::string cell = r.has_commit() ? r.commit().id().substr(0, 12) : "";
  if (r.manifest_dirty()) cell += cell.empty() ? "dirty" : "+dirty";
  return cell.empty() ? "-" : cell;
}

// What the history says of that commit after the file: ` "subject" (author, time)`.
std::string CommitDetail(const pb::Revision& r) {
  if (!r.has_commit()) return "";
  return " \"" + r.commit().subject() + "\" (" + r.commit().author() + ", " +
         Time(r.commit().time_unix_ms()) + ")";
}

int History(Client& c, const std::string& service, const std::string& format, std::ostream& out,
            std::ostream& err) {
  pb::GetHistoryRequest req;
  req.set_service(service);
  return Query(c, &pb::Kiln::Stub::GetHistory, req, format, out, err,
               [](const pb::GetHistoryResponse& resp) {
                 Rows rows = {{"REVISION", "VERSION", "TEMPLATE", "SOURCE", "COMMIT", "CREATED",
                               "AVAILABLE", "DETAIL"}};
                 for (const auto& r : resp.revisions()) {
                   std::string detail =
                       r.source() == "rollback"
                           ? "template of " + std::to_string(r.rolled_back_from()) + " by " +
                                 r.actor() + (r.reason().empty() ? "" : ": " + r.reason())
                           : r.manifest_file() + CommitDetail(r);
                   rows.push_back({std::to_string(r.number()), r.template_().version(),
                                   r.template_hash().substr(0, 12), r.source(), CommitCell(r),
                                   Time(r.created_unix_ms()), Time(r.available_unix_ms()), detail});
                 }
                 return rows;
               });
}

int Plan(Client& c, const std::string& service, const std::string& format, std::ostream& out,
         std::ostream& err) {
  pb::PlanRequest req;
  req.set_service(service);
  return Query(c, &pb::Kiln::Stub::Plan, req, format, out, err, [](const pb::PlanResponse& resp) {
    Rows rows = {{"SERVICE", "ACTION", "REVISION", "COUNT", "INSTANCES", "WHY"}};
    for (const auto& st : resp.steps()) {
      std::string instances;
      for (const auto& i : st.instances()) instances += (instances.empty() ? "" : ",") + i;
      rows.push_back(
          {st.service(), st.action(), st.revision() ? std::to_string(st.revision()) : "-",
           std::to_string(st.count()), instances.empty() ? "-" : instances, st.reason()});
    }
    return rows;
  });
}

// One mutating call: prints `done(response)` (or the response as JSON/YAML) on success.
template <typename Req, typename Resp, typename DoneFn>
int Mutate(Client& c, grpc::Status (pb::Kiln::Stub::*rpc)(grpc::ClientContext*, const Req&, Resp*),
           const Req& req, const std::string& format, std::ostream& out, std::ostream& err,
           DoneFn done) {
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  Resp resp;
  grpc::Status s = (c.stub().*rpc)(&ctx, req, &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  const std::string line = done(resp);  // also when not printed: it may note what it needs
  if (!PrintStructured(resp, format, out)) out << line << "\n";
  return 0;
}

// Every `--wait`: the same wait as `kilnctl rollout status`, with its exit codes.
int Wait(Client& c, const std::string& service, int64_t revision, Duration timeout,
         std::ostream& out, std::ostream& err) {
  RolloutWaitOptions o;
  o.service = service;
  o.revision = revision;
  o.timeout = timeout;
  o.addr = c.conn().addr;
  o.call_timeout = std::chrono::seconds(c.conn().timeout_s);
  const std::string token = c.conn().token;
  return WaitForRollout(
      c.stub(),
      [&token](grpc::ClientContext& ctx, Duration deadline) {
        ctx.set_deadline(std::chrono::system_clock::now() + deadline);
        if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
      },
      o, out, err);
}

std::string EventLine(const std::string& seq, const std::string& time, const std::string& service,
                      const std::string& kind, const std::string& instance,
                      const std::string& actor, const std::string& message) {
  auto pad = [](const std::string& v, size_t w) {
    return v.size() >= w ? v + " " : v + std::string(w - v.size(), ' ');
  };
  return pad(seq, 7) + pad(time, 21) + pad(service, 14) + pad(kind, 24) + pad(instance, 14) +
         pad(actor, 10) + message + "\n";
}

int Events(Client& c, int64_t since, const std::string& service, bool follow,
           const std::string& format, std::ostream& out, std::ostream& err) {
  pb::WatchEventsRequest req;
  req.set_after_seq(since);
  req.set_service(service);
  req.set_follow(follow);
  grpc::ClientContext ctx;
  c.Prepare(ctx, /*stream=*/true);
  auto reader = c.stub().WatchEvents(&ctx, req);
  pb::Event e;
  bool header = false;
  while (reader->Read(&e)) {
    if (format == "json") {
      std::string j = ToJson(e);
      j.erase(std::remove(j.begin(), j.end(), '\n'), j.end());
      out << j << std::endl;
      continue;
    }
    if (format == "yaml") {
      PrintStructured(e, "yaml", out);
      out << "---" << std::endl;
      continue;
    }
    if (!header) {
      out << EventLine("SEQ", "TIME", "SERVICE", "KIND", "INSTANCE", "ACTOR", "MESSAGE");
      header = true;
    }
    // Fixed columns: a stream cannot know its widest cell in advance.
    // A repeated event: "(×47 in 2m)".
    const std::string repeats = e.count() > 1
                                    ? " (\u00d7" + std::to_string(e.count()) + " in " +
                                          Age(e.first_time_unix_ms(), e.time_unix_ms()) + ")"
                                    : "";
    out << EventLine(std::to_string(e.seq()), Time(e.time_unix_ms()), e.service(), e.kind(),
                     e.instance().empty() ? "-" : e.instance(), e.actor(), e.message() + repeats)
        << std::flush;
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return Fail(s, c.conn(), err);
  return 0;
}

// HOST:PORT of a service's stable address ("[::1]:8080" for IPv6), or "" without `expose:`.
std::string ExposeAddress(const std::optional<ExposeSpec>& expose) {
  if (!expose) return "";
  const std::string& host = expose->listen_host;
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(expose->port);
}

int Validate(const std::string& dir, const std::string& output, std::ostream& out,
             std::ostream& err) {
  ManifestSet set = LoadManifestDir(dir);
  std::vector<ManifestError> errors = set.AllErrors();
  if (output == "json") {
    nlohmann::json j = {
        {"dir", dir}, {"services", nlohmann::json::array()}, {"errors", nlohmann::json::array()}};
    for (const ServiceSpec* s : set.Services()) {
      j["services"].push_back({{"name", s->name},
                               {"version", s->tmpl.version},
                               {"replicas", s->replicas},
                               {"strategy", StrategyName(s->update.strategy)},
                               {"template_hash", s->tmpl.Hash()},
                               {"address", ExposeAddress(s->expose)},
                               {"file", s->file},
                               {"line", s->line}});
    }
    for (const ManifestError& e : errors) {
      j["errors"].push_back({{"file", e.file},
                             {"line", e.line},
                             {"column", e.column},
                             {"key", e.key_path},
                             {"message", e.message},
                             {"error", e.ToString()}});
    }
    // Names and messages come from files on disk: a byte that is not UTF-8 must not abort the
    // dump (nlohmann::json throws by default); it becomes U+FFFD.
    out << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return errors.empty() ? 0 : 1;
  }

  std::vector<std::vector<std::string>> rows = {
      {"SERVICE", "VERSION", "REPLICAS", "STRATEGY", "ADDRESS", "TEMPLATE HASH", "FILE"}};
  for (const ServiceSpec* s : set.Services()) {
    const std::string address = ExposeAddress(s->expose);
    rows.push_back({s->name, s->tmpl.version, std::to_string(s->replicas),
                    std::string(StrategyName(s->update.strategy)), address.empty() ? "-" : address,
                    s->tmpl.Hash(), s->file + ":" + std::to_string(s->line)});
  }
  if (rows.size() > 1) PrintTable(out, rows);
  for (const ManifestError& e : errors) err << e.ToString() << "\n";
  if (!errors.empty()) {
    size_t bad_files = set.dir_errors.empty() ? 0 : 1;
    for (const ManifestFile& f : set.files) bad_files += f.ok() ? 0 : 1;
    err << "kilnctl: " << errors.size() << (errors.size() == 1 ? " error" : " errors") << " in "
        << bad_files << (bad_files == 1 ? " place" : " places") << "; manifests in " << dir
        << " are not valid\n";
    return 1;
  }
  if (rows.size() == 1) out << "no services in " << dir << "\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------
// diff and plan -f

// A field's value as the table shows it: "(unset)" where the field is not there.
std::string Side(const pb::FieldChange& c, bool old_side) {
  if (old_side ? c.added() : c.removed()) return "(unset)";
  return old_side ? c.old_value() : c.new_value();
}

std::string ChangeLine(const pb::FieldChange& c) {
  return c.path() + ": " + Side(c, true) + " \u2192 " + Side(c, false);
}

std::string RevisionLabel(const pb::Revision& r) {
  return "revision " + std::to_string(r.number()) + " (" + r.template_().version() + ")";
}

// `kilnctl diff SERVICE [FROM [TO]]`: the template fields that differ between two revisions.
int Diff(Client& c, const std::string& service, int64_t from, int64_t to, const std::string& format,
         std::ostream& out, std::ostream& err) {
  pb::DiffRevisionsRequest req;
  req.set_service(service);
  req.set_from_revision(from);
  req.set_to_revision(to);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  pb::DiffRevisionsResponse resp;
  grpc::Status s = c.stub().DiffRevisions(&ctx, req, &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  if (PrintStructured(resp, format, out)) return 0;
  out << service << ": " << RevisionLabel(resp.from()) << " \u2192 " << RevisionLabel(resp.to())
      << "\n";
  if (resp.changes().empty()) {
    out << "the templates are equal (" << resp.to().template_hash().substr(0, 12) << ")\n";
    return 0;
  }
  Rows rows = {{"FIELD", "REVISION " + std::to_string(resp.from().number()),
                "REVISION " + std::to_string(resp.to().number())}};
  for (const auto& ch : resp.changes())
    rows.push_back({ch.path(), Side(ch, true), Side(ch, false)});
  PrintTable(out, rows);
  return 0;
}

// The manifest files `plan -f` sends: one file, or every manifest file directly in a directory
// (the names kilnd itself would read). Paths are absolute, so kilnd finds relative artifacts.
Status ReadPlanFiles(const std::string& path, pb::PlanManifestsRequest* req) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path root = fs::absolute(path, ec).lexically_normal();
  if (ec || !fs::exists(root, ec)) return NotFoundError(path + ": no such file or directory");
  std::vector<fs::path> files;
  if (fs::is_directory(root, ec)) {
    req->set_whole_directory(true);
    for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
      if (IsManifestFileName(it->path().filename().string())) files.push_back(it->path());
    }
    if (ec) return InvalidArgumentError("cannot read " + path + ": " + ec.message());
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(root);
  }
  for (const fs::path& f : files) {
    // One byte over the limit, so kilnd reports the file as too large like any other error.
    ASSIGN_OR_RETURN(std::string text,
                     ReadRegularFile(f, kMaxManifestFileBytes + 1, "cannot read"));
    pb::ManifestFileText* t = req->add_files();
    t->set_path(f.string());
    t->set_content(std::move(text));
  }
  return Status::Ok();
}

std::string ChangeLabel(pb::PlanChange c) { return Label(pb::PlanChange_Name(c), "PLAN_CHANGE_"); }

std::string StepLine(const pb::PlanStep& st) {
  std::string line = st.action();
  if (st.action() == "write_revision") line = "write revision " + std::to_string(st.revision());
  if (st.action() == "create") {
    line = "create " + std::to_string(st.count()) + " of revision " + std::to_string(st.revision());
  }
  if (st.action() == "destroy") {
    line = "destroy " + std::to_string(st.count()) + ":";
    for (const auto& i : st.instances()) line += " " + i;
  }
  return st.reason().empty() ? line : line + " (" + st.reason() + ")";
}

void PrintServicePlan(const pb::ServicePlan& p, std::ostream& out) {
  const std::string current =
      "revision " + std::to_string(p.current_revision()) + " (" + p.current_version() + ")";
  out << p.service() << ": ";
  switch (p.change()) {
    case pb::PLAN_CHANGE_NONE:
      out << "no change, " << current;
      break;
    case pb::PLAN_CHANGE_CREATE:
      out << "new service, revision " << p.new_revision() << " (" << p.new_version() << "), "
          << p.new_replicas() << " replicas";
      break;
    case pb::PLAN_CHANGE_UPDATE:
      out << "new template: " << current << " \u2192 revision " << p.new_revision() << " ("
          << p.new_version() << ")";
      break;
    case pb::PLAN_CHANGE_CONFIG:
      out << "settings change, " << current << " stays";
      break;
    case pb::PLAN_CHANGE_RETIRE:
      out << "retire, " << current << ", " << p.current_replicas() << " replicas";
      break;
    default:
      out << ChangeLabel(p.change());
  }
  if (p.current_replicas() != p.new_replicas() && p.change() != pb::PLAN_CHANGE_CREATE &&
      p.change() != pb::PLAN_CHANGE_RETIRE) {
    out << "; scale " << p.current_replicas() << " \u2192 " << p.new_replicas();
  }
  out << (p.file().empty() ? "" : " [" + p.file() + "]") << "\n";
  if (!p.note().empty()) out << "  note: " << p.note() << "\n";
  for (const auto& ch : p.changes()) out << "  " << ChangeLine(ch) << "\n";
  if (p.change() != pb::PLAN_CHANGE_NONE) {
    for (const auto& st : p.steps()) out << "  next step: " << StepLine(st) << "\n";
  }
}

// `kilnctl plan -f FILE_OR_DIR`: what kilnd would do with these manifests, applying nothing.
// Exit codes as `terraform plan -detailed-exitcode`: 0 no change, 1 error, 2 changes.
int PlanFiles(Client& c, const std::string& path, const std::string& format, std::ostream& out,
              std::ostream& err) {
  pb::PlanManifestsRequest req;
  if (Status read_files = ReadPlanFiles(path, &req); !read_files.ok()) {
    err << "kilnctl: " << read_files.message() << "\n";
    return 1;
  }
  if (req.files().empty()) {
    err << "kilnctl: no manifest files (*.yaml, *.yml) in " << path << "\n";
    return 1;
  }
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  pb::PlanManifestsResponse resp;
  grpc::Status s = c.stub().PlanManifests(&ctx, req, &resp);
  if (!s.ok()) return Fail(s, c.conn(), err);
  const int rc = !resp.errors().empty() ? 1 : resp.changes() ? 2 : 0;
  if (PrintStructured(resp, format, out)) return rc;
  std::map<pb::PlanChange, int> counts;
  for (const auto& p : resp.services()) {
    PrintServicePlan(p, out);
    ++counts[p.change()];
  }
  for (const auto& e : resp.errors()) err << e.error() << "\n";
  out << "Plan: " << counts[pb::PLAN_CHANGE_CREATE] << " to create, "
      << counts[pb::PLAN_CHANGE_UPDATE] << " to update, " << counts[pb::PLAN_CHANGE_CONFIG]
      << " to reconfigure, " << counts[pb::PLAN_CHANGE_RETIRE] << " to retire, "
      << counts[pb::PLAN_CHANGE_NONE] << " unchanged.\n";
  if (!resp.errors().empty()) {
    err << "kilnctl: " << resp.errors().size() << (resp.errors().size() == 1 ? " error" : " errors")
        << "; kilnd would keep the last good state of the services those files declare\n";
  }
  return rc;
}

// kilnctl sync: the git source is fetched now. With `wait`, until that fetch (and the load of
// what it checked out) is done: exit 0 when the branch's commit loaded, 1 when the fetch failed
// or the commit has manifest errors (the last good state keeps running), with why on stderr.
int SyncGit(Client& c, bool wait, Duration wait_timeout, const std::string& format,
            std::ostream& out, std::ostream& err) {
  pb::SyncResponse asked;
  {
    grpc::ClientContext ctx;
    c.Prepare(ctx);
    grpc::Status s = c.stub().Sync(&ctx, pb::SyncRequest(), &asked);
    if (!s.ok()) return Fail(s, c.conn(), err);
  }
  if (!wait) {
    if (!PrintStructured(asked, format, out)) out << "fetch " << asked.fetch() << " asked for\n";
    return 0;
  }
  const auto deadline = std::chrono::steady_clock::now() + wait_timeout;
  for (;;) {
    pb::ListServicesResponse resp;
    grpc::ClientContext ctx;
    c.Prepare(ctx);
    grpc::Status s = c.stub().ListServices(&ctx, pb::ListServicesRequest(), &resp);
    if (!s.ok()) return Fail(s, c.conn(), err);
    const pb::GitSourceStatus& g = resp.git();
    if (g.fetches_done() >= asked.fetch()) {
      if (!PrintStructured(g, format, out)) PrintGitSource(g, out);
      if (!g.fetch_error().empty()) {
        err << "kilnctl: " << g.fetch_error() << "; the last good state runs\n";
        return 1;
      }
      if (!g.manifest_error().empty()) {
        err << "kilnctl: the branch's commit has manifest errors; the last good state runs: "
            << g.manifest_error() << "\n";
        return 1;
      }
      return 0;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      err << "kilnctl: the fetch did not finish within " << FormatDuration(wait_timeout) << "\n";
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

int RunKilnctl(int argc, char** argv, std::ostream& out, std::ostream& err) {
  CLI::App app("kilnctl: the command-line client of kilnd", "kilnctl");
  app.set_version_flag("--version", std::string("kilnctl ") + kVersion);
  app.require_subcommand(1);
  app.fallthrough();  // global flags may come after the command too: `kilnctl status -o json`
  std::string output = "table";
  Connection conn;
  const char* env_addr = std::getenv("KILN_ADDR");
  const char* env_token = std::getenv("KILN_TOKEN");
  conn.addr = env_addr ? env_addr : "unix:.kiln-state/kiln.sock";
  conn.token = env_token ? env_token : "";
  app.add_option("-o,--output", output, "output format: table, json or yaml")
      ->check(CLI::IsMember({"table", "json", "yaml"}));
  app.add_option("--addr", conn.addr, "kilnd's API: unix:PATH or HOST:PORT (env KILN_ADDR)");
  app.add_option("--token", conn.token, "API token (env KILN_TOKEN)");
  app.add_option("--tls-ca", conn.ca, "PEM CA that signed kilnd's certificate (enables TLS)");
  app.add_option("--tls-cert", conn.cert, "PEM client certificate (mutual TLS)");
  app.add_option("--tls-key", conn.key, "PEM client key (mutual TLS)");
  app.add_option("--timeout", conn.timeout_s, "seconds to wait for kilnd")
      ->check(CLI::Range(1, 3600));

  std::string service, instance, reason, validate_dir;
  int64_t to_revision = 0, since = 0;
  bool wait = false, follow = false, all = false;
  auto* status = app.add_subcommand("status", "services, or one service in detail");
  status->add_option("SERVICE", service, "a service");
  auto* hosts = app.add_subcommand(
      "hosts", "the Docker hosts (--docker-host), their health and the instances on each");
  auto* instances = app.add_subcommand("instances", "instances of a service");
  instances->add_option("SERVICE", service)->required();
  instances->add_flag("-a,--all", all, "also terminated, failed and lost ones");
  auto* endpoints = app.add_subcommand(
      "endpoints", "where each running instance is reached, and whether it takes connections");
  endpoints->add_option("SERVICE", service, "a service (default: every service)");
  auto* history = app.add_subcommand("history", "revisions of a service, newest first");
  history->add_option("SERVICE", service)->required();
  auto* plan = app.add_subcommand(
      "plan",
      "what the next passes would do; with -f, what applying manifests would do (exit 0: no "
      "change, 1: error, 2: changes)");
  plan->add_option("SERVICE", service);
  std::string plan_files;
  plan->add_option("-f,--filename", plan_files,
                   "a manifest file, or a directory (then a service no file declares would be "
                   "retired); nothing is applied");
  auto* diff = app.add_subcommand(
      "diff",
      "template fields that differ between two revisions (default: the running one "
      "and the one before it)");
  int64_t diff_from = 0, diff_to = 0;
  diff->add_option("SERVICE", service)->required();
  diff->add_option("REV_A", diff_from, "the older revision (default: the one before REV_B)")
      ->check(CLI::PositiveNumber);
  diff->add_option("REV_B", diff_to, "the newer revision (default: the running one)")
      ->check(CLI::PositiveNumber);
  auto* rollback =
      app.add_subcommand("rollback", "roll a service back to an earlier template and pin it");
  rollback->add_option("SERVICE", service)->required();
  rollback->add_option("--to-revision", to_revision,
                       "revision whose template to run (default: the last fully available one)");
  rollback->add_option("--reason", reason, "why, recorded in the history");
  rollback->add_flag("--wait", wait, "follow the rollout until it completes or fails");
  auto* unpin = app.add_subcommand("unpin", "follow the manifest again");
  unpin->add_option("SERVICE", service)->required();
  auto* pause = app.add_subcommand("pause", "hold the rollout where it is");
  pause->add_option("SERVICE", service)->required();
  pause->add_option("--reason", reason);
  auto* resume = app.add_subcommand("resume", "continue a paused rollout");
  resume->add_option("SERVICE", service)->required();
  resume->add_flag("--wait", wait, "follow the rollout until it completes or fails");
  auto* promote = app.add_subcommand("promote", "let a canary rollout continue");
  promote->add_option("SERVICE", service)->required();
  promote->add_flag("--wait", wait, "follow the rollout until it completes or fails");
  auto* replace =
      app.add_subcommand("replace", "replace one instance by a new one of the same revision");
  replace->add_option("INSTANCE", instance)->required();
  replace->add_option("--reason", reason);
  auto* events = app.add_subcommand("events", "the event log");
  events->add_flag("-f,--follow", follow, "keep streaming new events");
  events->add_option("--since", since, "events after this sequence number");
  events->add_option("--service", service, "only this service's events");
  auto* validate = app.add_subcommand(
      "validate",
      "check a manifest directory without a daemon: every service with its template "
      "hash, or every error; exits 1 on any error");
  validate->add_option("DIR", validate_dir, "manifest directory")->required();
  auto* rollout = app.add_subcommand("rollout", "follow rollouts");
  rollout->require_subcommand(1);
  auto* rollout_status = rollout->add_subcommand(
      "status",
      "wait for the rollout to the current (or given) revision to finish; exit 0 when it "
      "completed, 3 when it failed, 4 when kilnd moved to another revision first, 5 on timeout");
  std::string rollout_timeout = "0s";
  auto* logs = app.add_subcommand(
      "logs", "an instance's output, or a service's instances' (prefixed by instance)");
  LogsOptions logs_options;
  std::string logs_since;
  logs->add_option("NAME", logs_options.name, "an instance id (web-42) or a service")->required();
  logs->add_flag("-f,--follow", logs_options.follow,
                 "keep streaming new lines (and, for a service, new instances) until stopped");
  logs->add_option("--tail", logs_options.tail, "only the last N lines of each instance")
      ->check(CLI::NonNegativeNumber);
  logs->add_option("--since", logs_since,
                   "only instances running within this long (\"10m\"), and the log files "
                   "written within it");
  logs->add_option("--revision", logs_options.revision, "only instances of this revision");
  rollout_status->add_option("SERVICE", service)->required();
  rollout_status->add_option("--revision", to_revision,
                             "the revision whose rollout to follow (default: the service's "
                             "target once kilnd has loaded its manifest file)");
  rollout_status->add_option("--timeout", rollout_timeout,
                             "give up after this long (\"2m\", \"90s\"; default: no limit)");
  auto* sync = app.add_subcommand(
      "sync",
      "with kilnd --manifests git+...: fetch the branch now and wait until its commit is loaded; "
      "exits 1 when the fetch fails or the commit has manifest errors");
  bool no_wait = false;
  std::string sync_timeout = "60s";
  sync->add_flag("--no-wait", no_wait, "return once the fetch is asked for");
  sync->add_option("--wait-timeout", sync_timeout, "give up waiting after this long");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    out << app.help();
    return 0;
  } catch (const CLI::CallForVersion&) {
    out << "kilnctl " << kVersion << "\n";
    return 0;
  } catch (const CLI::ParseError& e) {
    err << "kilnctl: " << e.what() << "\n\n" << app.help();
    return 2;
  }
  if (validate->parsed()) return Validate(validate_dir, output, out, err);

  Client client(conn);
  if (status->parsed()) return ShowStatus(client, service, output, out, err);
  if (hosts->parsed()) return ShowHosts(client, output, out, err);
  if (instances->parsed()) return Instances(client, service, all, output, out, err);
  if (endpoints->parsed()) return Endpoints(client, service, output, out, err);
  if (history->parsed()) return History(client, service, output, out, err);
  if (plan->parsed() && !plan_files.empty()) {
    if (!service.empty()) {
      err << "kilnctl: plan takes a SERVICE or -f FILE_OR_DIR, not both\n";
      return 1;
    }
    return PlanFiles(client, plan_files, output, out, err);
  }
  if (plan->parsed()) return Plan(client, service, output, out, err);
  if (diff->parsed()) return Diff(client, service, diff_from, diff_to, output, out, err);
  if (events->parsed()) return Events(client, since, service, follow, output, out, err);
  if (logs->parsed()) {
    if (!logs_since.empty()) {
      StatusOr<Duration> since = ParseDuration(logs_since);
      if (!since.ok()) {
        err << "kilnctl: --since " << logs_since << ": " << since.status().message() << "\n";
        return 2;
      }
      logs_options.since = *since;
    }
    logs_options.addr = conn.addr;
    return ShowLogs(
        client.stub(), [&](grpc::ClientContext& ctx) { client.Prepare(ctx, /*stream=*/true); },
        logs_options, out, err);
  }
  if (rollout_status->parsed()) {
    StatusOr<Duration> limit = ParseDuration(rollout_timeout);
    if (!limit.ok()) {
      err << "kilnctl: --timeout " << rollout_timeout << ": " << limit.status().message() << "\n";
      return 2;
    }
    return Wait(client, service, to_revision, *limit, out, err);
  }
  if (sync->parsed()) {
    StatusOr<Duration> d = ParseDuration(sync_timeout);
    if (!d.ok()) {
      err << "kilnctl: --wait-timeout: " << d.status().message() << "\n";
      return 2;
    }
    return SyncGit(client, !no_wait, *d, output, out, err);
  }
  int rc;
  int64_t wait_revision = 0;  // the revision a rollback wrote; 0: the service's target
  if (rollback->parsed()) {
    pb::RollbackRequest req;
    req.set_service(service);
    req.set_to_revision(to_revision);
    req.set_reason(reason);
    rc = Mutate(client, &pb::Kiln::Stub::Rollback, req, output, out, err,
                [&](const pb::RollbackResponse& r) {
                  wait_revision = r.revision().number();
                  return service + " rolled back: revision " +
                         std::to_string(r.revision().number()) + " runs the template of revision " +
                         std::to_string(r.revision().rolled_back_from()) + " (version " +
                         r.revision().template_().version() +
                         "); pinned until the manifest "
                         "declares a new template or `kilnctl unpin " +
                         service + "`";
                });
  } else if (unpin->parsed()) {
    pb::UnpinRequest req;
    req.set_service(service);
    rc = Mutate(client, &pb::Kiln::Stub::Unpin, req, output, out, err,
                [&](const pb::UnpinResponse& r) {
                  return service + " unpinned; it follows its manifest again" +
                         (r.target_revision() > 0
                              ? " (revision " + std::to_string(r.target_revision()) + ")"
                              : std::string());
                });
  } else if (pause->parsed()) {
    pb::PauseRequest req;
    req.set_service(service);
    req.set_reason(reason);
    rc = Mutate(client, &pb::Kiln::Stub::Pause, req, output, out, err,
                [&](auto&) { return service + " paused"; });
  } else if (resume->parsed()) {
    pb::ResumeRequest req;
    req.set_service(service);
    rc = Mutate(client, &pb::Kiln::Stub::Resume, req, output, out, err,
                [&](auto&) { return service + " resumed"; });
  } else if (promote->parsed()) {
    pb::PromoteRequest req;
    req.set_service(service);
    rc = Mutate(client, &pb::Kiln::Stub::Promote, req, output, out, err,
                [&](auto&) { return service + " promoted: the rollout continues"; });
  } else if (replace->parsed()) {
    pb::ReplaceInstanceRequest req;
    req.set_instance(instance);
    req.set_reason(reason);
    rc = Mutate(client, &pb::Kiln::Stub::ReplaceInstance, req, output, out, err, [&](auto&) {
      return instance + " will be replaced by a new instance of the same revision";
    });
  } else {
    err << app.help();
    return 2;
  }
  if (rc == 0 && wait) return Wait(client, service, wait_revision, Duration(0), out, err);
  return rc;
}

}  // namespace kiln
