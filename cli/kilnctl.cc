#include "cli/kilnctl.h"

#include <CLI/CLI.hpp>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "controller/manifest.h"
#include "kiln/version.h"

namespace kiln {
namespace {

// Prints rows as aligned columns: the width of each column is its widest cell.
void PrintTable(std::ostream& out, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()));
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out << line << "\n";
  }
}

int Validate(const std::string& dir, const std::string& output, std::ostream& out,
             std::ostream& err) {
  ManifestSet set = LoadManifestDir(dir);
  std::vector<ManifestError> errors = set.AllErrors();
  if (output == "json") {
    nlohmann::json j = {{"dir", dir}, {"services", nlohmann::json::array()},
                        {"errors", nlohmann::json::array()}};
    for (const ServiceSpec* s : set.Services()) {
      j["services"].push_back({{"name", s->name},
                               {"version", s->tmpl.version},
                               {"replicas", s->replicas},
                               {"strategy", StrategyName(s->update.strategy)},
                               {"template_hash", s->tmpl.Hash()},
                               {"file", s->file},
                               {"line", s->line}});
    }
    for (const ManifestError& e : errors) {
      j["errors"].push_back({{"file", e.file},
                             {"line", e.line},
                             {"column", e.column},
                             {"key", e.key_path},
                             {"message", e.message},
                             {"error", e.ToString()}});
    }
    out << j.dump(2) << "\n";
    return errors.empty() ? 0 : 1;
  }

  std::vector<std::vector<std::string>> rows = {
      {"SERVICE", "VERSION", "REPLICAS", "STRATEGY", "TEMPLATE HASH", "FILE"}};
  for (const ServiceSpec* s : set.Services()) {
    rows.push_back({s->name, s->tmpl.version, std::to_string(s->replicas),
                    std::string(StrategyName(s->update.strategy)), s->tmpl.Hash(),
                    s->file + ":" + std::to_string(s->line)});
  }
  if (rows.size() > 1) PrintTable(out, rows);
  for (const ManifestError& e : errors) err << e.ToString() << "\n";
  if (!errors.empty()) {
    size_t bad_files = set.dir_errors.empty() ? 0 : 1;
    for (const ManifestFile& f : set.files) bad_files += f.ok() ? 0 : 1;
    err << "kilnctl: " << errors.size() << (errors.size() == 1 ? " error" : " errors") << " in "
        << bad_files << (bad_files == 1 ? " place" : " places") << "; manifests in " << dir
        << " are not valid\n";
    return 1;
  }
  if (rows.size() == 1) out << "no services in " << dir << "\n";
  return 0;
}

}  // namespace

int RunKilnctl(int argc, char** argv, std::ostream& out, std::ostream& err) {
  CLI::App app("kilnctl: the command-line client of kilnd", "kilnctl");
  app.set_version_flag("--version", std::string("kilnctl ") + kVersion);
  app.require_subcommand(1);
  std::string output = "table";
  app.add_option("-o,--output", output, "output format: table or json")
      ->check(CLI::IsMember({"table", "json"}));

  std::string validate_dir;
  CLI::App* validate = app.add_subcommand(
      "validate", "check a manifest directory without a daemon: every service with its template "
                  "hash, or every error; exits 1 on any error");
  validate->add_option("DIR", validate_dir, "manifest directory")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    out << app.help();
    return 0;
  } catch (const CLI::CallForVersion&) {
    out << "kilnctl " << kVersion << "\n";
    return 0;
  } catch (const CLI::ParseError& e) {
    err << "kilnctl: " << e.what() << "\n\n" << app.help();
    return 2;
  }
  if (validate->parsed()) return Validate(validate_dir, output, out, err);
  err << app.help();
  return 2;
}

}  // namespace kiln
