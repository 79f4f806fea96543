#pragma once

// One source of time that also makes timers (Envoy's TimeSource + Scheduler), so that code which
// waits (the work queue's backoff and deadlines, the watcher's debounce and retries) runs on real
// time in kilnd and on simulated time in tests (tests/fakes/simulated_time_source.h), without
// sleeping. Asio stays out of this header.

#include <functional>
#include <memory>

#include "common/clock.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

// A one-shot timer bound to the io_context it was made on. REQUIRES: used on that io_context's
// thread. Destroying it cancels it; a callback may destroy or re-arm its own timer.
class Timer {
 public:
  virtual ~Timer() = default;
  // Calls `fn` on the io_context once `d` has passed (at once, through the io_context, when d <=
  // 0). Arming again replaces the earlier wait: its callback never runs.
  virtual void ExpireAfter(Duration d, std::function<void()> fn) = 0;
  // The armed callback never runs (also when it was already due but had not run yet). Never
  // throws: destructors call it.
  virtual void Cancel() noexcept = 0;
  // Whether a callback is armed and has not run yet.
  virtual bool Armed() const = 0;
  // When the armed callback is due. REQUIRES: Armed().
  virtual SteadyTime Expiry() const = 0;
};

class TimeSource : public Clock {
 public:
  virtual std::unique_ptr<Timer> MakeTimer(boost::asio::io_context& io) = 0;
};

// Wall and steady clocks of the system; timers are Asio steady_timers.
class RealTimeSource final : public TimeSource {
 public:
  SteadyTime SteadyNow() const override { return std::chrono::steady_clock::now(); }
  SystemTime SystemNow() const override { return std::chrono::system_clock::now(); }
  std::unique_ptr<Timer> MakeTimer(boost::asio::io_context& io) override;
};

}  // namespace kiln
