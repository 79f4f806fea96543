#include "common/logging.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>

namespace kiln {
namespace {

std::atomic<LogFormat> g_format{LogFormat::kText};

spdlog::level::level_enum ToSpd(LogLevel l) {
  switch (l) {
    case LogLevel::kTrace:
      return spdlog::level::trace;
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarn:
      return spdlog::level::warn;
    case LogLevel::kError:
      return spdlog::level::err;
    case LogLevel::kOff:
      return spdlog::level::off;
  }
  return spdlog::level::info;
}

void AppendJsonString(std::string& out, std::string_view s) {
  out.push_back('"');
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

// Text values are quoted only when they would not read back as one token.
void AppendTextValue(std::string& out, std::string_view v) {
  bool plain = !v.empty();
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || static_cast<unsigned char>(c) < 0x20) plain = false;
  }
  if (plain) {
    out += v;
  } else {
    AppendJsonString(out, v);
  }
}

}  // namespace

StatusOr<LogLevel> ParseLogLevel(std::string_view s) {
  if (s == "trace") return LogLevel::kTrace;
  if (s == "debug") return LogLevel::kDebug;
  if (s == "info") return LogLevel::kInfo;
  if (s == "warn" || s == "warning") return LogLevel::kWarn;
  if (s == "error") return LogLevel::kError;
  if (s == "off") return LogLevel::kOff;
  return InvalidArgumentError(
      "log level must be one of trace, debug, info, warn, error, off; got \"" + std::string(s) +
      "\"");
}

StatusOr<LogFormat> ParseLogFormat(std::string_view s) {
  if (s == "text") return LogFormat::kText;
  if (s == "json") return LogFormat::kJson;
  return InvalidArgumentError("log format must be text or json; got \"" + std::string(s) + "\"");
}

void SetupLogging(LogFormat format, LogLevel level) {
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("kiln", sink);
  if (format == LogFormat::kJson) {
    logger->set_pattern(R"({"ts":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l",%v})",
                        spdlog::pattern_time_type::utc);
  } else {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %-5l %v", spdlog::pattern_time_type::utc);
  }
  logger->set_level(ToSpd(level));
  logger->flush_on(spdlog::level::info);
  g_format = format;
  spdlog::set_default_logger(std::move(logger));
}

std::string FormatLogPayload(LogFormat format, std::string_view msg, LogFields fields) {
  std::string out;
  if (format == LogFormat::kJson) {
    out += "\"msg\":";
    AppendJsonString(out, msg);
    for (const LogField& f : fields) {
      out.push_back(',');
      AppendJsonString(out, f.key);
      out.push_back(':');
      if (f.is_number) {
        out += f.value;
      } else {
        AppendJsonString(out, f.value);
      }
    }
  } else {
    out += msg;
    for (const LogField& f : fields) {
      out.push_back(' ');
      out += f.key;
      out.push_back('=');
      AppendTextValue(out, f.value);
    }
  }
  return out;
}

void Log(LogLevel level, std::string_view msg, LogFields fields) {
  auto spd = ToSpd(level);
  auto* logger = spdlog::default_logger_raw();
  if (!logger->should_log(spd)) return;
  logger->log(spd, "{}", FormatLogPayload(g_format.load(), msg, fields));
}

}  // namespace kiln
