// The gRPC API and kilnctl against a real kilnd: every RPC over the unix socket and TCP, the
// auth matrix, TLS and mutual TLS, bad inputs, the event stream, and a rollback end to end.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "kiln/v1/kiln.grpc.pb.h"
#include "tests/integration/kilnd_harness.h"

namespace kiln::testing {
namespace {

namespace pb = ::kiln::v1;
using namespace std::chrono_literals;

const char* kPolicy = "{strategy: rolling, max_surge: 1, max_unavailable: 0}";

std::unique_ptr<pb::Kiln::Stub> Stub(
    const std::string& addr,
    const std::shared_ptr<grpc::ChannelCredentials>& creds = grpc::InsecureChannelCredentials()) {
  return pb::Kiln::NewStub(grpc::CreateChannel(addr, creds));
}

struct Ctx {
  explicit Ctx(const std::string& token = "") {
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  }
  grpc::ClientContext ctx;
};

// A kilnd with service "web" converged at version 1.0 (2 instances).
struct ApiFixture {
  explicit ApiFixture(const std::vector<std::string>& extra = {}) {
    h.Declare("web", "1.0", 2, kPolicy);
    h.Start(extra);
    REQUIRE(h.WaitReady());
    REQUIRE(WaitFor(
        [&] { return h.Healthy("web") == 2 && h.HasEvent("web", EventKind::kRolloutCompleted); }));
  }
  KilndHarness h;
};

// Every RPC through one transport.
void ExerciseEveryRpc(const std::string& addr, const std::string& token = "") {
  INFO(addr);
  auto stub = Stub(addr);
  {
    Ctx c(token);
    pb::ListServicesResponse r;
    REQUIRE(stub->ListServices(&c.ctx, {}, &r).ok());
    REQUIRE(r.services_size() == 1);
    CHECK(r.services(0).name() == "web");
    CHECK(r.services(0).version() == "1.0");
    CHECK(r.services(0).available() == 2);
    CHECK(r.services(0).replicas() == 2);
  }
  {
    Ctx c(token);
    pb::GetServiceRequest q;
    q.set_name("web");
    pb::GetServiceResponse r;
    REQUIRE(stub->GetService(&c.ctx, q, &r).ok());
    CHECK(r.service().instances_size() == 2);
    CHECK(r.service().update().strategy() == pb::STRATEGY_ROLLING);
    CHECK(r.service().rollout().state() == pb::ROLLOUT_STATE_COMPLETED);
    CHECK(r.service().summary().conditions_size() == 3);
    CHECK(r.service().instances(0).pid() > 0);
  }
  {
    Ctx c(token);
    pb::ListInstancesRequest q;
    q.set_service("web");
    pb::ListInstancesResponse r;
    REQUIRE(stub->ListInstances(&c.ctx, q, &r).ok());
    CHECK(r.instances_size() == 2);
    CHECK(r.instances(0).state() == pb::INSTANCE_STATE_HEALTHY);
  }
  {
    Ctx c(token);
    pb::GetHistoryRequest q;
    q.set_service("web");
    pb::GetHistoryResponse r;
    REQUIRE(stub->GetHistory(&c.ctx, q, &r).ok());
    REQUIRE(r.revisions_size() == 1);
    CHECK(r.revisions(0).template_().version() == "1.0");
    CHECK(r.revisions(0).available_unix_ms() > 0);
    CHECK(r.revisions(0).template_hash().size() == 64);
  }
  {
    Ctx c(token);
    pb::PlanResponse r;
    REQUIRE(stub->Plan(&c.ctx, {}, &r).ok());
    REQUIRE(r.steps_size() == 1);
    CHECK(r.steps(0).service() == "web");
    CHECK(r.steps(0).action() == "none");
    CHECK(r.steps(0).revision() == 1);
  }
  {
    Ctx c(token);
    pb::PauseRequest q;
    q.set_service("web");
    q.set_reason("looking");
    pb::PauseResponse r;
    REQUIRE(stub->Pause(&c.ctx, q, &r).ok());
  }
  {
    Ctx c(token);
    pb::ResumeRequest q;
    q.set_service("web");
    pb::ResumeResponse r;
    REQUIRE(stub->Resume(&c.ctx, q, &r).ok());
  }
  {
    Ctx c(token);
    pb::PromoteRequest q;
    q.set_service("web");
    pb::PromoteResponse r;
    grpc::Status s = stub->Promote(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::FAILED_PRECONDITION);
    CHECK(s.error_message() == "web has no canary waiting for promotion");
  }
  {
    Ctx c(token);
    pb::RollbackRequest q;
    q.set_service("web");
    pb::RollbackResponse r;
    grpc::Status s = stub->Rollback(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::FAILED_PRECONDITION);
    CHECK(s.error_message() == "no earlier revision of web was ever fully available");
  }
  {
    Ctx c(token);
    pb::UnpinRequest q;
    q.set_service("web");
    pb::UnpinResponse r;
    CHECK(stub->Unpin(&c.ctx, q, &r).error_code() == grpc::FAILED_PRECONDITION);
  }
  {
    Ctx c(token);
    pb::WatchEventsRequest q;
    auto reader = stub->WatchEvents(&c.ctx, q);
    pb::Event e;
    std::vector<std::string> kinds;
    while (reader->Read(&e)) kinds.push_back(e.kind());
    REQUIRE(reader->Finish().ok());
    CHECK(std::find(kinds.begin(), kinds.end(), "paused") != kinds.end());
    CHECK(std::find(kinds.begin(), kinds.end(), "resumed") != kinds.end());
  }
}

TEST_CASE("every RPC over the unix socket and over TCP", "[api]") {
  ApiFixture f({"--grpc-listen", "127.0.0.1:0"});
  ExerciseEveryRpc(f.h.UnixAddr());
  int port = f.h.TcpPort();
  REQUIRE(port > 0);
  ExerciseEveryRpc("127.0.0.1:" + std::to_string(port));
  // The socket is group-accessible, not world-accessible.
  struct stat st {};
  REQUIRE(::stat((f.h.state() / "kiln.sock").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0660);
  // A replacement asked over the API happens, and names its actor.
  auto stub = Stub(f.h.UnixAddr());
  auto victim = f.h.Live("web")[0].name;
  Ctx c;
  pb::ReplaceInstanceRequest q;
  q.set_instance(victim);
  q.set_reason("stuck");
  pb::ReplaceInstanceResponse r;
  REQUIRE(stub->ReplaceInstance(&c.ctx, q, &r).ok());
  CHECK(WaitFor([&] {
    auto live = f.h.Live("web");
    return f.h.Healthy("web") == 2 &&
           std::none_of(live.begin(), live.end(), [&](auto& i) { return i.name == victim; });
  }));
  bool recorded = false;
  for (const auto& e : f.h.Events("web"))
    recorded |= e.kind == EventKind::kReplaceRequested && e.actor == "local";
  CHECK(recorded);
}

TEST_CASE("standard gRPC health answers SERVING", "[api]") {
  ApiFixture f;
  auto channel = grpc::CreateChannel(f.h.UnixAddr(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 10s);
  grpc::ByteBuffer request;  // an empty HealthCheckRequest: the server as a whole
  grpc::Slice empty;
  request = grpc::ByteBuffer(&empty, 1);
  auto call = generic.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  REQUIRE(cq.Next(&tag, &ok));
  REQUIRE(status.ok());
  std::vector<grpc::Slice> slices;
  REQUIRE(response.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  CHECK(bytes == std::string("\x08\x01", 2));  // status: SERVING
}

TEST_CASE("bad requests get codes that say what to do", "[api]") {
  ApiFixture f;
  auto stub = Stub(f.h.UnixAddr());
  {
    Ctx c;
    pb::GetServiceResponse r;
    grpc::Status s = stub->GetService(&c.ctx, {}, &r);
    CHECK(s.error_code() == grpc::INVALID_ARGUMENT);
    CHECK(s.error_message() == "name is required");
  }
  {
    Ctx c;
    pb::GetServiceRequest q;
    q.set_name("nope");
    pb::GetServiceResponse r;
    grpc::Status s = stub->GetService(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::NOT_FOUND);
    CHECK(s.error_message() == "service \"nope\" is not known");
  }
  {
    Ctx c;
    pb::ReplaceInstanceRequest q;
    q.set_instance("web-999");
    pb::ReplaceInstanceResponse r;
    grpc::Status s = stub->ReplaceInstance(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::NOT_FOUND);
    CHECK(s.error_message() == "instance \"web-999\" is not known");
  }
  {
    Ctx c;
    pb::RollbackRequest q;
    q.set_service("web");
    q.set_to_revision(99);
    pb::RollbackResponse r;
    grpc::Status s = stub->Rollback(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::NOT_FOUND);
    CHECK(s.error_message() == "service \"web\" has no revision 99");
  }
  {
    Ctx c;
    pb::RollbackRequest q;
    q.set_service("web");
    q.set_to_revision(1);
    pb::RollbackResponse r;
    grpc::Status s = stub->Rollback(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::FAILED_PRECONDITION);
    CHECK(s.error_message() ==
          "revision 1 of web has the current template; nothing to roll back to");
  }
  {
    Ctx c;
    pb::ListInstancesRequest q;
    pb::ListInstancesResponse r;
    CHECK(stub->ListInstances(&c.ctx, q, &r).error_code() == grpc::INVALID_ARGUMENT);
  }
  {
    // A reason is stored and shown in every status of the service: it is bounded, and text.
    Ctx c;
    pb::RollbackRequest q;
    q.set_service("web");
    q.set_reason(std::string(3'900'000, 'x'));
    pb::RollbackResponse r;
    grpc::Status s = stub->Rollback(&c.ctx, q, &r);
    CHECK(s.error_code() == grpc::INVALID_ARGUMENT);
    CHECK(s.error_message() == "reason: 3900000 bytes; at most 1024");
  }
}

TEST_CASE("tokens: no token, wrong token, viewer and operator", "[api]") {
  TempDir tmp;
  WriteFile(tmp / "tokens",
            "# token role name\nviewer-token-0123456789 viewer vera\noperator-token-0123456789 "
            "operator olga\n");
  ApiFixture f({"--tokens", (tmp / "tokens").string()});
  auto stub = Stub(f.h.UnixAddr());
  auto list = [&](const std::string& token) {
    Ctx c(token);
    pb::ListServicesResponse r;
    return stub->ListServices(&c.ctx, {}, &r);
  };
  auto pause = [&](const std::string& token) {
    Ctx c(token);
    pb::PauseRequest q;
    q.set_service("web");
    pb::PauseResponse r;
    return stub->Pause(&c.ctx, q, &r);
  };
  CHECK(list("").error_code() == grpc::UNAUTHENTICATED);
  CHECK(list("").error_message() == "missing authorization: Bearer <token>");
  CHECK(list("wrong-token-0123456789").error_code() == grpc::UNAUTHENTICATED);
  CHECK(list("viewer-token-0123456789").ok());
  grpc::Status denied = pause("viewer-token-0123456789");
  CHECK(denied.error_code() == grpc::PERMISSION_DENIED);
  CHECK(denied.error_message() == "vera is a viewer; this call needs the operator role");
  CHECK(pause("operator-token-0123456789").ok());
  bool by_olga = false;
  for (const auto& e : f.h.Events("web"))
    by_olga |= e.kind == EventKind::kPaused && e.actor == "olga";
  CHECK(by_olga);
  // kilnctl takes the token from the environment or the flag.
  RunResult r = Run({BinPath("kilnctl"), "--addr", f.h.UnixAddr(), "--token",
                     "viewer-token-0123456789", "status"});
  CHECK(r.exit_code == 0);
  RunResult no = Run({BinPath("kilnctl"), "--addr", f.h.UnixAddr(), "resume", "web"});
  CHECK(no.exit_code == 1);
  CHECK(no.err == "kilnctl: UNAUTHENTICATED: missing authorization: Bearer <token>\n");
}

// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
struct Certs {
  Certs() {
    const std::string d = tmp.path().string();
    const std::string script =
        "cd " + d +
        " && "
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "
        "/CN=kiln-test-ca 2>/dev/null && "
        "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "
        "/CN=127.0.0.1 2>/dev/null && "
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext && "
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
        "-days 2 -extfile san.ext 2>/dev/null && "
        "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "
        "/CN=kiln-client 2>/dev/null && "
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem "
        "-days 2 2>/dev/null";
    ok = std::system(script.c_str()) == 0;
  }
  std::string operator/(const std::string& f) const { return (tmp.path() / f).string(); }
  TempDir tmp;
  bool ok = false;
};

TEST_CASE("TLS and mutual TLS on the TCP listener", "[api]") {
  Certs certs;
  REQUIRE(certs.ok);
  SECTION("TLS") {
    ApiFixture f({"--grpc-listen", "127.0.0.1:0", "--tls-cert", certs / "server.pem", "--tls-key",
                  certs / "server.key"});
    std::string addr = "127.0.0.1:" + std::to_string(f.h.TcpPort());
    RunResult ok =
        Run({BinPath("kilnctl"), "--addr", addr, "--tls-ca", certs / "ca.pem", "status"});
    CHECK(ok.exit_code == 0);
    CHECK(ok.out.find("web") != std::string::npos);
    RunResult plain = Run({BinPath("kilnctl"), "--addr", addr, "--timeout", "2", "status"});
    CHECK(plain.exit_code == 1);
    CHECK(plain.err.rfind("kilnctl: cannot reach kilnd at " + addr, 0) == 0);
  }
  SECTION("mutual TLS") {
    ApiFixture f({"--grpc-listen", "127.0.0.1:0", "--tls-cert", certs / "server.pem", "--tls-key",
                  certs / "server.key", "--client-ca", certs / "ca.pem"});
    std::string addr = "127.0.0.1:" + std::to_string(f.h.TcpPort());
    RunResult ok =
        Run({BinPath("kilnctl"), "--addr", addr, "--tls-ca", certs / "ca.pem", "--tls-cert",
             certs / "client.pem", "--tls-key", certs / "client.key", "status"});
    CHECK(ok.exit_code == 0);
    RunResult anonymous = Run({BinPath("kilnctl"), "--addr", addr, "--tls-ca", certs / "ca.pem",
                               "--timeout", "2", "status"});
    CHECK(anonymous.exit_code == 1);
  }
}

TEST_CASE("a TCP listener off loopback without TLS and tokens refuses to start", "[api]") {
  KilndHarness h;
  h.Declare("web", "1.0", 1, kPolicy);
  h.Start({"--grpc-listen", "0.0.0.0:0"});
  CHECK(h.kilnd().Wait(20s) == 1);
  CHECK(h.kilnd().Stderr().find("refusing to serve the API on 0.0.0.0:0 without TLS and tokens") !=
        std::string::npos);
}

TEST_CASE("WatchEvents resumes from a sequence number and says when it was pruned", "[api]") {
  ApiFixture f({"--event-retention", "5"});
  auto stub = Stub(f.h.UnixAddr());
  // Pruned down to 5: asking from the start of history is refused with the oldest seq.
  REQUIRE(WaitFor([&] { return f.h.Events("web").size() <= 5; }, 10s));
  int64_t oldest = f.h.Events("web").front().seq;
  {
    Ctx c;
    pb::WatchEventsRequest q;
    q.set_after_seq(1);
    auto reader = stub->WatchEvents(&c.ctx, q);
    pb::Event e;
    CHECK_FALSE(reader->Read(&e));
    grpc::Status s = reader->Finish();
    CHECK(s.error_code() == grpc::OUT_OF_RANGE);
    CHECK(s.error_message().find("events after 1 were pruned; the oldest available is ") == 0);
  }
  // Resume: follow from the oldest, see a new event arrive live.
  grpc::ClientContext ctx;
  pb::WatchEventsRequest q;
  q.set_after_seq(oldest);
  q.set_follow(true);
  auto reader = stub->WatchEvents(&ctx, q);
  pb::Event e;
  REQUIRE(reader->Read(&e));
  CHECK(e.seq() == oldest + 1);
  {
    Ctx c;
    pb::PauseRequest p;
    p.set_service("web");
    pb::PauseResponse r;
    REQUIRE(stub->Pause(&c.ctx, p, &r).ok());
  }
  bool saw_pause = false;
  while (!saw_pause && reader->Read(&e)) saw_pause = e.kind() == "paused";
  CHECK(saw_pause);
  ctx.TryCancel();
}

TEST_CASE("kilnctl: rollback from the command line pins and replaces - --wait exits 0", "[api]") {
  KilndHarness h;
  h.Declare("web", "1.0", 2, kPolicy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor(
      [&] { return h.Healthy("web", 1) == 2 && h.HasEvent("web", EventKind::kRolloutCompleted); }));
  h.Declare("web", "2.0", 2, kPolicy);
  REQUIRE(WaitFor([&] { return h.Healthy("web", 2) == 2 && h.Live("web").size() == 2; }, 60s));
  REQUIRE(WaitFor([&] {
    auto s = h.Store();
    return s && s->GetRevision("web", 2).ok() && s->GetRevision("web", 2)->available_ms > 0;
  }));
  const std::string addr = h.UnixAddr();
  RunResult rb = Run(
      {BinPath("kilnctl"), "--addr", addr, "rollback", "web", "--reason", "bad deploy", "--wait"},
      120s);
  INFO(rb.out << rb.err);
  CHECK(rb.exit_code == 0);
  CHECK(rb.out.find("web rolled back: revision 3 runs the template of revision 1 (version 1.0)") !=
        std::string::npos);
  CHECK(rb.out.find("web: rollout complete") != std::string::npos);
  RunResult js = Run({BinPath("kilnctl"), "--addr", addr, "-o", "json", "status", "web"});
  REQUIRE(js.exit_code == 0);
  auto j = nlohmann::json::parse(js.out);
  CHECK(j["service"]["summary"]["pinned_revision"] == "3");
  CHECK(j["service"]["pin_reason"] == "rollback by local: bad deploy");
  for (const auto& i : h.Live("web")) CHECK(i.revision == 3);
  RunResult table = Run({BinPath("kilnctl"), "--addr", addr, "status"});
  CHECK(table.out.find("pinned to 3") != std::string::npos);
  RunResult yaml = Run({BinPath("kilnctl"), "--addr", addr, "-o", "yaml", "history", "web"});
  CHECK(yaml.exit_code == 0);
  CHECK(yaml.out.find("source: rollback") != std::string::npos);
  RunResult events = Run({BinPath("kilnctl"), "--addr", addr, "events", "--service", "web"});
  CHECK(events.out.find("rolled_back") != std::string::npos);
  RunResult unpin = Run({BinPath("kilnctl"), "--addr", addr, "unpin", "web", "--timeout", "5"});
  CHECK(unpin.exit_code == 0);
  CHECK(unpin.out == "web unpinned; it follows its manifest again (revision 2)\n");
}

TEST_CASE("kilnctl: rollback --wait to a revision that fails exits 3 and says why", "[api]") {
  KilndHarness h;
  const char* policy =
      "{strategy: rolling, max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, "
      "progress_deadline: 3s}";
  h.Declare("web", "1.0", 2, policy);
  h.Start();
  REQUIRE(h.WaitReady());
  REQUIRE(WaitFor([&] { return h.Healthy("web", 1) == 2; }));
  // Version 2 fails health: rolled back automatically to revision 3 (the template of 1).
  h.Declare("web", "2.0", 2, policy, ", \"--unhealthy-after\", \"0s\"");
  REQUIRE(WaitFor(
      [&] {
        auto s = h.Service("web");
        return s.ok() && s->pinned_revision == 3 && h.Healthy("web") == 2 &&
               h.Live("web").size() == 2;
      },
      60s));
  // The operator tries revision 2 again (as revision 4): it fails the same way, and the pass that
  // fails it rolls back at once, so the failed rollout may never be the latest one a poll sees.
  RunResult rb = Run({BinPath("kilnctl"), "--addr", h.UnixAddr(), "rollback", "web",
                      "--to-revision", "2", "--reason", "retry", "--wait"},
                     120s);
  INFO(rb.out << rb.err);
  CHECK(rb.exit_code == 3);
  CHECK(rb.out.find("web rolled back: revision 4 runs the template of revision 2") !=
        std::string::npos);
  CHECK(rb.out.find("rollout complete") == std::string::npos);
  // Whether or not a poll saw the failed rollout before the rollback that followed it, the wait
  // reads the events and says both.
  CHECK(rb.err.rfind("kilnctl: rollout of web to revision 4 failed: ", 0) == 0);
  CHECK(rb.err.find("as revision 5") != std::string::npos);
}

TEST_CASE("kilnctl says plainly when kilnd is not running", "[api]") {
  TempDir tmp;
  RunResult r = Run({BinPath("kilnctl"), "--addr", "unix:" + (tmp / "none.sock").string(),
                     "--timeout", "2", "status"});
  CHECK(r.exit_code == 1);
  CHECK(r.err.rfind("kilnctl: cannot reach kilnd at unix:" + (tmp / "none.sock").string() +
                        " (is it running?",
                    0) == 0);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

}  // namespace
}  // namespace kiln::testing
