#pragma once

// Time is passed in, never read from globals, so reconciliation is a function of
// (desired, live, now) and tests advance a FakeClock instead of sleeping.

#include <chrono>
#include <mutex>

namespace kiln {

using SteadyTime = std::chrono::steady_clock::time_point;
using SystemTime = std::chrono::system_clock::time_point;
using Duration = std::chrono::milliseconds;

class Clock {
 public:
  virtual ~Clock() = default;
  virtual SteadyTime SteadyNow() const = 0;
  virtual SystemTime SystemNow() const = 0;
};

class RealClock final : public Clock {
 public:
  SteadyTime SteadyNow() const override { return std::chrono::steady_clock::now(); }
  SystemTime SystemNow() const override { return std::chrono::system_clock::now(); }
};

// The system's clocks, for an edge that is not handed a Clock (a default argument).
const Clock& RealClockInstance();

// A clock that moves only when told to. Thread-safe so a test thread may advance it while the
// code under test reads it.
class FakeClock final : public Clock {
 public:
  // Starts at an arbitrary fixed wall time (2026-01-01T00:00:00Z) so outputs are reproducible.
  FakeClock();

  SteadyTime SteadyNow() const override;
  SystemTime SystemNow() const override;
  void Advance(Duration d);

 private:
  mutable std::mutex mu_;  // guards steady_ and system_
  SteadyTime steady_;
  SystemTime system_;
};

// Milliseconds since the Unix epoch: how times are stored and sent.
inline int64_t ToUnixMillis(SystemTime t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}
inline SystemTime FromUnixMillis(int64_t ms) { return SystemTime(std::chrono::milliseconds(ms)); }

}  // namespace kiln
