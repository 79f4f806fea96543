#pragma once

// Manifests (DESIGN.md "Manifests", "Update policy"): a directory of YAML files, each holding one
// or more service documents, loaded into validated ServiceSpecs with defaults applied. Every
// error names file, line, column and key path; all errors of a directory are reported.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/status.h"
#include "spec/template.h"

namespace kiln {

// A count ("1") or a percentage of replicas ("25%").
struct CountOrPercent {
  int value = 0;
  bool percent = false;

  // Percentages of `replicas` round up (surge) or down (unavailable), as Kubernetes does.
  int Resolve(int replicas, bool round_up) const;
  std::string ToString() const;
  friend bool operator==(const CountOrPercent&, const CountOrPercent&) = default;
};

enum class Strategy { kRolling, kRecreate, kBlueGreen, kCanary };
std::string_view StrategyName(Strategy s);  // "rolling", "recreate", "blue-green", "canary"
std::optional<Strategy> ParseStrategy(std::string_view name);  // nullopt for any other name

struct UpdatePolicy {
  Strategy strategy = Strategy::kRolling;
  CountOrPercent max_surge{25, true};
  CountOrPercent max_unavailable{0, false};
  Duration min_healthy_time{0};
  Duration healthy_deadline{60'000};
  Duration progress_deadline{600'000};
  bool auto_rollback = true;
  int canary = 1;
  bool auto_promote = false;
  friend bool operator==(const UpdatePolicy&, const UpdatePolicy&) = default;
};

// A stable address for the service: kiln-proxy listens on listen_host:port and sends each new
// connection to an available instance; an instance that leaves the pool has `drain` for its
// open connections before it is stopped. Not part of the template: changing it replaces nothing.
struct ExposeSpec {
  std::string listen_host = "127.0.0.1";  // an IP address literal; 0.0.0.0 or :: for every one
  int port = 0;
  Duration drain{10'000};
  // Where the address was written (expose.port or expose.listen), for errors across files.
  int line = 0;
  int column = 0;

  friend bool operator==(const ExposeSpec&, const ExposeSpec&) = default;
};

struct ServiceSpec {
  std::string name;
  int replicas = 1;
  std::string artifact_path;  // resolved against the manifest's folder; "" for image services
  std::string artifact_pin;   // the manifest's artifact.sha256, "" when not pinned
  Template tmpl;
  UpdatePolicy update;
  int history_limit = 10;
  std::optional<ExposeSpec> expose;

  // Where it was declared: the document's `name:` value.
  std::string file;
  int line = 0;
  int column = 0;
};

// The whole spec as JSON, to keep the last good desired state in the store across restarts.
std::string ServiceSpecToJson(const ServiceSpec& s);
StatusOr<ServiceSpec> ServiceSpecFromJson(std::string_view json);

struct ManifestError {
  std::string file;
  int line = 0;          // 1-based; 0 when the error is about the whole file
  int column = 0;        // 1-based
  std::string key_path;  // "update.max_surge", "command[1]"; "" when about the document or file
  std::string message;

  // "web.yaml:12:5: update.max_surge: expected a count or a percentage, got \"lots\""
  std::string ToString() const;
};

// The git commit that last changed a manifest file, when its directory is in a git work tree
// (or checked out from `--manifests git+...`).
struct SourceCommit {
  std::string id;       // full hex object id; "" when no commit has the file (new, untracked)
  std::string author;   // "Name <email>"
  int64_t time_ms = 0;  // author time, Unix milliseconds
  std::string subject;  // the message's first line
  bool dirty = false;   // the file had uncommitted changes (or is not committed at all)
  friend bool operator==(const SourceCommit&, const SourceCommit&) = default;
};

struct ManifestFile {
  std::string path;
  std::string sha256;                 // of the file's bytes, "" when unreadable
  std::vector<ServiceSpec> services;  // empty when the file has errors: it is all or nothing
  std::vector<ManifestError> errors;
  // Every service name the file declares, with where, even when the file has errors: the
  // services whose last good desired state must be kept while the file is broken.
  struct Declared {
    std::string name;
    int line = 0;
    int column = 0;
  };
  std::vector<Declared> declared;
  // Filled in after loading when the directory is in a git work tree and the commit was found.
  std::optional<SourceCommit> commit;
  bool ok() const { return errors.empty(); }
};

struct ManifestSet {
  std::string dir;
  // Errors about the directory itself (missing, unreadable). Such a set must not be taken to
  // mean "no services".
  std::vector<ManifestError> dir_errors;
  std::vector<ManifestFile> files;  // sorted by path
  // With `--manifests git+...`: the commit checked out ("1a2b3c4d5e6f \"subject\""), named in the
  // errors that keep services at their last good state. "" for a plain directory.
  std::string source_commit;

  bool ok() const;
  std::vector<ManifestError> AllErrors() const;
  // Services of the files without errors, sorted by name.
  std::vector<const ServiceSpec*> Services() const;
};

// Returns the hex SHA-256 of an artifact file; errors name the path. The daemon passes a caching
// one; the default reads the file.
using ArtifactHasher = std::function<StatusOr<std::string>(const std::filesystem::path&)>;

// Parses one manifest file's text. `path` is used for resolving artifacts and in errors.
ManifestFile ParseManifest(const std::string& path, const std::string& text,
                           const ArtifactHasher& hasher);

// Loads every *.yaml / *.yml file directly in `dir` (not recursive; hidden files and editor
// temporaries are skipped), then reports duplicate service names at each place they occur.
ManifestSet LoadManifestDir(const std::filesystem::path& dir, const ArtifactHasher& hasher = {});

// One manifest file's name and bytes, as a client sends them (`kilnctl plan -f`).
struct ManifestText {
  std::string path;
  std::string text;
};

// Parses files given with their contents by LoadManifestDir's rules (each file on its own, then a
// name or an address declared twice); `dir` is only recorded. Files are sorted by path.
ManifestSet ParseManifestFiles(std::string dir, const std::vector<ManifestText>& files,
                               const ArtifactHasher& hasher = {});

// An error at each `expose:` whose port is in [first, last] (kilnd's --port-range: an instance
// may be given that port); the files with one apply none of their services, like any error.
void RejectExposedPortsIn(ManifestSet& set, int first, int last);

// True for the names LoadManifestDir reads: "*.yaml" or "*.yml", not hidden, not an editor's
// temporary ("#web.yaml#", ".web.yaml.swp", "web.yaml~").
bool IsManifestFileName(std::string_view file_name);

}  // namespace kiln
