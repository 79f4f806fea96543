#pragma once

// Simulated time (Envoy's SimulatedTimeSystem): time moves only when a test advances it, and the
// timers that fall due fire in deadline order, their callbacks posted on the io_context each timer
// was made on, so they run on the thread that runs it, as real ones would.

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "common/time_source.h"

namespace kiln::testing {

class SimulatedTimeSource final : public TimeSource {
 public:
  // Starts at the same fixed times as FakeClock (wall time 2026-01-01T00:00:00Z).
  SimulatedTimeSource()
      : steady_(std::chrono::hours(1)), system_(std::chrono::seconds(1767225600)) {}

  SteadyTime SteadyNow() const override {
    std::lock_guard lock(mu_);
    return steady_;
  }
  SystemTime SystemNow() const override {
    std::lock_guard lock(mu_);
    return system_;
  }
  std::unique_ptr<Timer> MakeTimer(boost::asio::io_context& io) override {
    return std::make_unique<SimTimer>(this, io);
  }

  // Moves time forward by `d`, stopping at each armed deadline on the way (in deadline order, ties
  // in arming order) to post its callback. Callbacks run when their io_context runs; a timer they
  // arm is not seen by this call (see AdvanceAndRun).
  void Advance(Duration d) {
    const SteadyTime target = SteadyNow() + d;
    while (FireNext(target)) {
    }
    SetSteady(target);
  }

  // Advance for a test that runs `io` itself: after each deadline's callbacks are posted, runs
  // what is ready on `io`, so timers armed by those callbacks fire within the same advance too.
  void AdvanceAndRun(Duration d, boost::asio::io_context& io) {
    const SteadyTime target = SteadyNow() + d;
    io.restart();
    io.poll();
    while (FireNext(target)) {
      io.restart();
      io.poll();
    }
    SetSteady(target);
    io.restart();
    io.poll();
  }

  // Timers armed and not yet fired or cancelled.
  size_t ArmedTimers() const {
    std::lock_guard lock(mu_);
    return armed_.size();
  }

 private:
  struct Shared {
    uint64_t generation = 0;
    bool armed = false;
    SteadyTime expiry{};
  };
  // Keyed by (deadline, arming sequence): deadline order, then arming order.
  using Key = std::pair<SteadyTime, uint64_t>;
  struct Entry {
    boost::asio::io_context* io;
    std::shared_ptr<Shared> shared;
    uint64_t generation;
    std::function<void()> fn;
  };

  class SimTimer final : public Timer {
   public:
    SimTimer(SimulatedTimeSource* time, boost::asio::io_context& io)
        : time_(time), io_(io), shared_(std::make_shared<Shared>()) {}
    ~SimTimer() override { Cancel(); }
    void ExpireAfter(Duration d, std::function<void()> fn) override {
      Cancel();
      time_->Arm(io_, shared_, d, std::move(fn));
    }
    void Cancel() noexcept override { time_->Disarm(shared_); }
    bool Armed() const override {
      std::lock_guard lock(time_->mu_);
      return shared_->armed;
    }
    SteadyTime Expiry() const override {
      std::lock_guard lock(time_->mu_);
      return shared_->expiry;
    }

   private:
    SimulatedTimeSource* time_;
    boost::asio::io_context& io_;
    std::shared_ptr<Shared> shared_;
  };

  void Arm(boost::asio::io_context& io, const std::shared_ptr<Shared>& shared, Duration d,
           std::function<void()> fn) {
    std::lock_guard lock(mu_);
    shared->armed = true;
    shared->expiry = steady_ + std::max(d, Duration(0));
    keys_[shared.get()] = Key{shared->expiry, next_seq_++};
    armed_.emplace(keys_[shared.get()], Entry{&io, shared, ++shared->generation, std::move(fn)});
  }
  void Disarm(const std::shared_ptr<Shared>& shared) {
    std::lock_guard lock(mu_);
    ++shared->generation;  // a callback already posted does nothing
    shared->armed = false;
    auto k = keys_.find(shared.get());
    if (k == keys_.end()) return;
    armed_.erase(k->second);
    keys_.erase(k);
  }
  // Posts the earliest callback due by `target`, with time set to its deadline; false when none.
  bool FireNext(SteadyTime target) {
    std::lock_guard lock(mu_);
    if (armed_.empty() || armed_.begin()->first.first > target) return false;
    auto node = armed_.extract(armed_.begin());
    keys_.erase(node.mapped().shared.get());
    const SteadyTime at = node.key().first;
    if (at > steady_) {
      system_ += at - steady_;
      steady_ = at;
    }
    Entry e = std::move(node.mapped());
    boost::asio::post(*e.io, [this, e] {
      {
        std::lock_guard lock(mu_);
        if (e.shared->generation != e.generation) return;  // cancelled or re-armed since
        e.shared->armed = false;
      }
      e.fn();
    });
    return true;
  }
  void SetSteady(SteadyTime t) {
    std::lock_guard lock(mu_);
    if (t <= steady_) return;
    system_ += t - steady_;
    steady_ = t;
  }

  mutable std::mutex mu_;  // guards everything below and every timer's Shared
  SteadyTime steady_;
  SystemTime system_;
  uint64_t next_seq_ = 0;
  std::map<Key, Entry> armed_;
  std::map<const Shared*, Key> keys_;
};

}  // namespace kiln::testing
