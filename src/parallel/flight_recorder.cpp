// FlightRecorder: the ring of recent operations, per-group sequence numbers, the communicator-side
// OpTracker, and the comm_skip / comm_sleep fault-injection points.
#include "parallel/flight_recorder.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/error.h"
#include "core/fault_inject.h"

namespace tessera {

const char* op_state_name(OpState s) {
  switch (s) {
    case OpState::posted: return "posted";
    case OpState::waiting: return "waiting";
    case OpState::done: return "done";
    case OpState::skipped: return "skipped";
  }
  TS_BUG("unknown OpState value {}", static_cast<int>(s));
}

int64_t FlightRecorder::steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

FlightRecorder::FlightRecorder(int rank, int capacity, Clock clock)
    : rank_(rank), clock_(clock), ring_(static_cast<size_t>(capacity)) {
  TS_CHECK(capacity > 0, "flight recorder capacity {}", capacity);
}

int FlightRecorder::add_group(const std::string& name, const char* backend) {
  std::lock_guard lock(mu_);
  groups_.push_back({name, name + "/" + backend, 0});
  return static_cast<int>(groups_.size()) - 1;
}

std::string FlightRecorder::group_label(int group) const {
  std::lock_guard lock(mu_);
  return group >= 0 && group < int(groups_.size()) ? groups_[group].label : "?";
}

OpTicket FlightRecorder::begin(int group, const char* op, int64_t count, int peer) {
  const int64_t now = clock_();
  std::lock_guard lock(mu_);
  Group& g = groups_.at(group);
  OpTicket t{next_id_++, group, g.issued + 1, false};
  // A skipped operation keeps the number the next one then takes: this rank's count on the group
  // falls behind its peers', as a rank that really missed a collective would.
  // Once: the next operation takes the same number and must not be skipped too.
  t.skipped = !skip_injected_ && fault_requested(rank_, "comm_skip", int64_t(t.seq), g.name);
  skip_injected_ = skip_injected_ || t.skipped;
  if (!t.skipped) g.issued = t.seq;
  *slot(t.id) = OpRecord{op,
                         group,
                         t.seq,
                         count,
                         peer,
                         now,
                         t.skipped ? now : 0,
                         t.skipped ? OpState::skipped : OpState::posted,
                         t.id};
  return t;
}

void FlightRecorder::set_state(const OpTicket& t, OpState s) {
  if (t.id == 0) return;
  const int64_t now = clock_();
  std::lock_guard lock(mu_);
  OpRecord* r = slot(t.id);
  if (r->id != t.id) return;  // overwritten by newer operations: nothing left to update
  r->state = s;
  if (s == OpState::waiting) r->start_ns = now;
  if (s == OpState::done) r->end_ns = now;
}

void FlightRecorder::waiting(const OpTicket& t) { set_state(t, OpState::waiting); }
void FlightRecorder::done(const OpTicket& t) { set_state(t, OpState::done); }

std::vector<OpRecord> FlightRecorder::last(int n) const {
  std::vector<OpRecord> out;
  std::lock_guard lock(mu_);
  const uint64_t newest = next_id_ - 1;
  const uint64_t k = std::min<uint64_t>({uint64_t(std::max(n, 0)), newest, ring_.size()});
  for (uint64_t id = newest - k + 1; id <= newest && k > 0; ++id)
    out.push_back(ring_[id % ring_.size()]);
  return out;
}

std::string FlightRecorder::issued_summary() const {
  std::lock_guard lock(mu_);
  std::string s;
  for (const Group& g : groups_)
    s += fmt::format("{}{} {}", s.empty() ? "" : ", ", g.label, g.issued);
  return s;
}

OpTracker::OpTracker(FlightRecorder* recorder, const std::string& name, const char* backend)
    : rec_(recorder), name_(name) {
  if (rec_) group_ = rec_->add_group(name, backend);
}

void OpTracker::wait_begin(const OpTicket& t, const char* op, int64_t count, int peer) {
  if (!rec_) return;
  rec_->waiting(t);
  {
    std::lock_guard lock(mu_);
    blocked_ = PendingOp{op, t.seq, count, peer, rec_->now_ns()};
  }
  maybe_injected_sleep(*rec_, t, name_);
}

void OpTracker::wait_end(const OpTicket& t) {
  if (!rec_) return;
  {
    std::lock_guard lock(mu_);
    blocked_.reset();
  }
  rec_->done(t);
}

std::optional<PendingOp> OpTracker::blocked() const {
  std::lock_guard lock(mu_);
  return blocked_;
}

void maybe_injected_sleep(const FlightRecorder& rec, const OpTicket& t, const std::string& name) {
  if (t.id == 0 || !fault_requested(rec.rank(), "comm_sleep", int64_t(t.seq), name)) return;
  // For good: only the watchdog (or the test's outer timeout) ends this process now.
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

}  // namespace tessera
