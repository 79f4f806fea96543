#include "controller/work_queue.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "common/logging.h"

namespace kiln {
namespace asio = boost::asio;

struct WorkQueue::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io_in, TimeSource& t, Options o, ProcessFn p, NamesFn n)
      : io(io_in),
        time(t),
        options(std::move(o)),
        process(std::move(p)),
        all_names(std::move(n)),
        resync_timer(t.MakeTimer(io_in)) {}

  void Add(const std::string& name) {
    if (!queued.emplace(name, time.SteadyNow()).second) return;  // already waiting: runs once
    order.push_back(name);
    if (!drain_posted) {
      drain_posted = true;
      std::weak_ptr<Impl> weak = weak_from_this();
      asio::post(io, [weak] {
        if (auto self = weak.lock()) self->Drain();
      });
    }
  }

  void AddAfter(const std::string& name, Duration delay) {
    if (delay.count() <= 0) return Add(name);
    const SteadyTime when = time.SteadyNow() + delay;
    std::unique_ptr<Timer>& timer = timers[name];
    if (timer && timer->Armed() && timer->Expiry() <= when) return;  // an earlier one is armed
    if (!timer) timer = time.MakeTimer(io);
    std::weak_ptr<Impl> weak = weak_from_this();
    timer->ExpireAfter(delay, [weak, name] {
      auto self = weak.lock();
      if (!self) return;
      self->timers.erase(name);  // destroys the timer whose callback this is; `name` is a copy
      self->Add(name);
    });
  }

  // Runs the queued passes one at a time; names added meanwhile run in a later drain.
  void Drain() {
    drain_posted = false;
    std::deque<std::string> batch;
    batch.swap(order);
    for (const std::string& name : batch) {
      if (auto it = queued.find(name); it != queued.end()) {
        if (options.on_wait) {
          options.on_wait(std::chrono::duration<double>(time.SteadyNow() - it->second).count());
        }
        queued.erase(it);
      }
      Status s = process(name);
      if (s.ok()) {
        failures.erase(name);
        continue;
      }
      ++retries;
      Duration delay = Backoff(name);
      ++failures[name];
      LogWarn("reconcile failed; retrying", {{"service", name},
                                             {"error", s.ToString()},
                                             {"retry_in_ms", static_cast<int64_t>(delay.count())}});
      AddAfter(name, delay);
    }
  }

  Duration Backoff(const std::string& name) const {
    auto it = failures.find(name);
    int n = it == failures.end() ? 0 : it->second;
    int64_t ms = options.backoff_base.count();
    for (int i = 0; i < n && ms < options.backoff_cap.count(); ++i) ms *= 2;
    return Duration(std::min<int64_t>(ms, options.backoff_cap.count()));
  }

  void ArmResync() {
    if (options.resync.count() <= 0) return;
    std::weak_ptr<Impl> weak = weak_from_this();
    resync_timer->ExpireAfter(options.resync, [weak] {
      auto self = weak.lock();
      if (!self) return;
      for (const std::string& name : self->all_names()) self->Add(name);
      self->ArmResync();
    });
  }

  asio::io_context& io;
  TimeSource& time;
  Options options;
  ProcessFn process;
  NamesFn all_names;
  std::deque<std::string> order;
  std::map<std::string, SteadyTime> queued;              // waiting names and when each was queued
  std::map<std::string, std::unique_ptr<Timer>> timers;  // AddAfter's, one per name
  std::map<std::string, int> failures;
  std::unique_ptr<Timer> resync_timer;
  bool drain_posted = false;
  int64_t retries = 0;
};

WorkQueue::WorkQueue(asio::io_context& io, TimeSource& time, Options options, ProcessFn process,
                     NamesFn all_names)
    : impl_(std::make_shared<Impl>(io, time, std::move(options), std::move(process),
                                   std::move(all_names))) {}

WorkQueue::~WorkQueue() {
  impl_->resync_timer->Cancel();
  impl_->timers.clear();  // destroying a timer cancels it
}

void WorkQueue::Add(const std::string& name) { impl_->Add(name); }
void WorkQueue::AddAfter(const std::string& name, Duration delay) { impl_->AddAfter(name, delay); }
void WorkQueue::Start() { impl_->ArmResync(); }
size_t WorkQueue::Depth() const { return impl_->queued.size(); }
int64_t WorkQueue::Retries() const { return impl_->retries; }
Duration WorkQueue::NextBackoffForTest(const std::string& name) const {
  return impl_->Backoff(name);
}

}  // namespace kiln
