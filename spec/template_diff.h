#pragma once

// Field-level differences between two templates or two service specs, for `kilnctl diff` (two
// revisions) and `kilnctl plan -f` (a manifest against what runs). Pure: no I/O. Fields are named
// by their manifest key paths ("version", "env.LOG_LEVEL", "health.http.path", "update.max_surge")
// and listed in a stable order: the manifest's field order, then map keys alphabetically.

#include <optional>
#include <string>
#include <vector>

#include "spec/manifest.h"
#include "spec/template.h"

namespace kiln {

struct FieldChange {
  std::string path;                      // "env.LOG_LEVEL"
  std::optional<std::string> old_value;  // nullopt: the field is added
  std::optional<std::string> new_value;  // nullopt: the field is removed

  bool added() const { return !old_value.has_value(); }
  bool removed() const { return !new_value.has_value(); }
  // "version: 1.4.2 → 1.5.0", "env.NEW: (unset) → x", "env.OLD: y → (unset)".
  std::string ToString() const;

  friend bool operator==(const FieldChange&, const FieldChange&) = default;
};

// What differs between the templates `from` and `to` (what replaces instances).
std::vector<FieldChange> DiffTemplates(const Template& from, const Template& to);

// What differs between two specs of a service: the template's fields, then replicas, update,
// history_limit and expose (which replace nothing). Where each is declared is not compared.
std::vector<FieldChange> DiffServiceSpecs(const ServiceSpec& from, const ServiceSpec& to);

// A value as the diff shows it: plain when it is a non-empty run of printable characters without
// spaces, else JSON-quoted ("", "a b", "tab\t"); a list as [a, b].
std::string DiffValue(std::string_view value);

}  // namespace kiln
