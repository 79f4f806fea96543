#pragma once

// Cancelling an Asio timer (or socket, acceptor...) where nothing may throw: destructors and
// Timer::Cancel. Asio's cancel() throws boost::system::system_error when the reactor refuses
// (not seen for a timer on Linux); its error_code overload is deprecated and gone from newer
// Boost. A failure is logged and otherwise ignored: the wait it leaves armed finds its owner gone
// (a generation number or a weak pointer) and does nothing.

#include <exception>
#include <string_view>

#include "common/logging.h"

namespace kiln {

template <typename Cancellable>
void CancelQuietly(Cancellable& object, std::string_view what) noexcept {
  try {
    object.cancel();
  } catch (const std::exception& e) {
    LogError("cannot cancel", {{"what", what}, {"error", e.what()}});
  }
}

}  // namespace kiln
