#include "common/clock.h"

namespace kiln {

const Clock& RealClockInstance() {
  static const RealClock clock;
  return clock;
}

FakeClock::FakeClock()
    : steady_(std::chrono::hours(1)), system_(std::chrono::seconds(1767225600)) {}

SteadyTime FakeClock::SteadyNow() const {
  std::lock_guard lock(mu_);
  return steady_;
}

SystemTime FakeClock::SystemNow() const {
  std::lock_guard lock(mu_);
  return system_;
}

void FakeClock::Advance(Duration d) {
  std::lock_guard lock(mu_);
  steady_ += d;
  system_ += d;
}

}  // namespace kiln
