#pragma once

// The documented limits on what Kiln reads from outside (docs/manifests.md "Limits"). Every
// reader of outside bytes checks them before trusting the bytes, so no file or request can make
// kilnd use unbounded memory or time, or produce a record that the API cannot send back.

#include <cstddef>
#include <cstdint>

namespace kiln {

// A manifest file, read and parsed as a whole.
inline constexpr size_t kMaxManifestFileBytes = 1 << 20;
// Nesting of mappings and sequences; a service document needs 4.
inline constexpr int kMaxManifestDepth = 32;
// Any one scalar (key or value), before the per-field limits below.
inline constexpr size_t kMaxManifestScalarBytes = 64 << 10;
// Nodes of one file, counting each alias as a full copy of what it refers to (alias bombs).
inline constexpr size_t kMaxManifestNodes = 100'000;
// Errors reported per file; the rest are counted in one last error.
inline constexpr size_t kMaxManifestErrorsPerFile = 50;

// Keys of the manifest's own mappings (env names have their own limit below).
inline constexpr size_t kMaxKeyBytes = 128;

// Fields of a service.
inline constexpr size_t kMaxServiceNameBytes = 63;
inline constexpr size_t kMaxVersionBytes = 128;
inline constexpr size_t kMaxEnvVars = 128;
inline constexpr size_t kMaxEnvNameBytes = 128;
inline constexpr size_t kMaxEnvValueBytes = 4096;
inline constexpr size_t kMaxCommandArgs = 256;  // also health.exec
inline constexpr size_t kMaxCommandArgBytes = 4096;
inline constexpr size_t kMaxHealthPathBytes = 1024;
inline constexpr size_t kMaxImageBytes = 512;
inline constexpr size_t kMaxArtifactPathBytes = 4096;
// The template's canonical JSON: what one revision stores and the API sends for it.
inline constexpr size_t kMaxTemplateBytes = 64 << 10;

// Artifacts are hashed and copied only up to this size.
inline constexpr uint64_t kMaxArtifactBytes = uint64_t{1} << 30;

// A rollback (or other operator) reason, as the API should accept it.
inline constexpr size_t kMaxReasonBytes = 1024;

}  // namespace kiln
