#pragma once

// Thin RAII over the SQLite C API: a connection, prepared statements cached per SQL text,
// typed binding, and errors as Status values that name the database path.

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/status.h"

namespace kiln::sqlite {

// Maps an SQLite result code to a Status: "<path>: <what>: <sqlite message>".
// BUSY/LOCKED -> UNAVAILABLE, FULL -> RESOURCE_EXHAUSTED, READONLY/PERM/CANTOPEN ->
// PERMISSION_DENIED, NOTADB/CORRUPT -> DATA_LOSS, CONSTRAINT -> FAILED_PRECONDITION.
Status ErrorStatus(int rc, std::string_view path, std::string_view what, std::string_view detail);

class Statement {
 public:
  Statement() = default;
  explicit Statement(sqlite3_stmt* s) : stmt_(s) {}
  sqlite3_stmt* get() const { return stmt_.get(); }

  // Binding is 1-based, as in SQLite. Strings are copied (SQLITE_TRANSIENT).
  void Bind(int i, int64_t v) { sqlite3_bind_int64(get(), i, v); }
  void Bind(int i, int v) { sqlite3_bind_int64(get(), i, v); }
  void Bind(int i, bool v) { sqlite3_bind_int64(get(), i, v ? 1 : 0); }
  void Bind(int i, std::string_view v) {
    sqlite3_bind_text(get(), i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void Bind(int i, const std::string& v) { Bind(i, std::string_view(v)); }
  void Bind(int i, const char* v) { Bind(i, std::string_view(v)); }
  void Bind(int i, std::nullopt_t) { sqlite3_bind_null(get(), i); }
  template <typename T>
  void Bind(int i, const std::optional<T>& v) {
    if (v)
      Bind(i, *v);
    else
      Bind(i, std::nullopt);
  }
  template <typename... Args>
  void BindAll(const Args&... args) {
    int i = 0;
    (Bind(++i, args), ...);
  }

  int64_t Int(int col) const { return sqlite3_column_int64(get(), col); }
  bool IsNull(int col) const { return sqlite3_column_type(get(), col) == SQLITE_NULL; }
  std::string Text(int col) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(get(), col));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(get(), col)))
             : std::string();
  }

 private:
  struct Finalizer {
    void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
  };
  std::unique_ptr<sqlite3_stmt, Finalizer> stmt_;
};

// One connection. Not thread-safe: the owner serialises use (see the callers' mutexes).
class Database {
 public:
  // Opens (and with `create`, creates) the file. Nothing is written to it here; a file that is not
  // a database fails in Validate(), before any write.
  static StatusOr<Database> Open(const std::string& path, bool read_only, bool create);

  Database(Database&&) noexcept = default;
  Database& operator=(Database&&) noexcept = default;

  const std::string& path() const { return path_; }
  sqlite3* raw() const { return db_.get(); }

  // Runs one or more statements without results (schema, pragmas, BEGIN/COMMIT).
  Status Exec(std::string_view sql);

  // Returns the cached prepared statement for `sql`, reset and with bindings cleared. `what`
  // names the operation in errors.
  StatusOr<Statement*> Prepare(const std::string& sql, std::string_view what = "prepare statement");

  // Steps a statement: true when a row is ready, false when done.
  StatusOr<bool> Step(Statement& stmt, std::string_view what);

  // Runs `sql` with `args` and returns the first column of the first row (or nullopt).
  // `what` names the operation in errors ("append event").
  template <typename... Args>
  StatusOr<std::optional<int64_t>> QueryInt(std::string_view what, const std::string& sql,
                                            const Args&... args) {
    ASSIGN_OR_RETURN(Statement * s, Prepare(sql, what));
    s->BindAll(args...);
    ASSIGN_OR_RETURN(bool row, Step(*s, what));
    if (!row) return std::optional<int64_t>();
    std::optional<int64_t> v = s->Int(0);
    sqlite3_reset(s->get());
    return v;
  }

  // Runs a statement that returns no rows.
  template <typename... Args>
  Status Run(std::string_view what, const std::string& sql, const Args&... args) {
    ASSIGN_OR_RETURN(Statement * s, Prepare(sql, what));
    s->BindAll(args...);
    ASSIGN_OR_RETURN(bool row, Step(*s, what));
    if (row) sqlite3_reset(s->get());
    return Status::Ok();
  }

  int64_t Changes() const { return sqlite3_changes64(raw()); }
  int64_t LastInsertRowid() const { return sqlite3_last_insert_rowid(raw()); }

  Status Error(int rc, std::string_view what) const;
  // How many SQLite calls on this connection have failed (Error() counts them): tells a failure
  // of the database itself from one a caller returned inside a transaction.
  uint64_t failures() const { return failures_; }

 private:
  struct Closer {
    void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
  };
  Database(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}

  std::string path_;
  std::unique_ptr<sqlite3, Closer> db_;
  std::unordered_map<std::string, Statement> cache_;
  mutable uint64_t failures_ = 0;
};

}  // namespace kiln::sqlite
