#include <sys/stat.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <set>
#include <thread>

#include "common/clock.h"
#include "storage/sqlite_state_store.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

struct StoreFixture {
  StoreFixture() { store = OpenStore(); }

  std::unique_ptr<SqliteStateStore> OpenStore(int busy_timeout_ms = 5000) {
    SqliteStateStore::Options o;
    o.path = path();
    o.clock = &clock;
    o.busy_timeout_ms = busy_timeout_ms;
    auto s = SqliteStateStore::Open(o);
    if (!s.ok()) FAIL(s.status().ToString());
    return std::move(s).value();
  }
  std::string path() const { return (tmp / "kiln.db").string(); }

  // A service "web" with revision 1.
  void AddWebRevision1() {
    ServiceRecord s;
    s.name = "web";
    s.manifest_file = "web.yaml";
    REQUIRE(store->PutService(s).ok());
    REQUIRE(store->WriteRevision(Revision("web", 1, "hash-1")).ok());
  }

  static RevisionRecord Revision(const std::string& service, int64_t n, const std::string& hash) {
    RevisionRecord r;
    r.service = service;
    r.number = n;
    r.template_hash = hash;
    r.template_json = "{\"version\":\"" + hash + "\"}";
    r.source = RevisionSource::kManifest;
    r.manifest_file = service + ".yaml";
    r.manifest_sha256 = std::string(64, 'a');
    return r;
  }

  TempDir tmp;
  FakeClock clock;
  std::unique_ptr<SqliteStateStore> store;
};

TEST_CASE("services are stored and read back", "[store]") {
  StoreFixture f;
  ServiceRecord s;
  s.name = "web";
  s.manifest_file = "m/web.yaml";
  s.spec = "{\"replicas\":3}";
  s.desired_revision = 2;
  s.pinned_revision = 1;
  s.pin_reason = "rollback by alice";
  s.paused = true;
  REQUIRE(f.store->PutService(s).ok());
  f.clock.Advance(Duration(1000));
  s.manifest_error = "web.yaml:3:1: bad";
  REQUIRE(f.store->PutService(s).ok());

  auto got = f.store->GetService("web");
  REQUIRE(got.ok());
  CHECK(got->spec == s.spec);
  CHECK(got->desired_revision == 2);
  CHECK(got->pinned_revision == 1);
  CHECK(got->pin_reason == "rollback by alice");
  CHECK(got->paused);
  CHECK(got->manifest_error == "web.yaml:3:1: bad");
  CHECK(got->conditions.empty());
  CHECK(got->updated_ms - got->created_ms == 1000);
  CHECK(f.store->ListServices()->size() == 1);
  CHECK(f.store->GetService("nope").status().code() == StatusCode::kNotFound);
  CHECK(f.store->GetService("nope").status().message() == "service \"nope\" is not known");
}

TEST_CASE("revisions are immutable once written", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  CHECK(*f.store->NextRevisionNumber("web") == 2);
  CHECK(*f.store->NextRevisionNumber("other") == 1);

  // Writing the same number again is refused, even with identical content.
  Status again = f.store->WriteRevision(StoreFixture::Revision("web", 1, "hash-1"));
  CHECK(again.code() == StatusCode::kFailedPrecondition);
  CHECK(again.message() == "web revision 1 is already written; revisions are immutable");
  CHECK(f.store->WriteRevision(StoreFixture::Revision("web", 1, "hash-x")).code() ==
        StatusCode::kFailedPrecondition);

  // Even raw SQL cannot edit it.
  Status raw = f.store->ExecForTest("UPDATE revisions SET template_hash = 'evil' WHERE number = 1");
  CHECK(raw.code() == StatusCode::kFailedPrecondition);
  CHECK(raw.message().find("revisions are immutable") != std::string::npos);
  CHECK(f.store->GetRevision("web", 1)->template_hash == "hash-1");

  // Availability is recorded once; the first time stays.
  REQUIRE(f.store->MarkRevisionAvailable("web", 1, 111).ok());
  REQUIRE(f.store->MarkRevisionAvailable("web", 1, 222).ok());
  CHECK(f.store->GetRevision("web", 1)->available_ms == 111);
  CHECK(f.store->MarkRevisionAvailable("web", 9, 1).code() == StatusCode::kNotFound);

  REQUIRE(f.store->WriteRevision(StoreFixture::Revision("web", 2, "hash-2")).ok());
  auto list = f.store->ListRevisions("web");
  REQUIRE(list->size() == 2);
  CHECK((*list)[0].number == 2);  // newest first
  CHECK((*list)[1].manifest_sha256 == std::string(64, 'a'));
  CHECK(f.store->GetRevision("web", 7).status().message() == "service \"web\" has no revision 7");
}

TEST_CASE("instances: intent first, ids never reused", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto a = f.store->CreateInstance("web", 1);
  auto b = f.store->CreateInstance("web", 1);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->state == InstanceState::kPending);
  CHECK(a->name == "web-" + std::to_string(a->id));
  CHECK(b->id > a->id);
  CHECK(f.store->CreateInstance("web", 5).status().code() == StatusCode::kNotFound);

  InstanceUpdate started;
  started.handle = "pid:100:12345";
  started.port = 20001;
  started.host = "local";
  auto s = f.store->TransitionInstance(a->name, InstanceState::kStarting, started);
  REQUIRE(s.ok());
  f.clock.Advance(Duration(500));
  auto h = f.store->TransitionInstance(a->name, InstanceState::kHealthy, {});
  REQUIRE(h.ok());
  CHECK(h->handle == "pid:100:12345");
  CHECK(h->port == 20001);
  CHECK(h->healthy_since_ms - h->started_ms == 500);

  InstanceUpdate exited;
  exited.reason = "exited with code 3";
  exited.exit_code = 3;
  REQUIRE(f.store->TransitionInstance(a->name, InstanceState::kFailed, exited).ok());
  auto live = f.store->ListInstances("web", false);
  REQUIRE(live->size() == 1);
  CHECK((*live)[0].name == b->name);
  auto all = f.store->ListInstances("web", true);
  REQUIRE(all->size() == 2);
  CHECK(all->at(0).exit_code == 3);
  CHECK(all->at(0).reason == "exited with code 3");
  CHECK(all->at(0).finished_ms > 0);
  CHECK(f.store->ListLiveInstances()->size() == 1);

  // Delete every final row: a new instance still gets a new id.
  CHECK(*f.store->PruneFinalInstances("web", 0) == 1);
  auto c = f.store->CreateInstance("web", 1);
  CHECK(c->id > b->id);
  CHECK(f.store->GetInstance(a->name).status().code() == StatusCode::kNotFound);
  CHECK(f.store->GetInstance("garbage").status().code() == StatusCode::kNotFound);
}

TEST_CASE("only the lifecycle's transitions are accepted", "[store]") {
  using S = InstanceState;
  const std::vector<S> all = {S::kPending,  S::kStarting,   S::kHealthy, S::kUnhealthy,
                              S::kDraining, S::kTerminated, S::kFailed,  S::kLost};
  // The DESIGN.md lifecycle, written out as the set of legal pairs.
  const std::set<std::pair<S, S>> legal = {
      {S::kPending, S::kStarting},  {S::kPending, S::kDraining},    {S::kPending, S::kFailed},
      {S::kPending, S::kLost},      {S::kStarting, S::kHealthy},    {S::kStarting, S::kDraining},
      {S::kStarting, S::kFailed},   {S::kStarting, S::kLost},       {S::kHealthy, S::kUnhealthy},
      {S::kHealthy, S::kDraining},  {S::kHealthy, S::kFailed},      {S::kHealthy, S::kLost},
      {S::kUnhealthy, S::kHealthy}, {S::kUnhealthy, S::kDraining},  {S::kUnhealthy, S::kFailed},
      {S::kUnhealthy, S::kLost},    {S::kDraining, S::kTerminated}, {S::kDraining, S::kLost},
  };
  for (S from : all) {
    for (S to : all) {
      INFO(InstanceStateName(from) << " -> " << InstanceStateName(to));
      CHECK(IsLegalTransition(from, to) == (legal.count({from, to}) == 1));
    }
  }

  // And the store enforces them, naming the instance and both states.
  StoreFixture f;
  f.AddWebRevision1();
  auto a = f.store->CreateInstance("web", 1);
  auto bad = f.store->TransitionInstance(a->name, S::kHealthy, {});
  CHECK(bad.status().code() == StatusCode::kFailedPrecondition);
  CHECK(bad.status().message() ==
        "instance " + a->name + ": illegal transition pending -> healthy");
  REQUIRE(f.store->TransitionInstance(a->name, S::kDraining, {}).ok());
  REQUIRE(f.store->TransitionInstance(a->name, S::kTerminated, {}).ok());
  auto revive = f.store->TransitionInstance(a->name, S::kStarting, {});
  CHECK(revive.status().message() ==
        "instance " + a->name + ": illegal transition terminated -> starting");
  CHECK(f.store->GetInstance(a->name)->state == S::kTerminated);
}

TEST_CASE("a revision in use cannot be deleted", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  REQUIRE(f.store->WriteRevision(StoreFixture::Revision("web", 2, "hash-2")).ok());
  auto a = f.store->CreateInstance("web", 1);
  Status s = f.store->DeleteRevision("web", 1);
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(s.message() == "web revision 1 is still referenced by 1 instance(s)");
  REQUIRE(f.store->DeleteRevision("web", 2).ok());
  CHECK(f.store->ListRevisions("web")->size() == 1);
}

TEST_CASE("events append with increasing seq and read after a cursor", "[store]") {
  StoreFixture f;
  for (int i = 0; i < 10; ++i) {
    EventRecord e;
    e.kind = EventKind::kInstanceCreated;
    e.service = i % 2 ? "web" : "api";
    e.instance = e.service + "-" + std::to_string(i);
    e.actor = "kilnd";
    e.message = "event " + std::to_string(i);
    REQUIRE(*f.store->AppendEvent(e) == i + 1);
  }
  auto after = f.store->ReadEvents({.after_seq = 7});
  REQUIRE(after->size() == 3);
  CHECK(after->at(0).seq == 8);
  CHECK(after->at(0).message == "event 7");
  auto web = f.store->ReadEvents({.after_seq = 0, .service = "web", .limit = 2});
  REQUIRE(web->size() == 2);
  CHECK(web->at(0).seq == 2);
  CHECK(web->at(1).seq == 4);

  CHECK(*f.store->PruneEvents(4) == 6);
  CHECK(*f.store->OldestEventSeq() == 7);
  CHECK(*f.store->LatestEventSeq() == 10);
  CHECK(*f.store->AppendEvent({.kind = EventKind::kServiceMissing}) ==
        11);  // seqs are never reused after pruning
}

TEST_CASE("repeated events fold into one counted row, and pruning keeps its watermark", "[store]") {
  StoreFixture f;
  auto append = [&](const std::string& key, const std::string& msg) {
    EventRecord e{
        .kind = EventKind::kInstanceExited, .service = "web", .message = msg, .aggregate_key = key};
    return *f.store->AppendEvent(e);
  };
  CHECK(append("", "first, not aggregated") == 1);
  CHECK(append("exit|3", "web-1 exited with code 3") == 2);
  f.clock.Advance(std::chrono::seconds(30));
  CHECK(append("exit|3", "web-2 exited with code 3") == 3);  // replaces seq 2
  CHECK(append("exit|1", "web-3 exited with code 1") == 4);  // another key: its own row
  f.clock.Advance(std::chrono::minutes(11));                 // past the 10 minute window
  CHECK(append("exit|3", "web-4 exited with code 3") == 5);  // a new row, count 1
  auto events = *f.store->ReadEvents({});
  REQUIRE(events.size() == 4);
  CHECK(events[0].seq == 1);
  CHECK(events[1].seq == 3);
  CHECK(events[1].count == 2);
  CHECK(events[1].message == "web-2 exited with code 3");
  CHECK(events[1].time_ms - events[1].first_ms == 30'000);
  CHECK(events[2].count == 1);
  CHECK(events[3].seq == 5);
  CHECK(events[3].count == 1);
  CHECK(events[3].first_ms == events[3].time_ms);
  // A folded row is no gap for a reader resuming from before it; retention pruning is.
  CHECK(*f.store->OldestEventSeq() == 1);
  CHECK(*f.store->PruneEvents(2) == 2);
  CHECK(*f.store->OldestEventSeq() == 4);
}

TEST_CASE("probe results: the last one, and the first failure of a failing streak", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto inst = *f.store->CreateInstance("web", 1);
  REQUIRE(f.store->RecordProbe(inst.name, false, "connect refused", 1000).ok());
  REQUIRE(f.store->RecordProbe(inst.name, false, "http 503", 2000).ok());
  auto r = *f.store->GetInstance(inst.name);
  CHECK(r.last_probe == "http 503");
  CHECK_FALSE(r.last_probe_ok);
  CHECK(r.last_probe_ms == 2000);
  CHECK(r.first_probe_failure == "connect refused");
  CHECK(r.probe_failing_since_ms == 1000);
  REQUIRE(f.store->RecordProbe(inst.name, true, "http 200", 3000).ok());
  r = *f.store->GetInstance(inst.name);
  CHECK(r.last_probe_ok);
  CHECK(r.first_probe_failure.empty());
  CHECK(r.probe_failing_since_ms == 0);
  REQUIRE(f.store->RecordProbe(inst.name, false, "timeout after 500ms", 4000).ok());
  r = *f.store->GetInstance(inst.name);
  CHECK(r.first_probe_failure == "timeout after 500ms");
  CHECK(r.probe_failing_since_ms == 4000);
}

TEST_CASE("rollouts are recorded and updated", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  RolloutRecord r;
  r.service = "web";
  r.to_revision = 1;
  r.strategy = Strategy::kRolling;
  r.state = RolloutState::kProgressing;
  r.started_ms = r.last_progress_ms = 5;
  auto id = f.store->PutRollout(r);
  REQUIRE(id.ok());
  r.id = *id;
  r.state = RolloutState::kCompleted;
  r.finished_ms = 9;
  REQUIRE(f.store->PutRollout(r).ok());
  auto got = f.store->GetLatestRollout("web");
  REQUIRE(got.ok());
  CHECK(got->state == RolloutState::kCompleted);
  CHECK(got->finished_ms == 9);
  r.state = static_cast<RolloutState>(99);  // no such state: the database's CHECK refuses it
  CHECK(f.store->PutRollout(r).status().code() == StatusCode::kFailedPrecondition);
  CHECK(f.store->GetLatestRollout("api").status().code() == StatusCode::kNotFound);
}

TEST_CASE("after-commit work runs once the outermost transaction commits and never on rollback",
          "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  std::vector<std::string> ran;
  REQUIRE(f.store
              ->Transaction([&]() -> Status {
                f.store->AfterCommit([&] { ran.emplace_back("outer"); });
                RETURN_IF_ERROR(f.store->Transaction([&]() -> Status {
                  f.store->AfterCommit([&] { ran.emplace_back("nested"); });
                  return Status::Ok();
                }));
                CHECK(ran.empty());  // the nested transaction's end is not a commit
                return f.store->CreateInstance("web", 1).status();
              })
              .ok());
  CHECK(ran == std::vector<std::string>{"outer", "nested"});

  ran.clear();
  Status s = f.store->Transaction([&]() -> Status {
    f.store->AfterCommit([&] { ran.emplace_back("rolled back"); });
    return FailedPreconditionError("a rule said no");
  });
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(ran.empty());
  // The next transaction does not run what the rolled-back one queued.
  REQUIRE(f.store->Transaction([] { return Status::Ok(); }).ok());
  CHECK(ran.empty());

  f.store->AfterCommit([&] { ran.emplace_back("outside"); });  // no transaction: at once
  CHECK(ran == std::vector<std::string>{"outside"});
}

TEST_CASE("a transaction commits all or nothing", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  Status s = f.store->Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(auto inst, f.store->CreateInstance("web", 1));
    RETURN_IF_ERROR(
        f.store->AppendEvent({.kind = EventKind::kInstanceCreated, .instance = inst.name})
            .status());
    // An illegal transition fails the whole step.
    return f.store->TransitionInstance(inst.name, InstanceState::kTerminated, {}).status();
  });
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(f.store->ListInstances("web", true)->empty());
  CHECK(f.store->ReadEvents({})->empty());

  REQUIRE(f.store
              ->Transaction([&]() -> Status {
                ASSIGN_OR_RETURN(auto inst, f.store->CreateInstance("web", 1));
                return f.store
                    ->AppendEvent({.kind = EventKind::kInstanceCreated, .instance = inst.name})
                    .status();
              })
              .ok());
  CHECK(f.store->ListInstances("web", true)->size() == 1);
  CHECK(f.store->ReadEvents({})->size() == 1);
}

TEST_CASE("the store survives reopening and keeps everything", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto a = f.store->CreateInstance("web", 1);
  f.store.reset();
  f.store = f.OpenStore();
  CHECK(f.store->GetInstance(a->name)->state == InstanceState::kPending);
  CHECK(f.store->GetRevision("web", 1)->template_hash == "hash-1");
}

TEST_CASE("a database made by schema version 1 is migrated on open", "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  REQUIRE(CreateDatabaseAtSchemaVersionForTest(path, 1).ok());
  {
    // Data written by a version-1 kiln.
    auto db = sqlite::Database::Open(path, false, false);
    REQUIRE(db.ok());
    REQUIRE(db->Exec("INSERT INTO services (name, created_ms, updated_ms) VALUES ('web', 1, 1);"
                     "INSERT INTO revisions (service, number, template_hash, template, source, "
                     "created_ms) VALUES ('web', 1, 'h1', '{}', 'manifest', 1);"
                     "INSERT INTO instances (service, revision, state, created_ms, "
                     "state_changed_ms) VALUES ('web', 1, 'healthy', 1, 1);")
                .ok());
    CHECK(*db->QueryInt("v", "PRAGMA user_version") == 1);
  }
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE(store.ok());
  auto version = sqlite::Database::Open(path, true, false)->QueryInt("v", "PRAGMA user_version");
  CHECK(*version == SqliteStateStore::CurrentSchemaVersion());
  auto web = (*store)->GetService("web");
  REQUIRE(web.ok());
  CHECK(web->conditions.empty());  // the column version 2 added
  CHECK((*store)->ListInstances("web", false)->size() == 1);
  CHECK((*store)->GetLatestRollout("web").status().code() == StatusCode::kNotFound);
  // Made before Kiln marked its databases: adopted, and marked from now on.
  CHECK(*sqlite::Database::Open(path, true, false)->QueryInt("a", "PRAGMA application_id") ==
        SqliteStateStore::kApplicationId);
}

TEST_CASE("a database made by schema version 4 gets each instance's pid from its handle",
          "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  REQUIRE(CreateDatabaseAtSchemaVersionForTest(path, 4).ok());
  {
    auto db = sqlite::Database::Open(path, false, false);
    REQUIRE(db.ok());
    // Every database made since schema 4 is marked as Kiln's.
    REQUIRE(db->Exec("PRAGMA application_id = " + std::to_string(SqliteStateStore::kApplicationId))
                .ok());
    REQUIRE(db->Exec("INSERT INTO services (name, created_ms, updated_ms) VALUES ('web', 1, 1);"
                     "INSERT INTO revisions (service, number, template_hash, template, source, "
                     "created_ms) VALUES ('web', 1, 'h1', '{}', 'manifest', 1);"
                     "INSERT INTO instances (service, revision, state, handle, created_ms, "
                     "state_changed_ms) VALUES ('web', 1, 'healthy', 'pid:4242:987654', 1, 1), "
                     "('web', 1, 'pending', '', 1, 1), ('web', 1, 'healthy', 'container:ab', 1, "
                     "1);")
                .ok());
  }
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE(store.ok());
  auto live = (*store)->ListInstances("web", false);
  REQUIRE(live.ok());
  REQUIRE(live->size() == 3);
  CHECK((*live)[0].pid == 4242);
  CHECK((*live)[0].handle == "pid:4242:987654");  // the handle itself is kept as it was
  CHECK((*live)[1].pid == 0);
  CHECK((*live)[2].pid == 0);
}

TEST_CASE("an instance's pid is stored with its transition", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto a = f.store->CreateInstance("web", 1);
  REQUIRE(a.ok());
  CHECK(a->pid == 0);
  auto started = f.store->TransitionInstance(
      a->name, InstanceState::kStarting, {.reason = "started", .handle = "pid:77:1", .pid = 77});
  REQUIRE(started.ok());
  CHECK(started->pid == 77);
  f.store.reset();
  f.store = f.OpenStore();
  CHECK(f.store->GetInstance(a->name)->pid == 77);
}

// The text of one column of the first row `sql` selects, read past the store.
std::string RawText(const std::string& path, const std::string& sql) {
  auto db = sqlite::Database::Open(path, true, false);
  REQUIRE(db.ok());
  auto stmt = db->Prepare(sql);
  REQUIRE(stmt.ok());
  auto row = db->Step(**stmt, "raw read");
  REQUIRE(row.ok());
  REQUIRE(*row);
  return (*stmt)->Text(0);
}

TEST_CASE("typed records are stored as the same text as ever", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  ServiceRecord s = *f.store->GetService("web");
  s.conditions = {
      {ConditionType::kAvailable, true, "MinimumReplicasAvailable", "2 of 2 instances available",
       5},
      {ConditionType::kDegraded, false, "AsExpected", "", 7},
  };
  REQUIRE(f.store->PutService(s).ok());
  CHECK(RawText(f.path(), "SELECT conditions FROM services WHERE name = 'web'") ==
        R"([{"last_transition_ms":5,"message":"2 of 2 instances available",)"
        R"("reason":"MinimumReplicasAvailable","status":true,"type":"Available"},)"
        R"({"last_transition_ms":7,"message":"","reason":"AsExpected","status":false,)"
        R"("type":"Degraded"}])");
  CHECK(f.store->GetService("web")->conditions == s.conditions);

  RolloutRecord r{.service = "web",
                  .to_revision = 1,
                  .strategy = Strategy::kBlueGreen,
                  .state = RolloutState::kWaitingPromotion};
  REQUIRE(f.store->PutRollout(r).ok());
  CHECK(RawText(f.path(), "SELECT strategy || ' ' || state FROM rollouts") ==
        "blue-green waiting_promotion");
  CHECK(f.store->GetLatestRollout("web")->strategy == Strategy::kBlueGreen);
  CHECK(f.store->GetLatestRollout("web")->state == RolloutState::kWaitingPromotion);

  REQUIRE(
      f.store->AppendEvent({.kind = EventKind::kUnknownInstanceStopped, .service = "web"}).ok());
  CHECK(RawText(f.path(), "SELECT kind FROM events") == "unknown_instance_stopped");
  CHECK(RawText(f.path(), "SELECT source FROM revisions") == "manifest");
}

TEST_CASE("a name this build does not know, read from the database, is a clear error", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto inst = f.store->CreateInstance("web", 1);
  REQUIRE(inst.ok());
  REQUIRE(f.store->PutRollout({.service = "web", .to_revision = 1}).ok());
  // What a newer kiln (or a hand edit) could leave behind; the CHECK constraints of the schema
  // would refuse some of it, so they are off for these writes.
  REQUIRE(f.store->ExecForTest("PRAGMA ignore_check_constraints = ON").ok());

  SECTION("an event kind") {
    REQUIRE(f.store
                ->ExecForTest("INSERT INTO events (time_ms, kind, service) VALUES "
                              "(1, 'instance_teleported', 'web')")
                .ok());
    auto events = f.store->ReadEvents({});
    CHECK(events.status().code() == StatusCode::kDataLoss);
    CHECK(events.status().message() ==
          f.path() + ": read events: table events, row 1: unknown kind \"instance_teleported\"");
  }
  SECTION("a rollout state and strategy") {
    REQUIRE(f.store->ExecForTest("UPDATE rollouts SET state = 'exploded'").ok());
    auto r = f.store->GetLatestRollout("web");
    CHECK(r.status().code() == StatusCode::kDataLoss);
    CHECK(r.status().message() ==
          f.path() + ": get rollout: table rollouts, row 1: unknown state \"exploded\"");
    REQUIRE(f.store->ExecForTest("UPDATE rollouts SET strategy = 'big-bang'").ok());
    CHECK(f.store->GetLatestRollout("web").status().message() ==
          f.path() + ": get rollout: table rollouts, row 1: unknown strategy \"big-bang\"");
  }
  SECTION("an instance state") {
    REQUIRE(f.store->ExecForTest("UPDATE instances SET state = 'zombie'").ok());
    auto got = f.store->GetInstance(inst->name);
    CHECK(got.status().code() == StatusCode::kDataLoss);
    CHECK(got.status().message() ==
          f.path() + ": get instance: table instances, row 1: unknown state \"zombie\"");
    CHECK(f.store->ListInstances("web", true).status().code() == StatusCode::kDataLoss);
    CHECK(f.store->CountInstances().status().message() ==
          f.path() +
              ": count instances: table instances, row web revision 1: unknown state "
              "\"zombie\"");
    // A transition reads the row first: refused, not applied to a guess.
    CHECK(f.store->TransitionInstance(inst->name, InstanceState::kLost, {}).status().code() ==
          StatusCode::kDataLoss);
  }
  SECTION("a revision source") {
    REQUIRE(f.store
                ->ExecForTest("INSERT INTO revisions (service, number, template_hash, template, "
                              "source, created_ms) VALUES ('web', 2, 'h2', '{}', 'imported', 1)")
                .ok());
    auto rev = f.store->GetRevision("web", 2);
    CHECK(rev.status().code() == StatusCode::kDataLoss);
    CHECK(rev.status().message() ==
          f.path() + ": get revision: table revisions, row web 2: unknown source \"imported\"");
    CHECK(f.store->ListRevisions("web").status().code() == StatusCode::kDataLoss);
    CHECK(f.store->GetRevision("web", 1).ok());  // the other rows still read
  }
  SECTION("a condition type") {
    REQUIRE(f.store
                ->ExecForTest("UPDATE services SET conditions = '[{\"type\":\"Happy\","
                              "\"status\":true}]'")
                .ok());
    auto svc = f.store->GetService("web");
    CHECK(svc.status().code() == StatusCode::kDataLoss);
    CHECK(svc.status().message() ==
          f.path() + ": get service: table services, row web: unknown condition type \"Happy\"");
    REQUIRE(f.store->ExecForTest("UPDATE services SET conditions = 'not json'").ok());
    CHECK(f.store->ListServices().status().message() ==
          f.path() +
              ": list services: table services, row web: conditions are not a JSON array: not "
              "json");
  }
}

TEST_CASE("a new database is marked as Kiln's", "[store]") {
  StoreFixture f;
  auto db = sqlite::Database::Open(f.path(), true, false);
  REQUIRE(db.ok());
  CHECK(*db->QueryInt("a", "PRAGMA application_id") == SqliteStateStore::kApplicationId);
  CHECK(*db->QueryInt("v", "PRAGMA user_version") == SqliteStateStore::CurrentSchemaVersion());
}

TEST_CASE("an unmarked Kiln database (schema 3, the last before the mark) is adopted and marked",
          "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  REQUIRE(CreateDatabaseAtSchemaVersionForTest(path, 3).ok());
  REQUIRE(*sqlite::Database::Open(path, true, false)->QueryInt("a", "PRAGMA application_id") == 0);
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE(store.ok());
  CHECK(*sqlite::Database::Open(path, true, false)->QueryInt("a", "PRAGMA application_id") ==
        SqliteStateStore::kApplicationId);
}

// Another program's database in rollback-journal mode, with one table and a row.
void MakeForeignDatabase(const std::string& path, const std::string& extra_sql = "") {
  auto db = sqlite::Database::Open(path, false, true);
  REQUIRE(db.ok());
  REQUIRE(db->Exec("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);"
                   "INSERT INTO notes (body) VALUES ('keep me');" +
                   extra_sql)
              .ok());
}

std::string JournalMode(const std::string& path) {
  sqlite3* raw = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  std::string mode;
  sqlite3_exec(
      raw, "PRAGMA journal_mode",
      [](void* out, int, char** values, char**) {
        *static_cast<std::string*>(out) = values[0] ? values[0] : "";
        return 0;
      },
      &mode, nullptr);
  sqlite3_close(raw);
  return mode;
}

TEST_CASE("another program's database is refused before a byte of it is written", "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  MakeForeignDatabase(path);
  REQUIRE(JournalMode(path) == "delete");
  const std::string before = ReadFile(path);
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().code() == StatusCode::kFailedPrecondition);
  CHECK(store.status().message() ==
        path +
            " is not a Kiln state database (application_id 0x00000000, user_version 0, tables: "
            "notes); refusing to use it. Move it away or give --state a directory of its own");
  CHECK(JournalMode(path) == "delete");
  CHECK(ReadFile(path) == before);
  CHECK_FALSE(std::filesystem::exists(path + "-wal"));
  // A reader refuses it too.
  auto reader = SqliteStateStore::Open({.path = path, .clock = &clock, .read_only = true});
  CHECK(reader.status().code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("Kiln's tables beside another program's, or another program's mark, are refused",
          "[store]") {
  TempDir tmp;
  FakeClock clock;
  SECTION("an unmarked Kiln schema with a foreign table") {
    std::string path = (tmp / "kiln.db").string();
    REQUIRE(CreateDatabaseAtSchemaVersionForTest(path, 1).ok());
    MakeForeignDatabase(path);
    const std::string before = ReadFile(path);
    auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
    REQUIRE_FALSE(store.ok());
    CHECK(store.status().message().find("tables: events, instances, notes, revisions, services)") !=
          std::string::npos);
    CHECK(ReadFile(path) == before);
  }
  SECTION("another application's id on an empty database") {
    std::string path = (tmp / "other.db").string();
    {
      auto db = sqlite::Database::Open(path, false, true);
      REQUIRE(
          db->Exec("PRAGMA application_id = " + std::to_string(0x4750534D)).ok());  // GeoPackage
    }
    const std::string before = ReadFile(path);
    auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
    REQUIRE_FALSE(store.ok());
    CHECK(store.status().message() ==
          path +
              " is not a Kiln state database (application_id 0x4750534d, user_version 0, "
              "tables: none); refusing to use it. Move it away or give --state a directory of "
              "its own");
    CHECK(ReadFile(path) == before);
  }
}

TEST_CASE("a database from a newer kiln is refused, not touched", "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  {
    auto db = sqlite::Database::Open(path, false, true);
    REQUIRE(db->Exec("PRAGMA user_version = 99").ok());
    REQUIRE(db->Exec("PRAGMA application_id = " + std::to_string(SqliteStateStore::kApplicationId))
                .ok());
  }
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().code() == StatusCode::kFailedPrecondition);
  CHECK(store.status().message() == path +
                                        ": schema version 99 was written by a newer kiln; this "
                                        "build knows up to " +
                                        std::to_string(SqliteStateStore::CurrentSchemaVersion()));
}

TEST_CASE("a file that is not a database fails clearly and is left as it was", "[store]") {
  TempDir tmp;
  std::string path = (tmp / "kiln.db").string();
  std::string garbage(8192, 'x');
  garbage.replace(0, 20, "this is not sqlite!!");
  WriteFile(path, garbage);
  FakeClock clock;
  auto store = SqliteStateStore::Open({.path = path, .clock = &clock});
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().code() == StatusCode::kDataLoss);
  CHECK(store.status().message() == path + ": read database: file is not a database");
  CHECK(ReadFile(path) == garbage);
  CHECK_FALSE(std::filesystem::exists(path + "-wal"));
}

TEST_CASE("a full disk refuses the write and keeps what was committed", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  for (int i = 0; i < 50; ++i)
    REQUIRE(f.store->AppendEvent({.kind = EventKind::kServiceMissing}).ok());
  // Cap the file at its current size (plus nothing): the next growth fails like ENOSPC.
  REQUIRE(f.store->ExecForTest("PRAGMA wal_checkpoint(TRUNCATE)").ok());
  auto pages = sqlite::Database::Open(f.path(), true, false)->QueryInt("p", "PRAGMA page_count");
  REQUIRE(f.store->ExecForTest("PRAGMA max_page_count = " + std::to_string(*pages.value())).ok());

  Status full;
  const std::string big(4000, 'z');
  int written = 0;
  for (; written < 1000; ++written) {
    full = f.store->Transaction([&] {
      return f.store->AppendEvent({.kind = EventKind::kServiceMissing, .message = big}).status();
    });
    if (!full.ok()) break;
  }
  REQUIRE_FALSE(full.ok());
  CHECK(full.code() == StatusCode::kResourceExhausted);
  CHECK(full.message().find(f.path()) == 0);
  CHECK(full.message().find("database or disk is full") != std::string::npos);
  // Readiness asks the store whether it takes writes: not now. An error of the caller's own
  // does not change that answer; a commit that goes through does.
  CHECK(f.store->WriteFailure().code() == StatusCode::kResourceExhausted);
  CHECK(f.store->Transaction([] { return FailedPreconditionError("a rule said no"); }).code() ==
        StatusCode::kFailedPrecondition);
  CHECK(f.store->WriteFailure().code() == StatusCode::kResourceExhausted);
  REQUIRE(f.store->ExecForTest("PRAGMA max_page_count = 1000000").ok());
  REQUIRE(f.store
              ->Transaction([&] {
                return f.store->AppendEvent({.kind = EventKind::kServiceMissing}).status();
              })
              .ok());
  CHECK(f.store->WriteFailure().ok());
  CHECK(f.store->Transaction([] { return FailedPreconditionError("a rule said no"); }).code() ==
        StatusCode::kFailedPrecondition);
  CHECK(f.store->WriteFailure().ok());
  ++written;

  // Reopen: everything committed before the failure is intact, the failed write is absent.
  f.store.reset();
  f.store = f.OpenStore();
  auto events = f.store->ReadEvents({.limit = 100000});
  REQUIRE(events.ok());
  CHECK(events->size() == static_cast<size_t>(50 + written));
  CHECK(f.store->GetRevision("web", 1)->template_hash == "hash-1");
}

TEST_CASE("a second writer gets a clear busy error", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto second = f.OpenStore(/*busy_timeout_ms=*/50);
  Status busy;
  Status first = f.store->Transaction([&] {
    RETURN_IF_ERROR(f.store->AppendEvent({.kind = EventKind::kPaused}).status());
    busy = second->AppendEvent({.kind = EventKind::kResumed}).status();
    return Status::Ok();
  });
  REQUIRE(first.ok());
  CHECK(busy.code() == StatusCode::kUnavailable);
  CHECK(busy.message().find(f.path() + ": append event resumed: database is locked") == 0);
}

TEST_CASE("readers see consistent snapshots while the writer commits", "[store]") {
  StoreFixture f;
  f.AddWebRevision1();
  auto reader_or = f.store->OpenReader();
  REQUIRE(reader_or.ok());
  std::unique_ptr<StateReader> reader = std::move(reader_or).value();

  // The writer moves instances in pairs: each transaction creates two and one event naming them.
  // A consistent reader always sees an even number of instances and one event per pair.
  constexpr int kPairs = 200;
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < kPairs; ++i) {
      Status s = f.store->Transaction([&]() -> Status {
        RETURN_IF_ERROR(f.store->CreateInstance("web", 1).status());
        RETURN_IF_ERROR(f.store->CreateInstance("web", 1).status());
        return f.store->AppendEvent({.kind = EventKind::kServiceMissing}).status();
      });
      if (!s.ok()) FAIL_CHECK(s.ToString());
    }
    done = true;
  });
  int snapshots = 0;
  int64_t last_seen = 0;
  std::vector<std::string> problems;
  while (!done || snapshots == 0) {
    size_t instances = 0, events = 0;
    Status s = reader->Snapshot([&]() -> Status {
      ASSIGN_OR_RETURN(auto list, reader->ListInstances("web", false));
      instances = list.size();
      ASSIGN_OR_RETURN(auto ev, reader->ReadEvents({.limit = 100000}));
      events = ev.size();
      return Status::Ok();
    });
    if (!s.ok()) problems.push_back(s.ToString());
    if (instances != 2 * events) {
      problems.push_back(std::to_string(instances) + " instances vs " + std::to_string(events) +
                         " events");
    }
    if (static_cast<int64_t>(events) < last_seen) problems.emplace_back("went backwards");
    last_seen = static_cast<int64_t>(events);
    ++snapshots;
  }
  writer.join();
  CHECK(problems.empty());
  CHECK(reader->ReadEvents({.limit = 100000})->size() == kPairs);
  // The reader cannot write.
  auto* as_store = dynamic_cast<StateStore*>(reader.get());
  REQUIRE(as_store != nullptr);
  CHECK(as_store->AppendEvent({.kind = EventKind::kServiceMissing}).status().code() ==
        StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

TEST_CASE("a revision keeps the git commit of its manifest and it cannot be edited", "[store]") {
  StoreFixture f;
  ServiceRecord s;
  s.name = "web";
  REQUIRE(f.store->PutService(s).ok());
  RevisionRecord r = StoreFixture::Revision("web", 1, "hash-1");
  r.commit = {.id = std::string(40, 'c'),
              .author = "Alice Example <alice@example.com>",
              .time_ms = 1'700'000'000'000,
              .subject = "web 1.0",
              .dirty = true};
  REQUIRE(f.store->WriteRevision(r).ok());
  REQUIRE(f.store->WriteRevision(StoreFixture::Revision("web", 2, "hash-2")).ok());

  auto got = f.store->GetRevision("web", 1);
  REQUIRE(got.ok());
  CHECK(got->commit == r.commit);
  CHECK(f.store->GetRevision("web", 2)->commit == SourceCommit{});
  CHECK((*f.store->ListRevisions("web"))[1].commit.subject == "web 1.0");

  for (const char* column : {"commit_id = 'x'", "commit_author = 'x'", "commit_time_ms = 1",
                             "commit_subject = 'x'", "manifest_dirty = 0"}) {
    Status raw = f.store->ExecForTest(std::string("UPDATE revisions SET ") + column);
    INFO(column);
    CHECK(raw.message().find("revisions are immutable") != std::string::npos);
  }
  CHECK(f.store->GetRevision("web", 1)->commit == r.commit);
}

}  // namespace
}  // namespace kiln
