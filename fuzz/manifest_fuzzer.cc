// libFuzzer target: one manifest file's bytes through ParseManifest, the code kilnd and
// `kilnctl validate` run on every file (UTF-8 and size checks, the bounded YAML reader, every
// field's validation), then what the daemon does next with a result: spec JSON, template hash,
// desired set. Besides crashes, leaks, timeouts and memory (libFuzzer and the sanitizers), it
// checks what users rely on and aborts when it does not hold:
//  - every error can be written as JSON (`kilnctl validate -o json`, events) and names the file;
//  - a loaded service survives the store's JSON round trip unchanged;
//  - a loaded template stays within the documented limit.
// Artifacts are not read: the hasher answers a fixed digest, so pins of "a" * 64 load.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "common/limits.h"
#include "spec/desired_set.h"
#include "spec/manifest.h"

namespace {

[[noreturn]] void Violated(const char* what, const std::string& detail) {
  std::fprintf(stderr, "manifest_fuzzer: %s: %s\n", what, detail.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = "/fuzz/manifests/service.yaml";
  const std::string text(reinterpret_cast<const char*>(data), size);
  const kiln::ArtifactHasher hasher =
      [](const std::filesystem::path&) -> kiln::StatusOr<std::string> {
    return std::string(64, 'a');
  };
  kiln::ManifestFile file = kiln::ParseManifest(path, text, hasher);

  if (!file.ok() && !file.services.empty()) Violated("services from a file in error", path);
  if (file.errors.size() > kiln::kMaxManifestErrorsPerFile + 1) {
    Violated("too many errors", std::to_string(file.errors.size()));
  }
  for (const kiln::ManifestError& e : file.errors) {
    if (e.file != path) Violated("error names another file", e.file);
    nlohmann::json j = {{"file", e.file},    {"line", e.line},       {"column", e.column},
                        {"key", e.key_path}, {"message", e.message}, {"error", e.ToString()}};
    (void)j.dump();  // throws (and so aborts) on bytes that are not UTF-8
  }
  for (const kiln::ServiceSpec& s : file.services) {
    const std::string json = kiln::ServiceSpecToJson(s);
    kiln::StatusOr<kiln::ServiceSpec> back = kiln::ServiceSpecFromJson(json);
    if (!back.ok()) Violated("stored spec does not read back", back.status().ToString());
    if (kiln::ServiceSpecToJson(*back) != json) Violated("stored spec changes on reading", json);
    if (!(back->tmpl == s.tmpl)) Violated("template changes on reading", json);
    if (s.tmpl.Canonical().size() > kiln::kMaxTemplateBytes) Violated("template too large", s.name);
  }

  kiln::ManifestSet set;
  set.dir = "/fuzz/manifests";
  set.files.push_back(std::move(file));
  kiln::DesiredSet desired;
  kiln::DesiredSet::Update update = desired.Apply(set);
  for (const std::string& e : update.errors) (void)nlohmann::json(e).dump();
  return 0;
}
