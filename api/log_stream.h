#pragma once

// What StreamLogs serves: the log readers of the instances a request names (one instance, or
// every instance of a service that has a row, live or final), kept up to date as instances come.

#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "deploy/instance_logs.h"
#include "kiln/v1/kiln.pb.h"
#include "storage/state_store.h"

namespace kiln {

class LogFanIn {
 public:
  // A message carries at most about this many bytes of lines.
  static constexpr size_t kMaxBatchBytes = size_t{256} * 1024;

  LogFanIn(std::filesystem::path log_dir, const v1::StreamLogsRequest& request);

  // Reads which instances the request names now: the first call resolves the name (an instance
  // id first, then a service; NOT_FOUND for neither), later ones add the instances that started
  // since (read from their first line) and note which ones are over.
  Status Refresh(StateReader& reader);

  size_t size() const { return sources_.size(); }
  // Lines of source `i` ready now, up to kMaxBatchBytes, appended to `out`; false when none.
  // `to_end`: also a last line without its newline (nothing is following it).
  bool Read(size_t i, bool to_end, v1::LogLines* out);

 private:
  struct Source {
    std::string instance;
    int64_t revision = 0;
    bool final = false;  // the instance is over: its log will not grow
    std::unique_ptr<LogReader> reader;
  };

  std::filesystem::path log_dir_;
  v1::StreamLogsRequest request_;
  bool resolved_ = false;
  std::string service_;  // empty: one instance
  std::vector<Source> sources_;
  std::set<std::string> known_;
};

}  // namespace kiln
