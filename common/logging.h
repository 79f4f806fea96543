#pragma once

// Structured logging over spdlog. Every line carries key=value fields (service, revision,
// instance, ...) so a human can read the text form and a log pipeline can parse the JSON form:
//
//   kiln::LogInfo("instance started", {{"service", "web"}, {"revision", 3}, {"instance", id}});
//
// text: 2026-11-25T12:00:00.123Z info instance started service=web revision=3 instance=web-7
// json: {"ts":"2026-11-25T12:00:00.123Z","level":"info","msg":"instance
// started","service":"web",...}

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kiln {

enum class LogLevel { kTrace, kDebug, kInfo, kWarn, kError, kOff };
enum class LogFormat { kText, kJson };

// One structured field. Numbers stay numbers in JSON.
struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v) {}
  LogField(std::string_view k, const std::string& v) : key(k), value(v) {}
  LogField(std::string_view k, const char* v) : key(k), value(v) {}
  LogField(std::string_view k, int64_t v) : key(k), value(std::to_string(v)), is_number(true) {}
  LogField(std::string_view k, int v) : LogField(k, static_cast<int64_t>(v)) {}
  LogField(std::string_view k, uint64_t v) : key(k), value(std::to_string(v)), is_number(true) {}
  LogField(std::string_view k, bool v) : key(k), value(v ? "true" : "false"), is_number(true) {}

  std::string_view key;
  std::string value;
  bool is_number = false;
};
using LogFields = std::initializer_list<LogField>;

StatusOr<LogLevel> ParseLogLevel(std::string_view s);    // trace|debug|info|warn|error|off
StatusOr<LogFormat> ParseLogFormat(std::string_view s);  // text|json

// Installs the process-wide logger writing to stderr. Safe to call more than once.
void SetupLogging(LogFormat format, LogLevel level);

void Log(LogLevel level, std::string_view msg, LogFields fields = {});
inline void LogDebug(std::string_view m, LogFields f = {}) { Log(LogLevel::kDebug, m, f); }
inline void LogInfo(std::string_view m, LogFields f = {}) { Log(LogLevel::kInfo, m, f); }
inline void LogWarn(std::string_view m, LogFields f = {}) { Log(LogLevel::kWarn, m, f); }
inline void LogError(std::string_view m, LogFields f = {}) { Log(LogLevel::kError, m, f); }

// The payload part of a line (message and fields), exposed for tests.
std::string FormatLogPayload(LogFormat format, std::string_view msg, LogFields fields);

}  // namespace kiln
