#pragma once

// A work queue like client-go's, on one Asio io_context: a name queued twice runs once; one pass
// of a service at a time (passes run on the io_context's thread, one after another); per-service
// exponential backoff on errors (5 ms doubling, capped); timers for deadlines (AddAfter); a slow
// periodic resync of every known name.

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "common/clock.h"
#include "common/status.h"
#include "common/time_source.h"

namespace boost::asio {
class io_context;
}

namespace kiln {

// What the reconciler needs from a queue: to ask for a pass now or later.
class PassScheduler {
 public:
  virtual ~PassScheduler() = default;
  virtual void Add(const std::string& name) = 0;
  // A pass after `delay`; an earlier request for the same name wins.
  virtual void AddAfter(const std::string& name, Duration delay) = 0;
};

class WorkQueue final : public PassScheduler {
 public:
  using ProcessFn = std::function<Status(const std::string&)>;
  using NamesFn = std::function<std::vector<std::string>()>;

  struct Options {
    Duration backoff_base{5};
    Duration backoff_cap{30'000};
    Duration resync{30'000};  // 0 = none
    // Called before each pass with how long its name waited since it was queued (seconds).
    std::function<void(double)> on_wait;
  };

  // `process` runs one pass; an error requeues the name with backoff. `all_names` lists what a
  // resync enqueues. Backoff, AddAfter and resync wait on timers of `time`, which must outlive
  // the queue.
  WorkQueue(boost::asio::io_context& io, TimeSource& time, Options options, ProcessFn process,
            NamesFn all_names);
  ~WorkQueue() override;

  void Add(const std::string& name) override;
  void AddAfter(const std::string& name, Duration delay) override;
  void Start();  // arms the resync timer

  size_t Depth() const;
  int64_t Retries() const;
  // The backoff the next failure of `name` would get.
  Duration NextBackoffForTest(const std::string& name) const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln
