#include "cli/logs.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <ostream>

#include "common/status.h"

namespace kiln {

int ShowLogs(kiln::v1::Kiln::Stub& stub, const std::function<void(grpc::ClientContext&)>& prepare,
             const LogsOptions& o, std::ostream& out, std::ostream& err) {
  v1::StreamLogsRequest req;
  req.set_name(o.name);
  req.set_follow(o.follow);
  req.set_tail(o.tail);
  req.set_revision(o.revision);
  if (o.since.count() > 0) {
    const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    req.set_since_unix_ms(std::max<int64_t>(1, now - o.since.count()));
  }
  grpc::ClientContext ctx;
  prepare(ctx);
  auto reader = stub.StreamLogs(&ctx, req);
  v1::LogLines batch;
  while (reader->Read(&batch)) {
    for (const v1::LogLine& l : batch.lines()) {
      // A service's instances are told apart by a prefix, as `docker compose logs` does.
      if (l.instance() != o.name) out << l.instance() << " | ";
      out << l.text() << '\n';
    }
    out.flush();
  }
  grpc::Status s = reader->Finish();
  if (s.ok()) return 0;
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    err << "kilnctl: cannot reach kilnd at " << o.addr
        << " (is it running? set --addr or KILN_ADDR): " << s.error_message() << "\n";
  } else {
    err << "kilnctl: " << StatusCodeName(static_cast<StatusCode>(s.error_code())) << ": "
        << s.error_message() << "\n";
  }
  return 1;
}

}  // namespace kiln
