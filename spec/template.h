#pragma once

// The template: everything that defines what one instance *is* (DESIGN.md "Words"). Its
// canonical serialisation is compact JSON with sorted keys and no optional formatting, so YAML key
// order, quoting, comments and whitespace never change it; its SHA-256 is the template hash.

#include <map>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/status.h"
#include "spec/health_check.h"

namespace kiln {

struct Template {
  std::string version;
  std::string artifact_sha256;  // process driver: digest of the artifact's bytes
  std::string image;            // container driver: name@sha256:...
  std::vector<std::string> command;
  std::map<std::string, std::string> env;
  int port = 0;  // container port (image services); 0 = none
  // Image services: the Docker hosts (--docker-host names) instances may run on; empty = any.
  // Part of the template: a change replaces instances under the update policy, which is how they
  // move. Serialised only when set, so templates without it keep their hash.
  std::vector<std::string> hosts;
  HealthCheck health;

  // Compact JSON, keys sorted; equal templates give equal strings.
  std::string Canonical() const;
  // Hex SHA-256 of Canonical().
  std::string Hash() const;
  // Reads what Canonical() wrote (revisions store it).
  static StatusOr<Template> FromCanonical(std::string_view json);

  friend bool operator==(const Template&, const Template&) = default;
};

}  // namespace kiln
