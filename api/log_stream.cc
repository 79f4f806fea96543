#include "api/log_stream.h"

namespace kiln {

LogFanIn::LogFanIn(std::filesystem::path log_dir, const v1::StreamLogsRequest& request)
    : log_dir_(std::move(log_dir)), request_(request) {}

Status LogFanIn::Refresh(StateReader& reader) {
  std::vector<InstanceRecord> instances;
  RETURN_IF_ERROR(reader.Snapshot([&]() -> Status {
    if (!resolved_) {
      StatusOr<InstanceRecord> one = reader.GetInstance(request_.name());
      if (one.ok()) {
        instances.push_back(*std::move(one));
        return Status::Ok();
      }
      if (one.status().code() != StatusCode::kNotFound) return one.status();
      StatusOr<ServiceRecord> svc = reader.GetService(request_.name());
      if (!svc.ok() && svc.status().code() == StatusCode::kNotFound) {
        return NotFoundError("no instance or service named " + request_.name());
      }
      RETURN_IF_ERROR(svc.status());
      service_ = svc->name;
    }
    if (service_.empty()) {
      // One instance: only whether it is over can change. Its row may be pruned meanwhile;
      // its reader keeps what it opened.
      StatusOr<InstanceRecord> one = reader.GetInstance(request_.name());
      if (one.ok()) instances.push_back(*std::move(one));
      return Status::Ok();
    }
    ASSIGN_OR_RETURN(instances, reader.ListInstances(service_, /*include_final=*/true));
    return Status::Ok();
  }));
  const bool first = !resolved_;
  resolved_ = true;
  for (const InstanceRecord& i : instances) {
    if (known_.count(i.name) == 0) {
      if (!service_.empty() && request_.revision() > 0 && i.revision != request_.revision())
        continue;
      if (request_.since_unix_ms() > 0 && i.finished_ms > 0 &&
          i.finished_ms < request_.since_unix_ms())
        continue;
      Source s{i.name, i.revision, IsFinal(i.state), std::make_unique<LogReader>(log_dir_, i.name)};
      // An instance that started after the stream began is new: all of it is wanted.
      RETURN_IF_ERROR(s.reader->Seek(first ? request_.tail() : 0, request_.since_unix_ms()));
      known_.insert(i.name);
      sources_.push_back(std::move(s));
      continue;
    }
    for (Source& s : sources_) {
      if (s.instance == i.name) s.final = IsFinal(i.state);
    }
  }
  return Status::Ok();
}

bool LogFanIn::Read(size_t i, bool to_end, v1::LogLines* out) {
  Source& s = sources_[i];
  std::vector<std::string> lines = s.reader->Read(kMaxBatchBytes, to_end || s.final);
  for (std::string& text : lines) {
    v1::LogLine* l = out->add_lines();
    l->set_instance(s.instance);
    l->set_revision(s.revision);
    l->set_text(std::move(text));
  }
  return !lines.empty();
}

}  // namespace kiln
