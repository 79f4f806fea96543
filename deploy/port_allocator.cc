#include "deploy/port_allocator.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include "common/unique_fd.h"

namespace kiln {

PortAllocator::PortAllocator(int first, int last) : first_(first), last_(last), next_(first) {}

bool PortIsFree(int port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return false;
  // SO_REUSEADDR: a port whose last user's connections linger in TIME_WAIT is free to listen on.
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  return ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
}

StatusOr<int> PortAllocator::Allocate() {
  const int size = last_ - first_ + 1;
  for (int i = 0; i < size; ++i) {
    int port = next_;
    next_ = next_ == last_ ? first_ : next_ + 1;
    if (used_.count(port) || !PortIsFree(port)) continue;
    used_.insert(port);
    return port;
  }
  return ResourceExhaustedError("no free port in " + std::to_string(first_) + "-" +
                                std::to_string(last_) + " (" + std::to_string(used_.size()) +
                                " held by instances, the rest in use by other programs)");
}

}  // namespace kiln
