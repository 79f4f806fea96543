#pragma once

// The data plane's own edge-triggered epoll set, driven from an Asio io_context.
//
// Why not Asio's sockets: Asio 1.74's reactor re-arms a descriptor with an epoll_ctl(2) on every
// wait and sets O_NONBLOCK with an ioctl(2) on a socket's first operation, 9 of the 24 system
// calls a short proxied connection cost. Here each socket is added once (EPOLLIN | EPOLLOUT |
// EPOLLRDHUP, edge-triggered) and closing it removes it, so a short connection costs two
// epoll_ctl(2) in all; the owner of a socket keeps what the events said (readable, writable) until
// a system call says otherwise (EAGAIN, a short read).
//
// The set itself is one descriptor in Asio's reactor: when it is readable the Poller takes up to a
// batch of events with epoll_wait(2) (timeout 0) and hands each to its Pollable, then waits again.
// Everything runs on the io_context's thread; nothing here takes a lock.

#include <sys/epoll.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/status.h"

namespace kiln {

// What the Poller hands events to. `tag` (0..3) tells which of its sockets an event is for;
// `events` is epoll's mask, or 0 when it is run again after Again.
class Pollable {
 public:
  virtual ~Pollable() = default;
  virtual void OnReady(unsigned tag, uint32_t events) = 0;
};
static_assert(alignof(Pollable) > 3, "the Poller keeps a tag in a Pollable's low address bits");

class Poller {
 public:
  static constexpr unsigned kMaxTag = 3;

  // Throws std::system_error when the kernel gives no epoll instance (out of descriptors at
  // start-up: nothing could be served anyway).
  explicit Poller(boost::asio::io_context& io);
  ~Poller();
  Poller(const Poller&) = delete;
  Poller& operator=(const Poller&) = delete;

  // Watches `fd` for input, output, the peer's shutdown and errors, edge-triggered: the kernel
  // reports readiness already there when the socket is added. The caller closes `fd`, which
  // removes it (no descriptor here is ever dup'ed).
  Status Add(int fd, Pollable* to, unsigned tag);

  // Runs `to->OnReady(tag, 0)` after the current batch: for a handler that stopped with work left
  // so that other connections get their turn.
  void Again(Pollable* to, unsigned tag);

  // Destroys `p` once nothing can name it any more: after the current batch (an event already
  // taken may still point at it), or in a handler of its own when no batch is running. Drops
  // its Again.
  void Retire(std::unique_ptr<Pollable> p);

  // Drops `p`'s Again: for an owner that destroys a Pollable itself.
  void Forget(const Pollable* p);

  // Destroys what was retired now. REQUIRES: not in a batch (a destructor's cleanup).
  void FreeRetired();

 private:
  void Wait();
  void RunBatch();

  boost::asio::io_context& io_;
  boost::asio::posix::stream_descriptor set_;  // owns the epoll descriptor
  std::vector<std::pair<Pollable*, unsigned>> again_;
  std::vector<std::pair<Pollable*, unsigned>> running_;  // the Agains of this batch
  std::vector<std::unique_ptr<Pollable>> retired_;
  std::array<epoll_event, 64> events_{};
  bool in_batch_ = false;
  bool waiting_ = false;  // an async_wait on the set is pending
  bool free_posted_ = false;
  // Handlers posted to the io_context hold a weak reference: one that runs after the Poller is
  // gone does nothing.
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);
};

}  // namespace kiln
