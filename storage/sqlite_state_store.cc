#include "storage/sqlite_state_store.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

namespace kiln {
namespace {

// Each entry moves the schema from version i to i+1; never edit one that has shipped, add one.
constexpr std::array<const char*, 7> kMigrations = {
    // 1: services, immutable revisions, instances, events.
    R"sql(
CREATE TABLE services (
  name TEXT PRIMARY KEY CHECK (name <> ''),
  manifest_file TEXT NOT NULL DEFAULT '',
  spec TEXT NOT NULL DEFAULT '',
  desired_revision INTEGER NOT NULL DEFAULT 0,
  pinned_revision INTEGER NOT NULL DEFAULT 0,
  pin_reason TEXT NOT NULL DEFAULT '',
  paused INTEGER NOT NULL DEFAULT 0,
  retired INTEGER NOT NULL DEFAULT 0,
  manifest_error TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL
);
CREATE TABLE revisions (
  service TEXT NOT NULL REFERENCES services(name),
  number INTEGER NOT NULL CHECK (number >= 1),
  template_hash TEXT NOT NULL,
  template TEXT NOT NULL,
  source TEXT NOT NULL CHECK (source IN ('manifest', 'rollback')),
  manifest_file TEXT NOT NULL DEFAULT '',
  manifest_sha256 TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT '',
  reason TEXT NOT NULL DEFAULT '',
  rolled_back_from INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL,
  available_ms INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (service, number)
) WITHOUT ROWID;
-- A revision is never edited once written; only its first-available time is recorded later, once.
CREATE TRIGGER revisions_immutable BEFORE UPDATE OF service, number, template_hash, template,
    source, manifest_file, manifest_sha256, actor, reason, rolled_back_from, created_ms ON revisions
BEGIN
  SELECT RAISE(ABORT, 'revisions are immutable');
END;
CREATE TRIGGER revisions_available_once BEFORE UPDATE OF available_ms ON revisions
WHEN OLD.available_ms <> 0
BEGIN
  SELECT RAISE(ABORT, 'revision availability is recorded once');
END;
CREATE TABLE instances (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  service TEXT NOT NULL,
  revision INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending', 'starting', 'healthy', 'unhealthy', 'draining',
                                       'terminated', 'failed', 'lost')),
  reason TEXT NOT NULL DEFAULT '',
  handle TEXT NOT NULL DEFAULT '',
  host TEXT NOT NULL DEFAULT '',
  port INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL,
  started_ms INTEGER NOT NULL DEFAULT 0,
  healthy_since_ms INTEGER NOT NULL DEFAULT 0,
  state_changed_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL DEFAULT 0,
  exit_code INTEGER,
  exit_signal TEXT NOT NULL DEFAULT '',
  FOREIGN KEY (service, revision) REFERENCES revisions(service, number)
);
CREATE INDEX instances_by_service ON instances(service, id);
CREATE INDEX instances_live ON instances(id) WHERE state NOT IN ('terminated', 'failed', 'lost');
CREATE TABLE events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  time_ms INTEGER NOT NULL,
  kind TEXT NOT NULL,
  service TEXT NOT NULL DEFAULT '',
  revision INTEGER NOT NULL DEFAULT 0,
  instance TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT '',
  message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_by_service ON events(service, seq);
)sql",
    // 2: rollouts with their deadlines' bookkeeping, and per-service conditions.
    R"sql(
CREATE TABLE rollouts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  service TEXT NOT NULL REFERENCES services(name),
  from_revision INTEGER NOT NULL DEFAULT 0,
  to_revision INTEGER NOT NULL,
  strategy TEXT NOT NULL CHECK (strategy IN ('rolling', 'recreate', 'blue-green', 'canary')),
  state TEXT NOT NULL CHECK (state IN ('progressing', 'paused', 'waiting_promotion', 'completed',
                                       'failed', 'superseded')),
  reason TEXT NOT NULL DEFAULT '',
  started_ms INTEGER NOT NULL,
  last_progress_ms INTEGER NOT NULL,
  paused_ms INTEGER NOT NULL DEFAULT 0,
  paused_at_ms INTEGER NOT NULL DEFAULT 0,
  finished_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX rollouts_by_service ON rollouts(service, id);
ALTER TABLE services ADD COLUMN conditions TEXT NOT NULL DEFAULT '[]';
)sql",
    // 3: operator-requested replacement of an instance, and canary promotion, survive restarts.
    R"sql(
ALTER TABLE instances ADD COLUMN replace_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE rollouts ADD COLUMN promoted INTEGER NOT NULL DEFAULT 0;
)sql",
    // 4: why health checks fail, crash-loop back-off and permanent start errors, retirement that
    // waits, and repeated events aggregated.
    R"sql(
ALTER TABLE instances ADD COLUMN last_probe TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN last_probe_ok INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN last_probe_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN first_probe_failure TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN probe_failing_since_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN crash_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN last_crash_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN crash_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE services ADD COLUMN next_start_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN start_error TEXT NOT NULL DEFAULT '';
ALTER TABLE services ADD COLUMN start_error_revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE services ADD COLUMN retire_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE events ADD COLUMN first_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN aggregate_key TEXT NOT NULL DEFAULT '';
CREATE INDEX events_by_aggregate ON events(service, aggregate_key, seq) WHERE aggregate_key <> '';
-- The highest seq pruned by retention: a cursor below it has missed events. (An aggregated
-- event's earlier row is deleted too, but its repeat follows, so that is no gap.)
CREATE TABLE events_pruned (through_seq INTEGER NOT NULL);
INSERT INTO events_pruned (through_seq) SELECT coalesce(min(seq) - 1, 0) FROM events;
)sql",
    // 5: the leader's pid as a column of its own, so nothing outside the driver reads a handle.
    // Rows written before it take it from the process driver's handle, "pid:<pid>:<start time>".
    R"sql(
ALTER TABLE instances ADD COLUMN pid INTEGER NOT NULL DEFAULT 0;
UPDATE instances SET pid = CAST(substr(handle, 5, instr(substr(handle, 5), ':') - 1) AS INTEGER)
WHERE handle LIKE 'pid:%:%';
)sql",
    // 6: the progress a rollout last saw, so that its progress deadline counts the same across a
    // restart. -1: not seen yet (a rollout from before it counts from its next pass, as then).
    R"sql(
ALTER TABLE rollouts ADD COLUMN seen_new_available INTEGER NOT NULL DEFAULT -1;
ALTER TABLE rollouts ADD COLUMN seen_old_total INTEGER NOT NULL DEFAULT -1;
)sql",
    // 7: the git commit that last changed a revision's manifest file, and whether the file had
    // uncommitted changes; immutable like the rest of the revision.
    R"sql(
ALTER TABLE revisions ADD COLUMN commit_id TEXT NOT NULL DEFAULT '';
ALTER TABLE revisions ADD COLUMN commit_author TEXT NOT NULL DEFAULT '';
ALTER TABLE revisions ADD COLUMN commit_time_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE revisions ADD COLUMN commit_subject TEXT NOT NULL DEFAULT '';
ALTER TABLE revisions ADD COLUMN manifest_dirty INTEGER NOT NULL DEFAULT 0;
DROP TRIGGER revisions_immutable;
CREATE TRIGGER revisions_immutable BEFORE UPDATE OF service, number, template_hash, template,
    source, manifest_file, manifest_sha256, actor, reason, rolled_back_from, created_ms, commit_id,
    commit_author, commit_time_ms, commit_subject, manifest_dirty ON revisions
BEGIN
  SELECT RAISE(ABORT, 'revisions are immutable');
END;
)sql",
};

// A name read from the database that this build does not know: the row cannot be trusted.
Status UnknownName(std::string_view table, std::string_view row, std::string_view column,
                   std::string_view value) {
  return DataLossError("table " + std::string(table) + ", row " + std::string(row) + ": unknown " +
                       std::string(column) + " \"" + std::string(value) + "\"");
}

// Parses column `col` of a row with `parse` (one of the records' Parse* functions).
template <typename E>
StatusOr<E> ReadName(const sqlite::Statement& s, int col,
                     std::optional<E> (*parse)(std::string_view), std::string_view table,
                     std::string_view row, std::string_view column) {
  const std::string text = s.Text(col);
  std::optional<E> v = parse(text);
  if (!v) return UnknownName(table, row, column, text);
  return *v;
}

// Conditions are a JSON array in their column: [{"last_transition_ms":..,"message":..,
// "reason":..,"status":..,"type":..}] (keys sorted, as written since schema version 2).
std::string ConditionsToJson(const std::vector<Condition>& conditions) {
  nlohmann::json out = nlohmann::json::array();
  for (const Condition& c : conditions) {
    out.push_back({{"type", ConditionTypeName(c.type)},
                   {"status", c.status},
                   {"reason", c.reason},
                   {"message", c.message},
                   {"last_transition_ms", c.last_transition_ms}});
  }
  return out.dump();
}

StatusOr<std::vector<Condition>> ConditionsFromJson(const std::string& text,
                                                    std::string_view service) {
  auto bad = [&](std::string_view why) {
    return DataLossError("table services, row " + std::string(service) + ": conditions " +
                         std::string(why) + ": " + text);
  };
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_array()) return bad("are not a JSON array");
  std::vector<Condition> out;
  for (const auto& c : j) {
    if (!c.is_object()) return bad("hold something other than an object");
    auto field = [&](const char* key) -> const nlohmann::json* {
      auto it = c.find(key);
      return it == c.end() ? nullptr : &*it;
    };
    const nlohmann::json* type = field("type");
    const nlohmann::json* status = field("status");
    const nlohmann::json* reason = field("reason");
    const nlohmann::json* message = field("message");
    const nlohmann::json* since = field("last_transition_ms");
    if (!type || !type->is_string()) return bad("hold one without a type");
    std::optional<ConditionType> t = ParseConditionType(type->get<std::string>());
    if (!t) return UnknownName("services", service, "condition type", type->get<std::string>());
    if (!status || !status->is_boolean() || (reason && !reason->is_string()) ||
        (message && !message->is_string()) || (since && !since->is_number_integer())) {
      return bad("hold a field of the wrong type");
    }
    out.push_back({*t, status->get<bool>(), reason ? reason->get<std::string>() : "",
                   message ? message->get<std::string>() : "", since ? since->get<int64_t>() : 0});
  }
  return out;
}

constexpr const char* kInstanceColumns =
    "id, service, revision, state, reason, handle, host, port, created_ms, started_ms, "
    "healthy_since_ms, state_changed_ms, finished_ms, exit_code, exit_signal, replace_reason, "
    "last_probe, last_probe_ok, last_probe_ms, first_probe_failure, probe_failing_since_ms, pid";

StatusOr<InstanceRecord> ReadInstance(const sqlite::Statement& s) {
  InstanceRecord r;
  r.id = s.Int(0);
  r.service = s.Text(1);
  r.name = r.service + "-" + std::to_string(r.id);
  r.revision = s.Int(2);
  ASSIGN_OR_RETURN(r.state,
                   ReadName(s, 3, ParseInstanceState, "instances", std::to_string(r.id), "state"));
  r.reason = s.Text(4);
  r.handle = s.Text(5);
  r.host = s.Text(6);
  r.port = static_cast<int>(s.Int(7));
  r.created_ms = s.Int(8);
  r.started_ms = s.Int(9);
  r.healthy_since_ms = s.Int(10);
  r.state_changed_ms = s.Int(11);
  r.finished_ms = s.Int(12);
  if (!s.IsNull(13)) r.exit_code = static_cast<int>(s.Int(13));
  r.exit_signal = s.Text(14);
  r.replace_reason = s.Text(15);
  r.last_probe = s.Text(16);
  r.last_probe_ok = s.Int(17) != 0;
  r.last_probe_ms = s.Int(18);
  r.first_probe_failure = s.Text(19);
  r.probe_failing_since_ms = s.Int(20);
  r.pid = s.Int(21);
  return r;
}

constexpr const char* kServiceColumns =
    "name, manifest_file, spec, desired_revision, pinned_revision, pin_reason, paused, retired, "
    "manifest_error, conditions, created_ms, updated_ms, crash_count, last_crash_ms, crash_reason, "
    "next_start_ms, start_error, start_error_revision, retire_at_ms";

StatusOr<ServiceRecord> ReadService(const sqlite::Statement& s) {
  ServiceRecord r;
  r.name = s.Text(0);
  r.manifest_file = s.Text(1);
  r.spec = s.Text(2);
  r.desired_revision = s.Int(3);
  r.pinned_revision = s.Int(4);
  r.pin_reason = s.Text(5);
  r.paused = s.Int(6) != 0;
  r.retired = s.Int(7) != 0;
  r.manifest_error = s.Text(8);
  ASSIGN_OR_RETURN(r.conditions, ConditionsFromJson(s.Text(9), r.name));
  r.created_ms = s.Int(10);
  r.updated_ms = s.Int(11);
  r.crash_count = static_cast<int>(s.Int(12));
  r.last_crash_ms = s.Int(13);
  r.crash_reason = s.Text(14);
  r.next_start_ms = s.Int(15);
  r.start_error = s.Text(16);
  r.start_error_revision = s.Int(17);
  r.retire_at_ms = s.Int(18);
  return r;
}

constexpr const char* kRevisionColumns =
    "service, number, template_hash, template, source, manifest_file, manifest_sha256, actor, "
    "reason, rolled_back_from, created_ms, available_ms, commit_id, commit_author, commit_time_ms, "
    "commit_subject, manifest_dirty";

StatusOr<RevisionRecord> ReadRevision(const sqlite::Statement& s) {
  RevisionRecord r;
  r.service = s.Text(0);
  r.number = s.Int(1);
  r.template_hash = s.Text(2);
  r.template_json = s.Text(3);
  ASSIGN_OR_RETURN(r.source, ReadName(s, 4, ParseRevisionSource, "revisions",
                                      r.service + " " + std::to_string(r.number), "source"));
  r.manifest_file = s.Text(5);
  r.manifest_sha256 = s.Text(6);
  r.actor = s.Text(7);
  r.reason = s.Text(8);
  r.rolled_back_from = s.Int(9);
  r.created_ms = s.Int(10);
  r.available_ms = s.Int(11);
  r.commit.id = s.Text(12);
  r.commit.author = s.Text(13);
  r.commit.time_ms = s.Int(14);
  r.commit.subject = s.Text(15);
  r.commit.dirty = s.Int(16) != 0;
  return r;
}

constexpr const char* kRolloutColumns =
    "id, service, from_revision, to_revision, strategy, state, reason, started_ms, "
    "last_progress_ms, paused_ms, paused_at_ms, finished_ms, promoted, seen_new_available, "
    "seen_old_total";

StatusOr<RolloutRecord> ReadRollout(const sqlite::Statement& s) {
  RolloutRecord r;
  r.id = s.Int(0);
  r.service = s.Text(1);
  r.from_revision = s.Int(2);
  r.to_revision = s.Int(3);
  const std::string row = std::to_string(r.id);
  ASSIGN_OR_RETURN(r.strategy, ReadName(s, 4, ParseStrategy, "rollouts", row, "strategy"));
  ASSIGN_OR_RETURN(r.state, ReadName(s, 5, ParseRolloutState, "rollouts", row, "state"));
  r.reason = s.Text(6);
  r.started_ms = s.Int(7);
  r.last_progress_ms = s.Int(8);
  r.paused_ms = s.Int(9);
  r.paused_at_ms = s.Int(10);
  r.finished_ms = s.Int(11);
  r.promoted = s.Int(12) != 0;
  r.seen_new_available = static_cast<int>(s.Int(13));
  r.seen_old_total = static_cast<int>(s.Int(14));
  return r;
}

// "web-42" -> ("web", 42). Service names are [a-z0-9-], so the id follows the last '-'.
bool SplitInstanceName(std::string_view name, std::string_view* service, int64_t* id) {
  size_t dash = name.rfind('-');
  if (dash == std::string_view::npos || dash == 0 || dash + 1 >= name.size()) return false;
  std::string_view digits = name.substr(dash + 1);
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), *id);
  if (ec != std::errc() || p != digits.data() + digits.size()) return false;
  *service = name.substr(0, dash);
  return true;
}

// Runs the statement to completion, appending each row read by `read` (which returns a
// StatusOr<T>: a row it cannot read fails the whole query, naming the database and `what`).
template <typename T, typename ReadFn>
StatusOr<std::vector<T>> CollectRows(sqlite::Database& db, sqlite::Statement& s,
                                     std::string_view what, ReadFn read) {
  std::vector<T> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, db.Step(s, what));
    if (!row) break;
    StatusOr<T> r = read(s);
    if (!r.ok()) {
      sqlite3_reset(s.get());
      return Status(r.status().code(),
                    db.path() + ": " + std::string(what) + ": " + r.status().message());
    }
    out.push_back(std::move(r).value());
  }
  return out;
}

// The tables a Kiln database had before it carried PRAGMA application_id; frozen: every
// database made since is marked, so later migrations never need to be listed here.
constexpr std::array<std::string_view, 5> kUnmarkedKilnTables = {"services", "revisions",
                                                                 "instances", "events", "rollouts"};

std::string Hex32(int64_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", static_cast<uint32_t>(v));
  return buf;
}

Status ApplyMigrations(sqlite::Database& db, int from, int to) {
  for (int v = from; v < to; ++v) {
    RETURN_IF_ERROR(db.Exec("BEGIN IMMEDIATE"));
    // The mark goes in with the first write, in the same transaction.
    Status s =
        db.Exec("PRAGMA application_id = " + std::to_string(SqliteStateStore::kApplicationId));
    if (s.ok()) s = db.Exec(kMigrations[static_cast<size_t>(v)]);
    if (s.ok()) s = db.Exec("PRAGMA user_version = " + std::to_string(v + 1));
    if (s.ok()) s = db.Exec("COMMIT");
    if (!s.ok()) {
      (void)db.Exec("ROLLBACK");
      return s.WithContext("migrating schema to version " + std::to_string(v + 1));
    }
  }
  return Status::Ok();
}

}  // namespace

int SqliteStateStore::CurrentSchemaVersion() { return static_cast<int>(kMigrations.size()); }

StatusOr<std::unique_ptr<SqliteStateStore>> SqliteStateStore::Open(const Options& options) {
  if (options.clock == nullptr) return InvalidArgumentError("state store: a clock is required");
  ASSIGN_OR_RETURN(sqlite::Database db,
                   sqlite::Database::Open(options.path, options.read_only, /*create=*/true));
  std::unique_ptr<SqliteStateStore> store(new SqliteStateStore(std::move(db), options));
  RETURN_IF_ERROR(store->CheckOwnership());
  RETURN_IF_ERROR(store->Configure());
  if (!options.read_only) RETURN_IF_ERROR(store->Migrate());
  ASSIGN_OR_RETURN(auto version, store->db_.QueryInt("read schema version", "PRAGMA user_version"));
  if (version.value_or(0) != CurrentSchemaVersion()) {
    return FailedPreconditionError(options.path + ": schema version " +
                                   std::to_string(version.value_or(0)) + ", this kiln needs " +
                                   std::to_string(CurrentSchemaVersion()));
  }
  return store;
}

Status SqliteStateStore::CheckOwnership() {
  sqlite3_busy_timeout(db_.raw(), options_.busy_timeout_ms);
  // The first read of the file: a file that is not a database fails here, before any write.
  RETURN_IF_ERROR(db_.QueryInt("read database", "SELECT count(*) FROM sqlite_master").status());
  ASSIGN_OR_RETURN(auto app_id, db_.QueryInt("read application_id", "PRAGMA application_id"));
  if (app_id.value_or(0) == kApplicationId) return Status::Ok();
  ASSIGN_OR_RETURN(auto version, db_.QueryInt("read schema version", "PRAGMA user_version"));
  std::vector<std::string> tables;
  {
    const std::string sql =
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
        "ESCAPE '\\' ORDER BY name";
    ASSIGN_OR_RETURN(sqlite::Statement * s, db_.Prepare(sql, "list tables"));
    while (true) {
      ASSIGN_OR_RETURN(bool row, db_.Step(*s, "list tables"));
      if (!row) break;
      tables.push_back(s->Text(0));
    }
  }
  const bool unmarked = app_id.value_or(0) == 0;
  if (unmarked && tables.empty() && version.value_or(0) == 0)
    return Status::Ok();  // new: ours to make
  bool only_kiln_tables = !tables.empty();
  for (const auto& t : tables) {
    only_kiln_tables &= std::find(kUnmarkedKilnTables.begin(), kUnmarkedKilnTables.end(), t) !=
                        kUnmarkedKilnTables.end();
  }
  if (unmarked && version.value_or(0) >= 1 && only_kiln_tables &&
      std::find(tables.begin(), tables.end(), "services") != tables.end()) {
    return Status::Ok();  // a Kiln database from before the mark: Migrate() marks it
  }
  std::string listed;
  for (size_t i = 0; i < tables.size() && i < 8; ++i) listed += (i ? ", " : "") + tables[i];
  if (tables.size() > 8) listed += ", ... (" + std::to_string(tables.size()) + " in all)";
  return FailedPreconditionError(
      db_.path() + " is not a Kiln state database (application_id " + Hex32(app_id.value_or(0)) +
      ", user_version " + std::to_string(version.value_or(0)) +
      ", tables: " + (listed.empty() ? "none" : listed) +
      "); refusing to use it. Move it away or give --state a directory of its own");
}

Status SqliteStateStore::Configure() {
  if (!options_.read_only) RETURN_IF_ERROR(db_.Exec("PRAGMA journal_mode = WAL"));
  // The WAL and its index outlive a clean close: a restart on a full disk can then still open
  // the database (creating them needs space), serve status and wait for space.
  int persist_wal = 1;
  sqlite3_file_control(db_.raw(), "main", SQLITE_FCNTL_PERSIST_WAL, &persist_wal);
  RETURN_IF_ERROR(db_.Exec("PRAGMA synchronous = FULL"));
  RETURN_IF_ERROR(db_.Exec("PRAGMA foreign_keys = ON"));
  return Status::Ok();
}

Status SqliteStateStore::Migrate() {
  ASSIGN_OR_RETURN(auto version, db_.QueryInt("read schema version", "PRAGMA user_version"));
  int v = static_cast<int>(version.value_or(0));
  if (v > CurrentSchemaVersion()) {
    return FailedPreconditionError(db_.path() + ": schema version " + std::to_string(v) +
                                   " was written by a newer kiln; this build knows up to " +
                                   std::to_string(CurrentSchemaVersion()));
  }
  ASSIGN_OR_RETURN(auto app_id, db_.QueryInt("read application_id", "PRAGMA application_id"));
  if (app_id.value_or(0) != kApplicationId && v == CurrentSchemaVersion()) {
    // A current Kiln database from before the mark: nothing to migrate, mark it alone.
    RETURN_IF_ERROR(db_.Exec("PRAGMA application_id = " + std::to_string(kApplicationId))
                        .WithContext("marking the database as Kiln's"));
  }
  return ApplyMigrations(db_, v, CurrentSchemaVersion());
}

Status CreateDatabaseAtSchemaVersionForTest(const std::string& path, int version) {
  ASSIGN_OR_RETURN(sqlite::Database db, sqlite::Database::Open(path, false, true));
  RETURN_IF_ERROR(ApplyMigrations(db, 0, version));
  return db.Exec("PRAGMA application_id = 0");  // as made before Kiln marked its databases
}

StatusOr<std::unique_ptr<StateReader>> SqliteStateStore::OpenReader() const {
  Options o = options_;
  o.read_only = true;
  ASSIGN_OR_RETURN(auto reader, Open(o));
  return std::unique_ptr<StateReader>(std::move(reader));
}

Status SqliteStateStore::ExecForTest(std::string_view sql) {
  std::lock_guard lock(mu_);
  return db_.Exec(sql);
}

int64_t SqliteStateStore::NowMs() const { return ToUnixMillis(options_.clock->SystemNow()); }

// ---------------------------------------------------------------------------------------------
// Transactions

Status SqliteStateStore::Snapshot(const std::function<Status()>& fn) {
  std::lock_guard lock(mu_);
  if (tx_depth_ > 0) return fn();
  RETURN_IF_ERROR(db_.Exec("BEGIN"));
  ++tx_depth_;
  Status s = fn();
  --tx_depth_;
  Status end = db_.Exec("COMMIT");  // a read transaction: COMMIT only ends it
  return s.ok() ? end : s;
}

Status SqliteStateStore::Transaction(const std::function<Status()>& fn) {
  std::unique_lock lock(mu_);
  if (tx_depth_ > 0) return fn();
  const auto begin = std::chrono::steady_clock::now();
  const uint64_t failures_before = db_.failures();
  Status s = db_.Exec("BEGIN IMMEDIATE");
  if (s.ok()) {
    ++tx_depth_;
    s = fn();
    --tx_depth_;
  }
  if (s.ok()) {
    s = db_.Exec("COMMIT");
    if (s.ok() && options_.on_commit) {
      options_.on_commit(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count());
    }
  }
  if (!s.ok() && !sqlite3_get_autocommit(db_.raw())) (void)db_.Exec("ROLLBACK");
  // A failure of SQLite itself (full disk, I/O error, busy) is the store failing; an error the
  // caller returned (an illegal transition, a missing row) is not.
  if (s.ok()) {
    write_failure_ = Status::Ok();
  } else if (db_.failures() > failures_before) {
    write_failure_ = s;
  }
  std::vector<std::function<void()>> committed;
  committed.swap(after_commit_);
  lock.unlock();
  if (s.ok()) {
    for (const auto& fn_after : committed) fn_after();
  }
  return s;
}

void SqliteStateStore::AfterCommit(std::function<void()> fn) {
  {
    std::lock_guard lock(mu_);
    if (tx_depth_ > 0) {
      after_commit_.push_back(std::move(fn));
      return;
    }
  }
  fn();
}

// ---------------------------------------------------------------------------------------------
// Reads

StatusOr<std::vector<ServiceRecord>> SqliteStateStore::ListServices() {
  std::lock_guard lock(mu_);
  static const std::string kSql =
      std::string("SELECT ") + kServiceColumns + " FROM services ORDER BY name";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "list services"));
  return CollectRows<ServiceRecord>(db_, *s, "list services", ReadService);
}

StatusOr<ServiceRecord> SqliteStateStore::GetService(std::string_view name) {
  std::lock_guard lock(mu_);
  static const std::string kSql =
      std::string("SELECT ") + kServiceColumns + " FROM services WHERE name = ?";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "get service"));
  s->BindAll(name);
  ASSIGN_OR_RETURN(auto rows, CollectRows<ServiceRecord>(db_, *s, "get service", ReadService));
  if (rows.empty()) return NotFoundError("service \"" + std::string(name) + "\" is not known");
  return std::move(rows.front());
}

StatusOr<std::vector<RevisionRecord>> SqliteStateStore::ListRevisions(std::string_view service) {
  std::lock_guard lock(mu_);
  static const std::string kSql = std::string("SELECT ") + kRevisionColumns +
                                  " FROM revisions WHERE service = ? ORDER BY number DESC";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "list revisions"));
  s->BindAll(service);
  return CollectRows<RevisionRecord>(db_, *s, "list revisions", ReadRevision);
}

StatusOr<RevisionRecord> SqliteStateStore::GetRevision(std::string_view service, int64_t number) {
  std::lock_guard lock(mu_);
  static const std::string kSql = std::string("SELECT ") + kRevisionColumns +
                                  " FROM revisions WHERE service = ? AND number = ?";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "get revision"));
  s->BindAll(service, number);
  ASSIGN_OR_RETURN(auto rows, CollectRows<RevisionRecord>(db_, *s, "get revision", ReadRevision));
  if (rows.empty()) {
    return NotFoundError("service \"" + std::string(service) + "\" has no revision " +
                         std::to_string(number));
  }
  return std::move(rows.front());
}

StatusOr<std::vector<InstanceRecord>> SqliteStateStore::QueryInstances(const std::string& sql,
                                                                       std::string_view what,
                                                                       std::string_view service) {
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(sql, what));
  if (!service.empty()) s->BindAll(service);
  return CollectRows<InstanceRecord>(db_, *s, what, ReadInstance);
}

StatusOr<std::vector<InstanceRecord>> SqliteStateStore::ListInstances(std::string_view service,
                                                                      bool include_final) {
  std::lock_guard lock(mu_);
  static const std::string kAll =
      std::string("SELECT ") + kInstanceColumns + " FROM instances WHERE service = ? ORDER BY id";
  static const std::string kLive = std::string("SELECT ") + kInstanceColumns +
                                   " FROM instances WHERE service = ? AND state NOT IN "
                                   "('terminated', 'failed', 'lost') ORDER BY id";
  return QueryInstances(include_final ? kAll : kLive, "list instances", service);
}

StatusOr<std::vector<InstanceRecord>> SqliteStateStore::ListLiveInstances() {
  std::lock_guard lock(mu_);
  static const std::string kSql =
      std::string("SELECT ") + kInstanceColumns +
      " FROM instances WHERE state NOT IN ('terminated', 'failed', 'lost') ORDER BY id";
  return QueryInstances(kSql, "list live instances", "");
}

StatusOr<InstanceRecord> SqliteStateStore::GetInstance(std::string_view name) {
  std::string_view service;
  int64_t id = 0;
  auto not_found = [&] {
    return NotFoundError("instance \"" + std::string(name) + "\" is not known");
  };
  if (!SplitInstanceName(name, &service, &id)) return not_found();
  std::lock_guard lock(mu_);
  static const std::string kSql =
      std::string("SELECT ") + kInstanceColumns + " FROM instances WHERE id = ? AND service = ?";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "get instance"));
  s->BindAll(id, service);
  ASSIGN_OR_RETURN(auto rows, CollectRows<InstanceRecord>(db_, *s, "get instance", ReadInstance));
  if (rows.empty()) return not_found();
  return std::move(rows.front());
}

StatusOr<RolloutRecord> SqliteStateStore::GetLatestRollout(std::string_view service) {
  std::lock_guard lock(mu_);
  static const std::string kSql = std::string("SELECT ") + kRolloutColumns +
                                  " FROM rollouts WHERE service = ? ORDER BY id DESC LIMIT 1";
  ASSIGN_OR_RETURN(auto* s, db_.Prepare(kSql, "get rollout"));
  s->BindAll(service);
  ASSIGN_OR_RETURN(auto rows, CollectRows<RolloutRecord>(db_, *s, "get rollout", ReadRollout));
  if (rows.empty()) return NotFoundError("service \"" + std::string(service) + "\" has no rollout");
  return std::move(rows.front());
}

StatusOr<std::vector<EventRecord>> SqliteStateStore::ReadEvents(const EventQuery& q) {
  std::lock_guard lock(mu_);
  auto read = [](const sqlite::Statement& s) -> StatusOr<EventRecord> {
    EventRecord e;
    e.seq = s.Int(0);
    e.time_ms = s.Int(1);
    ASSIGN_OR_RETURN(e.kind,
                     ReadName(s, 2, ParseEventKind, "events", std::to_string(e.seq), "kind"));
    e.service = s.Text(3);
    e.revision = s.Int(4);
    e.instance = s.Text(5);
    e.actor = s.Text(6);
    e.message = s.Text(7);
    e.count = s.Int(8);
    e.first_ms = s.Int(9) > 0 ? s.Int(9) : e.time_ms;
    e.aggregate_key = s.Text(10);
    return e;
  };
  constexpr const char* kCols =
      "SELECT seq, time_ms, kind, service, revision, instance, actor, message, count, first_ms, "
      "aggregate_key FROM events ";
  sqlite::Statement* s;
  if (q.service.empty()) {
    static const std::string kSql = std::string(kCols) + "WHERE seq > ? ORDER BY seq LIMIT ?";
    ASSIGN_OR_RETURN(s, db_.Prepare(kSql, "read events"));
    s->BindAll(q.after_seq, q.limit);
  } else {
    static const std::string kSql =
        std::string(kCols) + "WHERE service = ? AND seq > ? ORDER BY seq LIMIT ?";
    ASSIGN_OR_RETURN(s, db_.Prepare(kSql, "read events"));
    s->BindAll(q.service, q.after_seq, q.limit);
  }
  return CollectRows<EventRecord>(db_, *s, "read events", read);
}

StatusOr<int64_t> SqliteStateStore::OldestEventSeq() {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(auto v,
                   db_.QueryInt("read events", "SELECT through_seq + 1 FROM events_pruned"));
  return v.value_or(1);
}

StatusOr<int64_t> SqliteStateStore::LatestEventSeq() {
  std::lock_guard lock(mu_);
  // sqlite_sequence remembers the highest seq ever assigned, even after pruning.
  ASSIGN_OR_RETURN(
      auto v, db_.QueryInt("read events", "SELECT seq FROM sqlite_sequence WHERE name = 'events'"));
  return v.value_or(0);
}

StatusOr<std::vector<InstanceCount>> SqliteStateStore::CountInstances() {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(auto* s,
                   db_.Prepare("SELECT service, revision, state, count(*) FROM instances "
                               "GROUP BY service, revision, state ORDER BY service, revision",
                               "count instances"));
  return CollectRows<InstanceCount>(
      db_, *s, "count instances", [](const sqlite::Statement& st) -> StatusOr<InstanceCount> {
        InstanceCount c{st.Text(0), st.Int(1), InstanceState::kPending, st.Int(3)};
        ASSIGN_OR_RETURN(c.state,
                         ReadName(st, 2, ParseInstanceState, "instances",
                                  c.service + " revision " + std::to_string(c.revision), "state"));
        return c;
      });
}

// ---------------------------------------------------------------------------------------------
// Writes

Status SqliteStateStore::PutService(const ServiceRecord& r) {
  std::lock_guard lock(mu_);
  const int64_t now = NowMs();
  return db_.Run("put service " + r.name,
                 "INSERT INTO services (name, manifest_file, spec, desired_revision, "
                 "pinned_revision, pin_reason, paused, retired, manifest_error, conditions, "
                 "created_ms, updated_ms, crash_count, last_crash_ms, crash_reason, "
                 "next_start_ms, start_error, start_error_revision, retire_at_ms) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET manifest_file = excluded.manifest_file, "
                 "spec = excluded.spec, desired_revision = excluded.desired_revision, "
                 "pinned_revision = excluded.pinned_revision, pin_reason = excluded.pin_reason, "
                 "paused = excluded.paused, retired = excluded.retired, "
                 "manifest_error = excluded.manifest_error, conditions = excluded.conditions, "
                 "updated_ms = excluded.updated_ms, crash_count = excluded.crash_count, "
                 "last_crash_ms = excluded.last_crash_ms, crash_reason = excluded.crash_reason, "
                 "next_start_ms = excluded.next_start_ms, start_error = excluded.start_error, "
                 "start_error_revision = excluded.start_error_revision, "
                 "retire_at_ms = excluded.retire_at_ms",
                 r.name, r.manifest_file, r.spec, r.desired_revision, r.pinned_revision,
                 r.pin_reason, r.paused, r.retired, r.manifest_error,
                 ConditionsToJson(r.conditions), now, now, r.crash_count, r.last_crash_ms,
                 r.crash_reason, r.next_start_ms, r.start_error, r.start_error_revision,
                 r.retire_at_ms);
}

Status SqliteStateStore::WriteRevision(const RevisionRecord& r) {
  std::lock_guard lock(mu_);
  const std::string label = r.service + " revision " + std::to_string(r.number);
  ASSIGN_OR_RETURN(
      auto existing,
      db_.QueryInt("write " + label, "SELECT 1 FROM revisions WHERE service = ? AND number = ?",
                   r.service, r.number));
  RETURN_IF_ERROR(CheckNewRevision(r, existing.has_value()));
  return db_.Run("write " + label,
                 std::string("INSERT INTO revisions (") + kRevisionColumns +
                     ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 r.service, r.number, r.template_hash, r.template_json,
                 RevisionSourceName(r.source), r.manifest_file, r.manifest_sha256, r.actor,
                 r.reason, r.rolled_back_from, r.created_ms ? r.created_ms : NowMs(),
                 r.available_ms, r.commit.id, r.commit.author, r.commit.time_ms, r.commit.subject,
                 int64_t{r.commit.dirty ? 1 : 0});
}

StatusOr<int64_t> SqliteStateStore::NextRevisionNumber(std::string_view service) {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(auto v,
                   db_.QueryInt("next revision number",
                                "SELECT max(number) FROM revisions WHERE service = ?", service));
  return v.value_or(0) + 1;
}

Status SqliteStateStore::MarkRevisionAvailable(std::string_view service, int64_t number,
                                               int64_t time_ms) {
  std::lock_guard lock(mu_);
  std::string label = std::string(service) + " revision " + std::to_string(number);
  RETURN_IF_ERROR(db_.Run("mark " + label + " available",
                          "UPDATE revisions SET available_ms = ? WHERE service = ? AND number = ? "
                          "AND available_ms = 0",
                          time_ms, service, number));
  if (db_.Changes() == 0) {
    ASSIGN_OR_RETURN(
        auto exists,
        db_.QueryInt("mark " + label + " available",
                     "SELECT 1 FROM revisions WHERE service = ? AND number = ?", service, number));
    if (!exists) return NotFoundError(label + " does not exist");
  }
  return Status::Ok();
}

Status SqliteStateStore::DeleteRevision(std::string_view service, int64_t number) {
  std::lock_guard lock(mu_);
  std::string label = std::string(service) + " revision " + std::to_string(number);
  ASSIGN_OR_RETURN(auto used,
                   db_.QueryInt("delete " + label,
                                "SELECT count(*) FROM instances WHERE service = ? AND revision = ?",
                                service, number));
  RETURN_IF_ERROR(CheckRevisionDeletable(service, number, used.value_or(0)));
  return db_.Run("delete " + label, "DELETE FROM revisions WHERE service = ? AND number = ?",
                 service, number);
}

StatusOr<InstanceRecord> SqliteStateStore::CreateInstance(std::string_view service,
                                                          int64_t revision) {
  std::lock_guard lock(mu_);
  const int64_t now = NowMs();
  std::string label = std::string(service) + " revision " + std::to_string(revision);
  ASSIGN_OR_RETURN(
      auto exists,
      db_.QueryInt("create instance of " + label,
                   "SELECT 1 FROM revisions WHERE service = ? AND number = ?", service, revision));
  if (!exists) return NotFoundError("cannot create an instance of " + label + ": no such revision");
  RETURN_IF_ERROR(db_.Run("create instance of " + label,
                          "INSERT INTO instances (service, revision, state, created_ms, "
                          "state_changed_ms) VALUES (?, ?, 'pending', ?, ?)",
                          service, revision, now, now));
  InstanceRecord r;
  r.id = db_.LastInsertRowid();
  r.service = std::string(service);
  r.name = r.service + "-" + std::to_string(r.id);
  r.revision = revision;
  r.state = InstanceState::kPending;
  r.created_ms = now;
  r.state_changed_ms = now;
  return r;
}

StatusOr<InstanceRecord> SqliteStateStore::TransitionInstance(std::string_view name,
                                                              InstanceState to,
                                                              const InstanceUpdate& u) {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(InstanceRecord r, GetInstance(name));
  RETURN_IF_ERROR(ApplyTransition(r, to, u, NowMs()));
  RETURN_IF_ERROR(db_.Run("move instance " + r.name + " to " + std::string(InstanceStateName(to)),
                          "UPDATE instances SET state = ?, reason = ?, handle = ?, pid = ?, "
                          "host = ?, port = ?, started_ms = ?, healthy_since_ms = ?, "
                          "state_changed_ms = ?, finished_ms = ?, exit_code = ?, exit_signal = ? "
                          "WHERE id = ?",
                          InstanceStateName(to), r.reason, r.handle, r.pid, r.host, r.port,
                          r.started_ms, r.healthy_since_ms, r.state_changed_ms, r.finished_ms,
                          r.exit_code, r.exit_signal, r.id));
  return r;
}

Status SqliteStateStore::RequestReplacement(std::string_view name, std::string_view reason) {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(InstanceRecord r, GetInstance(name));
  RETURN_IF_ERROR(CheckReplaceable(r));
  return db_.Run("request replacement of " + r.name,
                 "UPDATE instances SET replace_reason = ? WHERE id = ?", reason, r.id);
}

StatusOr<int64_t> SqliteStateStore::DeleteFinalInstancesOf(std::string_view service,
                                                           int64_t revision) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(db_.Run(
      "delete instances of " + std::string(service) + " revision " + std::to_string(revision),
      "DELETE FROM instances WHERE service = ? AND revision = ? AND state IN "
      "('terminated', 'failed', 'lost')",
      service, revision));
  return db_.Changes();
}

StatusOr<int64_t> SqliteStateStore::PruneFinalInstances(std::string_view service, int keep) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(db_.Run("prune instances of " + std::string(service),
                          "DELETE FROM instances WHERE service = ?1 AND state IN ('terminated', "
                          "'failed', 'lost') AND id NOT IN (SELECT id FROM instances WHERE "
                          "service = ?1 AND state IN ('terminated', 'failed', 'lost') "
                          "ORDER BY id DESC LIMIT ?2)",
                          service, keep));
  return db_.Changes();
}

StatusOr<int64_t> SqliteStateStore::PutRollout(const RolloutRecord& r) {
  std::lock_guard lock(mu_);
  std::string what = "record rollout of " + r.service;
  if (r.id == 0) {
    RETURN_IF_ERROR(db_.Run(what,
                            "INSERT INTO rollouts (service, from_revision, to_revision, strategy, "
                            "state, reason, started_ms, last_progress_ms, paused_ms, paused_at_ms, "
                            "finished_ms, promoted, seen_new_available, seen_old_total) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            r.service, r.from_revision, r.to_revision, StrategyName(r.strategy),
                            RolloutStateName(r.state), r.reason, r.started_ms, r.last_progress_ms,
                            r.paused_ms, r.paused_at_ms, r.finished_ms, r.promoted,
                            r.seen_new_available, r.seen_old_total));
    return db_.LastInsertRowid();
  }
  RETURN_IF_ERROR(db_.Run(what,
                          "UPDATE rollouts SET state = ?, reason = ?, last_progress_ms = ?, "
                          "paused_ms = ?, paused_at_ms = ?, finished_ms = ?, promoted = ?, "
                          "seen_new_available = ?, seen_old_total = ? WHERE id = ?",
                          RolloutStateName(r.state), r.reason, r.last_progress_ms, r.paused_ms,
                          r.paused_at_ms, r.finished_ms, r.promoted, r.seen_new_available,
                          r.seen_old_total, r.id));
  if (db_.Changes() == 0)
    return NotFoundError("rollout " + std::to_string(r.id) + " does not exist");
  return r.id;
}

StatusOr<int64_t> SqliteStateStore::AppendEvent(const EventRecord& e) {
  std::lock_guard lock(mu_);
  EventRecord next = e;
  if (next.time_ms == 0) next.time_ms = NowMs();
  next.count = 1;
  next.first_ms = next.time_ms;
  const std::string kind(EventKindName(next.kind));
  if (!next.aggregate_key.empty() && options_.event_aggregation_window_ms > 0) {
    // The same thing happening again: the earlier row is replaced by one that counts both, so a
    // storm leaves one row, and a watcher sees the repeat as a new event with its count.
    static const std::string kFind =
        "SELECT seq, count, first_ms, time_ms FROM events WHERE service = ? AND aggregate_key = ? "
        "AND aggregate_key <> '' ORDER BY seq DESC LIMIT 1";  // the last term selects the index
    ASSIGN_OR_RETURN(auto* s, db_.Prepare(kFind, "find similar event"));
    s->BindAll(next.service, next.aggregate_key);
    ASSIGN_OR_RETURN(bool row, db_.Step(*s, "find similar event"));
    if (row) {
      EventRecord previous;
      previous.seq = s->Int(0);
      previous.count = s->Int(1);
      previous.first_ms = s->Int(2);
      previous.time_ms = s->Int(3);
      previous.service = next.service;
      previous.aggregate_key = next.aggregate_key;
      sqlite3_reset(s->get());
      if (AggregateRepeat(previous, options_.event_aggregation_window_ms, next)) {
        RETURN_IF_ERROR(
            db_.Run("aggregate event " + kind, "DELETE FROM events WHERE seq = ?", previous.seq));
      }
    }
  }
  RETURN_IF_ERROR(db_.Run("append event " + kind,
                          "INSERT INTO events (time_ms, kind, service, revision, instance, actor, "
                          "message, count, first_ms, aggregate_key) VALUES (?, ?, ?, ?, ?, ?, ?, "
                          "?, ?, ?)",
                          next.time_ms, kind, next.service, next.revision, next.instance,
                          next.actor, next.message, next.count, next.first_ms, next.aggregate_key));
  return db_.LastInsertRowid();
}

Status SqliteStateStore::RecordProbe(std::string_view name, bool ok, std::string_view result,
                                     int64_t time_ms) {
  std::string_view service;
  int64_t id = 0;
  if (!SplitInstanceName(name, &service, &id)) {
    return NotFoundError("instance \"" + std::string(name) + "\" is not known");
  }
  std::lock_guard lock(mu_);
  // The first failure of a failing streak is kept until a probe passes again.
  return db_.Run("record probe of " + std::string(name),
                 "UPDATE instances SET last_probe = ?1, last_probe_ok = ?2, last_probe_ms = ?3, "
                 "first_probe_failure = CASE WHEN ?2 THEN '' WHEN probe_failing_since_ms = 0 THEN "
                 "?1 ELSE first_probe_failure END, "
                 "probe_failing_since_ms = CASE WHEN ?2 THEN 0 WHEN probe_failing_since_ms = 0 "
                 "THEN ?3 ELSE probe_failing_since_ms END WHERE id = ?4",
                 result, ok, time_ms, id);
}

StatusOr<int64_t> SqliteStateStore::PruneEvents(int64_t keep) {
  std::lock_guard lock(mu_);
  int64_t deleted = 0;
  // The rows and the watermark go together (a nested call joins the caller's transaction).
  RETURN_IF_ERROR(Transaction([&]() -> Status {
    ASSIGN_OR_RETURN(
        auto cutoff,
        db_.QueryInt("prune events", "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?",
                     keep));
    if (!cutoff) return Status::Ok();
    RETURN_IF_ERROR(db_.Run("prune events", "DELETE FROM events WHERE seq <= ?", *cutoff));
    deleted = db_.Changes();
    return db_.Run("prune events", "UPDATE events_pruned SET through_seq = max(through_seq, ?)",
                   *cutoff);
  }));
  return deleted;
}

}  // namespace kiln
