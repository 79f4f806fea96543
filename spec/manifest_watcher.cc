#include "spec/manifest_watcher.h"

#include <sys/inotify.h>
#include <unistd.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include "common/logging.h"

namespace kiln {
namespace asio = boost::asio;

struct ManifestWatcher::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io_in, TimeSource& time, std::filesystem::path d, Duration deb,
       std::function<void()> cb)
      : io(io_in),
        dir(std::move(d)),
        debounce(deb),
        on_change(std::move(cb)),
        stream(io_in),
        debounce_timer(time.MakeTimer(io_in)),
        retry_timer(time.MakeTimer(io_in)) {}

  void Watch() {
    boost::system::error_code ignored;
    stream.close(ignored);
    int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) return Retry("inotify_init1 failed");
    constexpr uint32_t kMask = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM |
                               IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF;
    if (::inotify_add_watch(fd, dir.c_str(), kMask) < 0) {
      ::close(fd);
      return Retry("cannot watch " + dir.string());
    }
    stream.assign(fd);
    Read();
  }

  void Retry(const std::string& why) {
    if (!retrying)
      LogWarn("manifest directory not watched; retrying every second", {{"reason", why}});
    retrying = true;
    std::weak_ptr<Impl> weak = weak_from_this();
    retry_timer->ExpireAfter(std::chrono::seconds(1), [weak] {
      auto self = weak.lock();
      if (!self) return;
      self->Changed(self->debounce);  // it may have come back with files in it
      self->Watch();
    });
  }

  void Read() {
    std::weak_ptr<Impl> weak = weak_from_this();
    stream.async_read_some(
        asio::buffer(buf), [weak](const boost::system::error_code& ec, size_t n) {
          auto self = weak.lock();
          if (!self || ec == asio::error::operation_aborted) return;
          if (ec) return self->Retry(ec.message());
          bool gone = false;
          bool complete = false;  // the batch ends with a file complete: written, renamed, removed
          for (size_t off = 0; off < n;) {
            auto* e = reinterpret_cast<const inotify_event*>(self->buf.data() + off);
            gone |= (e->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED)) != 0;
            complete = (e->mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE)) != 0;
            off += sizeof(inotify_event) + e->len;
          }
          self->retrying = false;
          // A file that is complete is read almost at once; a write still in progress waits for the
          // burst to settle.
          self->Changed(complete ? Duration(5) : self->debounce);
          if (gone) return self->Retry("manifest directory was removed or moved");
          self->Read();
        });
  }

  // Debounce: one reload once changes have been quiet for `delay`.
  void Changed(Duration delay) {
    std::weak_ptr<Impl> weak = weak_from_this();
    debounce_timer->ExpireAfter(delay, [weak] {
      auto self = weak.lock();
      if (!self) return;
      self->on_change();
    });
  }

  asio::io_context& io;
  std::filesystem::path dir;
  Duration debounce;
  std::function<void()> on_change;
  asio::posix::stream_descriptor stream;
  std::unique_ptr<Timer> debounce_timer;
  std::unique_ptr<Timer> retry_timer;
  alignas(inotify_event) std::array<char, size_t{16} * 1024> buf{};
  bool retrying = false;
};

ManifestWatcher::ManifestWatcher(asio::io_context& io, TimeSource& time, std::filesystem::path dir,
                                 Duration debounce, std::function<void()> on_change)
    : impl_(std::make_shared<Impl>(io, time, std::move(dir), debounce, std::move(on_change))) {}

ManifestWatcher::~ManifestWatcher() {
  boost::system::error_code ignored;
  impl_->stream.close(ignored);
  impl_->debounce_timer->Cancel();
  impl_->retry_timer->Cancel();
}

void ManifestWatcher::Start() { impl_->Watch(); }

}  // namespace kiln
