#include "storage/sqlite.h"

namespace kiln::sqlite {

Status ErrorStatus(int rc, std::string_view path, std::string_view what, std::string_view detail) {
  StatusCode code;
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      code = StatusCode::kUnavailable;
      break;
    case SQLITE_FULL:
      code = StatusCode::kResourceExhausted;
      break;
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_AUTH:
    case SQLITE_CANTOPEN:
      code = StatusCode::kPermissionDenied;
      break;
    case SQLITE_NOTADB:
    case SQLITE_CORRUPT:
      code = StatusCode::kDataLoss;
      break;
    case SQLITE_CONSTRAINT:
      code = StatusCode::kFailedPrecondition;
      break;
    case SQLITE_IOERR:
      code = StatusCode::kUnavailable;
      break;
    default:
      code = StatusCode::kInternal;
      break;
  }
  std::string m(path);
  m += ": ";
  m += what;
  m += ": ";
  m += detail;
  return Status(code, std::move(m));
}

StatusOr<Database> Database::Open(const std::string& path, bool read_only, bool create) {
  int flags = SQLITE_OPEN_NOMUTEX;
  flags |= read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE;
  if (create && !read_only) flags |= SQLITE_OPEN_CREATE;
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  Database db(path, raw);  // owns raw even on failure
  if (rc != SQLITE_OK) {
    return ErrorStatus(rc, path, "cannot open database",
                       raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc));
  }
  sqlite3_extended_result_codes(raw, 1);
  return db;
}

Status Database::Error(int rc, std::string_view what) const {
  ++failures_;
  return ErrorStatus(rc, path_, what, sqlite3_errmsg(raw()));
}

Status Database::Exec(std::string_view sql) {
  std::string s(sql);
  int rc = sqlite3_exec(raw(), s.c_str(), nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) return Error(rc, s.size() > 60 ? s.substr(0, 60) + "..." : s);
  return Status::Ok();
}

StatusOr<Statement*> Database::Prepare(const std::string& sql, std::string_view what) {
  auto it = cache_.find(sql);
  if (it == cache_.end()) {
    sqlite3_stmt* raw_stmt = nullptr;
    int rc = sqlite3_prepare_v3(raw(), sql.c_str(), static_cast<int>(sql.size()),
                                SQLITE_PREPARE_PERSISTENT, &raw_stmt, nullptr);
    if (rc != SQLITE_OK) return Error(rc, what);
    it = cache_.emplace(sql, Statement(raw_stmt)).first;
  }
  sqlite3_reset(it->second.get());
  sqlite3_clear_bindings(it->second.get());
  return &it->second;
}

StatusOr<bool> Database::Step(Statement& stmt, std::string_view what) {
  int rc = sqlite3_step(stmt.get());
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) {
    sqlite3_reset(stmt.get());
    return false;
  }
  Status s = Error(rc, what);
  sqlite3_reset(stmt.get());
  return s;
}

}  // namespace kiln::sqlite
