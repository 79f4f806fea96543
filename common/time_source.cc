#include "common/time_source.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "common/cancel_quietly.h"

namespace kiln {
namespace {

// The wait's state outlives the Timer while a handler is queued; a generation number makes a
// handler that was already due when the timer was cancelled or re-armed do nothing (Asio runs
// such a handler with success, not operation_aborted).
class AsioTimer final : public Timer {
 public:
  explicit AsioTimer(boost::asio::io_context& io) : state_(std::make_shared<State>(io)) {}
  ~AsioTimer() override { Cancel(); }

  void ExpireAfter(Duration d, std::function<void()> fn) override {
    const uint64_t generation = ++state_->generation;
    state_->armed = true;
    state_->timer.expires_after(d);
    std::weak_ptr<State> weak = state_;
    state_->timer.async_wait(
        [weak, generation, fn = std::move(fn)](const boost::system::error_code& ec) {
          auto state = weak.lock();
          if (ec || !state || state->generation != generation) return;
          state->armed = false;
          fn();
        });
  }
  void Cancel() noexcept override {
    ++state_->generation;  // a handler already due does nothing, even if cancel() failed
    state_->armed = false;
    CancelQuietly(state_->timer, "timer");
  }
  bool Armed() const override { return state_->armed; }
  SteadyTime Expiry() const override { return state_->timer.expiry(); }

 private:
  struct State {
    explicit State(boost::asio::io_context& io) : timer(io) {}
    boost::asio::steady_timer timer;
    uint64_t generation = 0;
    bool armed = false;
  };
  std::shared_ptr<State> state_;
};

}  // namespace

std::unique_ptr<Timer> RealTimeSource::MakeTimer(boost::asio::io_context& io) {
  return std::make_unique<AsioTimer>(io);
}

}  // namespace kiln
