#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/clock.h"
#include "storage/sqlite.h"
#include "storage/state_store.h"

namespace kiln {

// StateStore on one SQLite file (DESIGN.md "State"): WAL, synchronous=FULL, foreign keys,
// a busy timeout, migrations by PRAGMA user_version, marked as Kiln's by PRAGMA application_id.
class SqliteStateStore final : public StateStore {
 public:
  // PRAGMA application_id of every Kiln state database: "KILN" in ASCII.
  static constexpr int32_t kApplicationId = 0x4B494C4E;

  struct Options {
    std::string path;              // e.g. STATE/kiln.db
    const Clock* clock = nullptr;  // required; timestamps of rows and events
    int busy_timeout_ms = 5000;
    bool read_only = false;  // a reader: no migrations, every write refused by SQLite
    std::function<void(double seconds)> on_commit;  // duration of each committed transaction
    // An event with an aggregate key that repeats the service's last one with that key within
    // this window replaces it, counted (0: never aggregate).
    int64_t event_aggregation_window_ms = int64_t{10} * 60 * 1000;
  };

  // Opens or creates the database and migrates it to the current schema. What it opens:
  //  - a new or empty file (application_id 0, no tables): initialised and marked as Kiln's;
  //  - a file marked as Kiln's (application_id kApplicationId);
  //  - a Kiln database from before the mark (application_id 0, user_version >= 1, only Kiln's
  //    tables): marked, once, then migrated.
  // Anything else (another program's database, a file that is not a database, a schema newer
  // than this build knows) fails with a message naming the path and what it holds, before any
  // byte of the file is written: its journal mode and contents stay as they were.
  static StatusOr<std::unique_ptr<SqliteStateStore>> Open(const Options& options);

  // A reader on its own connection to the same file, for the API and HTTP servers.
  StatusOr<std::unique_ptr<StateReader>> OpenReader() const;

  const std::string& path() const { return db_.path(); }

  // The schema version this build writes.
  static int CurrentSchemaVersion();

  // The error of the last write transaction when SQLite itself refused it (full disk, I/O
  // error, busy); OK once one commits again. For readiness: whether the store takes writes.
  Status WriteFailure() const {
    std::lock_guard lock(mu_);
    return write_failure_;
  }

  // Runs raw SQL on this connection (PRAGMA max_page_count to simulate a full disk, ...).
  Status ExecForTest(std::string_view sql);

  // StateReader
  Status Snapshot(const std::function<Status()>& fn) override;
  StatusOr<std::vector<ServiceRecord>> ListServices() override;
  StatusOr<ServiceRecord> GetService(std::string_view name) override;
  StatusOr<std::vector<RevisionRecord>> ListRevisions(std::string_view service) override;
  StatusOr<RevisionRecord> GetRevision(std::string_view service, int64_t number) override;
  StatusOr<std::vector<InstanceRecord>> ListInstances(std::string_view service,
                                                      bool include_final) override;
  StatusOr<std::vector<InstanceRecord>> ListLiveInstances() override;
  StatusOr<InstanceRecord> GetInstance(std::string_view name) override;
  StatusOr<RolloutRecord> GetLatestRollout(std::string_view service) override;
  StatusOr<std::vector<EventRecord>> ReadEvents(const EventQuery& q) override;
  StatusOr<int64_t> OldestEventSeq() override;
  StatusOr<int64_t> LatestEventSeq() override;
  StatusOr<std::vector<InstanceCount>> CountInstances() override;

  // StateStore
  Status Transaction(const std::function<Status()>& fn) override;
  void AfterCommit(std::function<void()> fn) override;
  Status PutService(const ServiceRecord& s) override;
  Status WriteRevision(const RevisionRecord& r) override;
  StatusOr<int64_t> NextRevisionNumber(std::string_view service) override;
  Status MarkRevisionAvailable(std::string_view service, int64_t number, int64_t time_ms) override;
  Status DeleteRevision(std::string_view service, int64_t number) override;
  StatusOr<InstanceRecord> CreateInstance(std::string_view service, int64_t revision) override;
  StatusOr<InstanceRecord> TransitionInstance(std::string_view name, InstanceState to,
                                              const InstanceUpdate& update) override;
  Status RequestReplacement(std::string_view name, std::string_view reason) override;
  StatusOr<int64_t> DeleteFinalInstancesOf(std::string_view service, int64_t revision) override;
  StatusOr<int64_t> PruneFinalInstances(std::string_view service, int keep) override;
  StatusOr<int64_t> PutRollout(const RolloutRecord& r) override;
  StatusOr<int64_t> AppendEvent(const EventRecord& e) override;
  StatusOr<int64_t> PruneEvents(int64_t keep) override;
  Status RecordProbe(std::string_view name, bool ok, std::string_view result,
                     int64_t time_ms) override;

 private:
  SqliteStateStore(sqlite::Database db, Options options)
      : db_(std::move(db)), options_(std::move(options)) {}

  // Refuses a database that is not Kiln's (see Open); reads only.
  Status CheckOwnership();
  Status Configure();
  Status Migrate();
  int64_t NowMs() const;
  StatusOr<std::vector<InstanceRecord>> QueryInstances(const std::string& sql,
                                                       std::string_view what,
                                                       std::string_view service);

  // Guards db_ and tx_depth_. Recursive because Snapshot/Transaction callbacks call the other
  // methods on the same thread.
  mutable std::recursive_mutex mu_;
  Status write_failure_;  // guarded by mu_
  sqlite::Database db_;
  Options options_;
  int tx_depth_ = 0;
  std::vector<std::function<void()>> after_commit_;  // guarded by mu_
};

// Creates a database at `path` with the schema as migrations 1..version made it (no later
// ones), to test that Open migrates old databases.
Status CreateDatabaseAtSchemaVersionForTest(const std::string& path, int version);

}  // namespace kiln
