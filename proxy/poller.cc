#include "proxy/poller.h"

#include <boost/asio/post.hpp>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "common/logging.h"
#include "common/unique_fd.h"

namespace kiln {
namespace {

int NewEpoll() {
  int fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  return fd;
}

}  // namespace

Poller::Poller(boost::asio::io_context& io) : io_(io), set_(io, NewEpoll()) { Wait(); }

Poller::~Poller() {
  alive_.reset();
  FreeRetired();
}

Status Poller::Add(int fd, Pollable* to, unsigned tag) {
  epoll_event ev{};
  // EPOLLPRI: TCP urgent data, which makes a read stop short at its mark (see PumpSocket).
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET;
  // Pollables are at least 8-aligned (a vtable pointer): the tag rides in the pointer's low
  // bits, as an offset into the object.
  ev.data.ptr = reinterpret_cast<char*>(to) + (tag & kMaxTag);
  if (::epoll_ctl(set_.native_handle(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return ErrnoError(errno, "epoll_ctl");
  }
  return {};
}

void Poller::Again(Pollable* to, unsigned tag) {
  if (again_.empty() && !in_batch_) {
    // Outside a batch (a timer's handler) nothing would run it before the next event.
    boost::asio::post(io_, [this, alive = std::weak_ptr<int>(alive_)] {
      if (!alive.expired()) RunBatch();
    });
  }
  again_.emplace_back(to, tag);
}

void Poller::Forget(const Pollable* p) {
  std::erase_if(again_, [p](const auto& a) { return a.first == p; });
  // running_ is being walked: blank the entries rather than move the others.
  for (auto& a : running_) {
    if (a.first == p) a.first = nullptr;
  }
}

void Poller::Retire(std::unique_ptr<Pollable> p) {
  Forget(p.get());
  retired_.push_back(std::move(p));
  if (in_batch_ || free_posted_) return;
  // Not in a batch: the caller is a handler of the object itself (a timer), still on its stack.
  free_posted_ = true;
  boost::asio::post(io_, [this, alive = std::weak_ptr<int>(alive_)] {
    if (alive.expired()) return;
    free_posted_ = false;
    FreeRetired();
  });
}

void Poller::FreeRetired() {
  // A destructor may retire more; take them in turns.
  while (!retired_.empty()) {
    std::vector<std::unique_ptr<Pollable>> batch = std::move(retired_);
    retired_.clear();
  }
}

void Poller::Wait() {
  waiting_ = true;
  set_.async_wait(
      boost::asio::posix::stream_descriptor::wait_read,
      [this, alive = std::weak_ptr<int>(alive_)](boost::system::error_code ec) {
        if (alive.expired() || ec == boost::asio::error::operation_aborted) return;
        waiting_ = false;
        if (ec) {
          LogError("the data plane's epoll set failed; waiting again", {{"error", ec.message()}});
        }
        RunBatch();
      });
}

void Poller::RunBatch() {
  if (in_batch_) return;
  in_batch_ = true;
  // The Agains asked before this batch; those asked during it wait for the next.
  running_.swap(again_);
  // Forget may blank entries while they are walked; Again adds to again_ only.
  for (size_t i = 0; i < running_.size(); ++i) {
    auto [to, tag] = running_[i];
    if (to != nullptr) to->OnReady(tag, 0);
  }
  running_.clear();
  int n = ::epoll_wait(set_.native_handle(), events_.data(), static_cast<int>(events_.size()), 0);
  if (n < 0 && errno != EINTR) {
    LogError("epoll_wait failed", {{"error", std::strerror(errno)}});
  }
  for (int i = 0; i < n; ++i) {
    const epoll_event& ev = events_[static_cast<size_t>(i)];
    auto* tagged = static_cast<char*>(ev.data.ptr);
    const auto tag = static_cast<unsigned>(reinterpret_cast<uintptr_t>(tagged) & kMaxTag);
    reinterpret_cast<Pollable*>(tagged - tag)->OnReady(tag, ev.events);
  }
  FreeRetired();
  in_batch_ = false;
  // A full batch may have left events: take them next, without counting on the wait to
  // report readiness that is already there.
  if (!again_.empty() || n == static_cast<int>(events_.size())) {
    boost::asio::post(io_, [this, alive = std::weak_ptr<int>(alive_)] {
      if (!alive.expired()) RunBatch();
    });
  }
  if (!waiting_) Wait();
}

}  // namespace kiln
