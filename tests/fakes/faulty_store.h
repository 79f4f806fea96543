#pragma once

// A StateStore decorator that makes commits fail (leveldb's SpecialEnv): the next N commits, or
// every one until Clear(), fail with SQLite busy, disk full or I/O error, as SqliteStateStore
// reports them (storage/sqlite.cc: same status codes and messages). Everything else passes
// through to the wrapped store, which stays the only one that knows the data.
//
// A commit is an outermost Transaction, or a write outside any transaction (autocommit). A busy
// database fails at BEGIN IMMEDIATE, before the transaction's function runs; a full disk and an
// I/O error fail at COMMIT, after it ran, and the wrapped store rolls its writes back.
//
// REQUIRES: used from one thread at a time, like the store it wraps.

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "storage/sqlite.h"
#include "storage/state_store.h"

namespace kiln::testing {

class FaultyStore final : public StateStore {
 public:
  enum class Fault { kBusy, kDiskFull, kIoError };
  static constexpr int kUntilCleared = -1;

  // `path` names the database in error messages, as SQLite's do.
  FaultyStore(StateStore& inner, std::string path) : inner_(inner), path_(std::move(path)) {}

  // The next `n` commits fail with `fault` (kUntilCleared: every one until Clear()).
  void FailCommits(Fault fault, int n = 1) {
    fault_ = fault;
    remaining_ = n;
  }
  void Clear() { remaining_ = 0; }
  bool armed() const { return remaining_ != 0; }
  int64_t failed_commits() const { return failed_commits_; }

  // What SqliteStateStore::WriteFailure() would report: the last injected failure until a
  // commit succeeds again.
  Status WriteFailure() const { return write_failure_; }

  // The status SqliteStateStore returns for `fault` (sqlite::ErrorStatus with SQLite's message).
  static Status StatusFor(Fault fault, const std::string& path) {
    switch (fault) {
      case Fault::kBusy:
        return sqlite::ErrorStatus(SQLITE_BUSY, path, "BEGIN IMMEDIATE",
                                   sqlite3_errstr(SQLITE_BUSY));
      case Fault::kDiskFull:
        return sqlite::ErrorStatus(SQLITE_FULL, path, "COMMIT", sqlite3_errstr(SQLITE_FULL));
      case Fault::kIoError:
        return sqlite::ErrorStatus(SQLITE_IOERR, path, "COMMIT", sqlite3_errstr(SQLITE_IOERR));
    }
    return InternalError("unknown fault");
  }

  // StateReader
  Status Snapshot(const std::function<Status()>& fn) override { return inner_.Snapshot(fn); }
  StatusOr<std::vector<ServiceRecord>> ListServices() override { return inner_.ListServices(); }
  StatusOr<ServiceRecord> GetService(std::string_view name) override {
    return inner_.GetService(name);
  }
  StatusOr<std::vector<RevisionRecord>> ListRevisions(std::string_view service) override {
    return inner_.ListRevisions(service);
  }
  StatusOr<RevisionRecord> GetRevision(std::string_view service, int64_t number) override {
    return inner_.GetRevision(service, number);
  }
  StatusOr<std::vector<InstanceRecord>> ListInstances(std::string_view service,
                                                      bool include_final) override {
    return inner_.ListInstances(service, include_final);
  }
  StatusOr<std::vector<InstanceRecord>> ListLiveInstances() override {
    return inner_.ListLiveInstances();
  }
  StatusOr<InstanceRecord> GetInstance(std::string_view name) override {
    return inner_.GetInstance(name);
  }
  StatusOr<RolloutRecord> GetLatestRollout(std::string_view service) override {
    return inner_.GetLatestRollout(service);
  }
  StatusOr<std::vector<EventRecord>> ReadEvents(const EventQuery& q) override {
    return inner_.ReadEvents(q);
  }
  StatusOr<int64_t> OldestEventSeq() override { return inner_.OldestEventSeq(); }
  StatusOr<int64_t> LatestEventSeq() override { return inner_.LatestEventSeq(); }
  StatusOr<std::vector<InstanceCount>> CountInstances() override { return inner_.CountInstances(); }

  // StateStore
  Status Transaction(const std::function<Status()>& fn) override {
    if (depth_ > 0) return fn();  // joins the outer transaction
    if (remaining_ != 0 && fault_ == Fault::kBusy) return Failed(*TakeFault());
    std::optional<Fault> failed_commit;  // taken only when the commit comes
    ++depth_;
    Status s = inner_.Transaction([&]() -> Status {
      RETURN_IF_ERROR(fn());
      failed_commit = TakeFault();
      // An error makes the wrapped store roll back.
      return failed_commit ? StatusFor(*failed_commit, path_) : Status::Ok();
    });
    --depth_;
    if (failed_commit) return Failed(*failed_commit);
    if (s.ok()) write_failure_ = Status::Ok();
    return s;
  }
  void AfterCommit(std::function<void()> fn) override { inner_.AfterCommit(std::move(fn)); }
  Status PutService(const ServiceRecord& s) override {
    return Write([&] { return inner_.PutService(s); });
  }
  Status WriteRevision(const RevisionRecord& r) override {
    return Write([&] { return inner_.WriteRevision(r); });
  }
  StatusOr<int64_t> NextRevisionNumber(std::string_view service) override {
    return inner_.NextRevisionNumber(service);
  }
  Status MarkRevisionAvailable(std::string_view service, int64_t number, int64_t time_ms) override {
    return Write([&] { return inner_.MarkRevisionAvailable(service, number, time_ms); });
  }
  Status DeleteRevision(std::string_view service, int64_t number) override {
    return Write([&] { return inner_.DeleteRevision(service, number); });
  }
  StatusOr<InstanceRecord> CreateInstance(std::string_view service, int64_t revision) override {
    return Write([&] { return inner_.CreateInstance(service, revision); });
  }
  StatusOr<InstanceRecord> TransitionInstance(std::string_view name, InstanceState to,
                                              const InstanceUpdate& update) override {
    return Write([&] { return inner_.TransitionInstance(name, to, update); });
  }
  Status RequestReplacement(std::string_view name, std::string_view reason) override {
    return Write([&] { return inner_.RequestReplacement(name, reason); });
  }
  StatusOr<int64_t> DeleteFinalInstancesOf(std::string_view service, int64_t revision) override {
    return Write([&] { return inner_.DeleteFinalInstancesOf(service, revision); });
  }
  StatusOr<int64_t> PruneFinalInstances(std::string_view service, int keep) override {
    return Write([&] { return inner_.PruneFinalInstances(service, keep); });
  }
  StatusOr<int64_t> PutRollout(const RolloutRecord& r) override {
    return Write([&] { return inner_.PutRollout(r); });
  }
  StatusOr<int64_t> AppendEvent(const EventRecord& e) override {
    return Write([&] { return inner_.AppendEvent(e); });
  }
  StatusOr<int64_t> PruneEvents(int64_t keep) override {
    return Write([&] { return inner_.PruneEvents(keep); });
  }
  Status RecordProbe(std::string_view name, bool ok, std::string_view result,
                     int64_t time_ms) override {
    return Write([&] { return inner_.RecordProbe(name, ok, result, time_ms); });
  }

 private:
  std::optional<Fault> TakeFault() {
    if (remaining_ == 0) return std::nullopt;
    if (remaining_ > 0) --remaining_;
    return fault_;
  }
  Status Failed(Fault fault) {
    ++failed_commits_;
    write_failure_ = StatusFor(fault, path_);
    return write_failure_;
  }
  // A write outside a transaction is a commit of its own; inside one it joins it.
  template <typename Fn>
  auto Write(Fn fn) -> decltype(fn()) {
    if (depth_ > 0) return fn();
    if (const std::optional<Fault> fault = TakeFault()) return Failed(*fault);
    auto r = fn();
    if (r.ok()) write_failure_ = Status::Ok();
    return r;
  }

  StateStore& inner_;
  const std::string path_;
  Fault fault_ = Fault::kDiskFull;
  int remaining_ = 0;
  int depth_ = 0;
  int64_t failed_commits_ = 0;
  Status write_failure_;
};

}  // namespace kiln::testing
