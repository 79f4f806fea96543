#include "storage/records.h"

namespace kiln {
namespace {

template <typename E, size_t N>
constexpr bool InEnumOrder(const std::array<NamedValue<E>, N>& table) {
  for (size_t i = 0; i < N; ++i) {
    if (static_cast<size_t>(table[i].value) != i) return false;
  }
  return true;
}
static_assert(InEnumOrder(kInstanceStateNames));
static_assert(InEnumOrder(kConditionTypeNames));
static_assert(InEnumOrder(kRevisionSourceNames));
static_assert(InEnumOrder(kRolloutStateNames));
static_assert(InEnumOrder(kEventKindNames));
// The last value of each enum is in its table, so with the order above every value is.
static_assert(kInstanceStateNames.back().value == InstanceState::kLost);
static_assert(kConditionTypeNames.back().value == ConditionType::kDegraded);
static_assert(kRevisionSourceNames.back().value == RevisionSource::kRollback);
static_assert(kRolloutStateNames.back().value == RolloutState::kSuperseded);
static_assert(kEventKindNames.back().value == EventKind::kHostUp);

template <typename E, size_t N>
std::string_view NameIn(const std::array<NamedValue<E>, N>& table, E value) {
  const auto i = static_cast<size_t>(value);
  return i < N ? table[i].name : std::string_view("unknown");
}

template <typename E, size_t N>
std::optional<E> ParseIn(const std::array<NamedValue<E>, N>& table, std::string_view name) {
  for (const auto& entry : table) {
    if (entry.name == name) return entry.value;
  }
  return std::nullopt;
}

}  // namespace

std::string_view InstanceStateName(InstanceState s) { return NameIn(kInstanceStateNames, s); }
std::optional<InstanceState> ParseInstanceState(std::string_view s) {
  return ParseIn(kInstanceStateNames, s);
}
std::string_view ConditionTypeName(ConditionType t) { return NameIn(kConditionTypeNames, t); }
std::optional<ConditionType> ParseConditionType(std::string_view s) {
  return ParseIn(kConditionTypeNames, s);
}
std::string_view RevisionSourceName(RevisionSource s) { return NameIn(kRevisionSourceNames, s); }
std::optional<RevisionSource> ParseRevisionSource(std::string_view s) {
  return ParseIn(kRevisionSourceNames, s);
}
std::string_view RolloutStateName(RolloutState s) { return NameIn(kRolloutStateNames, s); }
std::optional<RolloutState> ParseRolloutState(std::string_view s) {
  return ParseIn(kRolloutStateNames, s);
}
std::string_view EventKindName(EventKind k) { return NameIn(kEventKindNames, k); }
std::optional<EventKind> ParseEventKind(std::string_view s) { return ParseIn(kEventKindNames, s); }

// ---------------------------------------------------------------------------------------------
// Instances

bool IsFinal(InstanceState s) {
  return s == InstanceState::kTerminated || s == InstanceState::kFailed ||
         s == InstanceState::kLost;
}

bool IsLegalTransition(InstanceState from, InstanceState to) {
  using S = InstanceState;
  switch (from) {
    case S::kPending:
      return to == S::kStarting || to == S::kDraining || to == S::kFailed || to == S::kLost;
    case S::kStarting:
      return to == S::kHealthy || to == S::kDraining || to == S::kFailed || to == S::kLost;
    case S::kHealthy:
      return to == S::kUnhealthy || to == S::kDraining || to == S::kFailed || to == S::kLost;
    case S::kUnhealthy:
      return to == S::kHealthy || to == S::kDraining || to == S::kFailed || to == S::kLost;
    case S::kDraining:
      // Stopped as intended; or found gone after a restart of kilnd.
      return to == S::kTerminated || to == S::kLost;
    case S::kTerminated:
    case S::kFailed:
    case S::kLost:
      return false;
  }
  return false;
}

Status ApplyTransition(InstanceRecord& r, InstanceState to, const InstanceUpdate& u,
                       int64_t now_ms) {
  if (!IsLegalTransition(r.state, to)) {
    return FailedPreconditionError("instance " + r.name + ": illegal transition " +
                                   std::string(InstanceStateName(r.state)) + " -> " +
                                   std::string(InstanceStateName(to)));
  }
  if (to == InstanceState::kStarting) r.started_ms = now_ms;
  if (to == InstanceState::kHealthy) r.healthy_since_ms = now_ms;
  if (to == InstanceState::kUnhealthy) r.healthy_since_ms = 0;
  if (IsFinal(to)) r.finished_ms = now_ms;
  r.state = to;
  r.state_changed_ms = now_ms;
  r.reason = u.reason;
  if (u.handle) r.handle = *u.handle;
  if (u.pid) r.pid = *u.pid;
  if (u.host) r.host = *u.host;
  if (u.port) r.port = *u.port;
  if (u.exit_code) r.exit_code = *u.exit_code;
  if (u.exit_signal) r.exit_signal = *u.exit_signal;
  return Status::Ok();
}

Status CheckReplaceable(const InstanceRecord& r) {
  if (IsLive(r.state)) return Status::Ok();
  return FailedPreconditionError("instance " + r.name + " is " +
                                 std::string(InstanceStateName(r.state)) + ", not running");
}

// ---------------------------------------------------------------------------------------------
// Services

const Condition* FindCondition(const std::vector<Condition>& conditions, ConditionType type) {
  for (const Condition& c : conditions) {
    if (c.type == type) return &c;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Revisions

Status CheckNewRevision(const RevisionRecord& r, bool already_written) {
  const std::string label = r.service + " revision " + std::to_string(r.number);
  if (already_written) {
    return FailedPreconditionError(label + " is already written; revisions are immutable");
  }
  if (r.template_hash.empty() || r.template_json.empty()) {
    return InvalidArgumentError(label + ": a revision needs a template and its hash");
  }
  return Status::Ok();
}

Status CheckRevisionDeletable(std::string_view service, int64_t number,
                              int64_t referencing_instances) {
  if (referencing_instances <= 0) return Status::Ok();
  return FailedPreconditionError(std::string(service) + " revision " + std::to_string(number) +
                                 " is still referenced by " +
                                 std::to_string(referencing_instances) + " instance(s)");
}

// ---------------------------------------------------------------------------------------------
// Rollouts

bool IsFinal(RolloutState s) {
  return s == RolloutState::kCompleted || s == RolloutState::kFailed ||
         s == RolloutState::kSuperseded;
}

// ---------------------------------------------------------------------------------------------
// Events

bool AggregateRepeat(const EventRecord& previous, int64_t window_ms, EventRecord& next) {
  if (previous.aggregate_key.empty() || previous.aggregate_key != next.aggregate_key ||
      previous.service != next.service || next.time_ms - previous.time_ms > window_ms) {
    return false;
  }
  next.count = previous.count + 1;
  next.first_ms = previous.first_ms > 0 ? previous.first_ms : previous.time_ms;
  return true;
}

}  // namespace kiln
