#pragma once

// A call from another thread (a gRPC handler) onto the reconciler's io_context thread, with a
// deadline that is safe to give up at: the queued work owns everything it uses, and work that
// has not started by the deadline never runs, so the caller may retry without the call being
// applied twice.

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include "common/clock.h"
#include "common/status.h"

namespace kiln {

// Runs `fn` on `io`'s thread and returns its result. While `fn` waits in the queue, the caller
// waits at most `queue_timeout`; then `fn` is cancelled (it will never run) and the result is
// UNAVAILABLE, safe to retry. Once `fn` has started, the caller waits for it to finish: its result
// is what happened. `stopping` is polled; when it turns true the caller stops waiting (`fn` is
// cancelled if it has not started).
// REQUIRES: `fn` owns (captures by value) everything it reads; it may outlive the caller.
// REQUIRES: not called on `io`'s thread.
template <typename T>
StatusOr<T> RunOnIo(boost::asio::io_context& io, std::function<StatusOr<T>()> fn,
                    Duration queue_timeout, const std::function<bool()>& stopping) {
  struct Call {
    std::mutex mu;  // guards state and result
    std::condition_variable done;
    enum class State { kQueued, kRunning, kDone, kCancelled } state = State::kQueued;
    std::optional<StatusOr<T>> result;
  };
  using State = typename Call::State;
  auto call = std::make_shared<Call>();
  boost::asio::post(io, [call, fn = std::move(fn)] {
    {
      std::lock_guard lock(call->mu);
      if (call->state == State::kCancelled) return;  // the caller gave up: never act late
      call->state = State::kRunning;
    }
    StatusOr<T> r = fn();
    std::lock_guard lock(call->mu);
    call->result.emplace(std::move(r));
    call->state = State::kDone;
    call->done.notify_all();
  });
  const auto deadline = std::chrono::steady_clock::now() + queue_timeout;
  std::unique_lock lock(call->mu);
  while (call->state != State::kDone) {
    const bool stop = stopping && stopping();
    if (call->state == State::kQueued && (stop || std::chrono::steady_clock::now() >= deadline)) {
      call->state = State::kCancelled;
      return UnavailableError(stop ? "kilnd is shutting down; the call was not run"
                                   : "kilnd is busy; the call was not run, try again");
    }
    if (call->state == State::kRunning && stop) {
      return UnavailableError(
          "kilnd is shutting down while the call runs; see its events for the outcome");
    }
    call->done.wait_for(lock, std::chrono::milliseconds(50));
  }
  return std::move(*call->result);
}

}  // namespace kiln
