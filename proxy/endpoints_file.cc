#include "proxy/endpoints_file.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "common/atomic_file.h"
#include "common/regular_file.h"
#include "common/unique_fd.h"

namespace kiln {
namespace fs = std::filesystem;

StatusOr<v1::EndpointsSnapshot> ReadEndpointsFile(const fs::path& path) {
  const std::string what = "endpoints file " + path.string();
  StatusOr<std::string> text = ReadRegularFile(path, kMaxEndpointsFileBytes, what);
  if (!text.ok()) return text.status();
  v1::EndpointsSnapshot snapshot;
  google::protobuf::util::JsonParseOptions options;
  // A file written by a newer kiln-proxy (a downgrade) still gives the pools it knows.
  options.ignore_unknown_fields = true;
  auto parsed = google::protobuf::util::JsonStringToMessage(*text, &snapshot, options);
  if (!parsed.ok()) {
    const auto message = parsed.message();
    return DataLossError(what + ": not an EndpointsSnapshot in proto JSON: " +
                         std::string(message.data(), message.size()));
  }
  return snapshot;
}

Status WriteEndpointsFile(const fs::path& path, const v1::EndpointsSnapshot& snapshot) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;  // the names of kiln.proto, as a reader expects
  options.add_whitespace = true;
  auto printed = google::protobuf::util::MessageToJsonString(snapshot, &text, options);
  if (!printed.ok()) {
    const auto message = printed.message();
    return InternalError("cannot encode the endpoints snapshot: " +
                         std::string(message.data(), message.size()));
  }
  return WriteFileAtomically(path, text, Durability::kSynced);
}

}  // namespace kiln
