#include "common/unique_fd.h"

#include <cerrno>
#include <cstring>

namespace kiln {

Status ErrnoError(int err, std::string what) {
  StatusCode code;
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      code = StatusCode::kNotFound;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      code = StatusCode::kPermissionDenied;
      break;
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
      code = StatusCode::kResourceExhausted;
      break;
    case EEXIST:
      code = StatusCode::kAlreadyExists;
      break;
    case EINVAL:
    case EISDIR:
      code = StatusCode::kInvalidArgument;
      break;
    case EAGAIN:
    case EBUSY:
      code = StatusCode::kUnavailable;
      break;
    default:
      code = StatusCode::kInternal;
      break;
  }
  what += ": ";
  what += std::strerror(err);
  return Status(code, std::move(what));
}

}  // namespace kiln
