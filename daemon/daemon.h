#pragma once

// kilnd as an object (Envoy's MainCommon): built from a validated config, it exposes what it
// bound, so tests run it in-process on port 0; kilnd's main is RunDaemon.

#include <filesystem>
#include <functional>
#include <memory>

#include "common/status.h"
#include "daemon/config.h"

namespace kiln {

class Daemon {
 public:
  // Checks `config` (CheckDaemonConfig, which also refuses a listener off loopback without TLS
  // and tokens) before anything else; then creates the state directory, opens the store, starts
  // start-up recovery and the first manifest load, and binds the gRPC API (STATE/kiln.sock and
  // grpc_listen) and HTTP (port 0 picks one). An error is logged as kilnd logs it, and returned.
  // REQUIRES: logging set up. Process-wide set-up (descriptors, limits) is RunDaemon's.
  static StatusOr<std::unique_ptr<Daemon>> Start(const DaemonConfig& config);
  // Stops the servers and removes STATE/kilnd.addr; instances keep running.
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Stop also on SIGTERM and SIGINT, as kilnd does (in-process tests leave the test runner's
  // signals alone). REQUIRES: before Run().
  void StopOnSignals();
  // Writes STATE/kilnd.addr, logs "kilnd ready" and runs the reconciler's event loop on the
  // calling thread until Stop() or a signal; then stops the API, removes kilnd.addr and logs
  // "kilnd stopped". Instances keep running. Call at most once.
  void Run();
  // Makes Run() return (at once if it has not begun yet). Any thread.
  void Stop();

  // Runs `fn` on the reconciler's event thread, e.g. to hold it busy. Any thread.
  void PostForTest(std::function<void()> fn);

  int http_port() const;      // 0 without HTTP
  int grpc_tcp_port() const;  // 0 without grpc_listen
  std::filesystem::path grpc_unix_socket() const;
  // STATE/kilnd.addr: {"pid":..,"grpc_unix":"..","grpc_tcp":"HOST:PORT"|null,"http":..|null},
  // written atomically by Run() once everything is bound, removed on a clean stop.
  std::filesystem::path addr_file() const;

 private:
  struct Impl;
  explicit Daemon(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// kilnd's whole main: parses flags, runs until SIGTERM/SIGINT, returns the exit code
// (0 on a clean stop or after --help/--version, 1 on a start-up error, 2 on bad usage).
int RunDaemon(int argc, char** argv);

}  // namespace kiln
