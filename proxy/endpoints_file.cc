#include "proxy/endpoints_file.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cerrno>
#include <string>

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
  const fs::path tmp = path.string() + ".tmp";
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) return ErrnoError(errno, "cannot write " + tmp.string());
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        Status error = ErrnoError(errno, "cannot write " + tmp.string());
        ::unlink(tmp.c_str());
        return error;
      }
      done += static_cast<size_t>(n);
    }
    if (::fsync(fd.get()) != 0) {
      Status error = ErrnoError(errno, "cannot sync " + tmp.string());
      ::unlink(tmp.c_str());
      return error;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status error = ErrnoError(errno, "cannot rename " + tmp.string() + " to " + path.string());
    ::unlink(tmp.c_str());
    return error;
  }
  // The rename itself survives a crash only once the directory is synced.
  fs::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd || ::fsync(dir_fd.get()) != 0) {
    return ErrnoError(errno, "cannot sync directory " + dir.string());
  }
  return Status::Ok();
}

}  // namespace kiln
