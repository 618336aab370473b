// FlightRecorder: one rank's ring of its last communication operations (op, group, per-group
// sequence number, elements, peer, start time, state), written by the communicators and read by
// the watchdog (watchdog.h) to say where a hung job stands. OpTracker is one communicator's link.
//
// Cost: every record is a few stores under a std::mutex that only the watchdog also takes, once
// per poll (copying at most capacity records, well under a microsecond). Uncontended, a lock and
// unlock are two atomic read-modify-writes; with three clock reads, the three calls an operation
// makes (begin, waiting, done) took 0.3 us in all on a busy 2-core CI machine (the recorder's unit
// test prints it), against >= 1 us for an MPI operation on shared memory and ~5 us to launch an
// NCCL kernel, and a training step makes tens to hundreds of operations. The ring is allocated
// once; nothing allocates per operation.
#pragma once
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace tessera {

enum class OpState : uint8_t {
  posted,   // issued (GPU: enqueued on the communicator's stream)
  waiting,  // the host blocks on it (MPI wait, broadcast, barrier)
  done,
  skipped,  // dropped by fault injection (op=comm_skip); it did not take a sequence number
};
const char* op_state_name(OpState s);  // "posted", "waiting", "done", "skipped"

struct OpRecord {
  const char* op = nullptr;  // a string literal: "all_reduce", "send", ...
  int group = -1;            // FlightRecorder::group_label(group)
  uint64_t seq = 0;          // the group's n-th operation, from 1
  int64_t count = 0;         // elements
  int peer = -1;             // point-to-point: the peer's rank in the group; -1 for collectives
  int64_t start_ns = 0;      // issued; reset when the host starts to wait on it
  int64_t end_ns = 0;        // done or skipped
  OpState state = OpState::posted;
  uint64_t id = 0;  // recorder-wide running number (0: empty slot); ring slot = id % capacity
};

// Identifies an operation to the recorder; id 0 when recording is off.
struct OpTicket {
  uint64_t id = 0;
  int group = -1;
  uint64_t seq = 0;
  bool skipped = false;  // fault injection dropped it: the caller does nothing
};

class FlightRecorder {
 public:
  using Clock = int64_t (*)();  // nanoseconds, monotonic
  static int64_t steady_ns();

  // `rank`: this process's global rank (for fault injection and messages).
  explicit FlightRecorder(int rank, int capacity = 64, Clock clock = steady_ns);
  FlightRecorder(const FlightRecorder&) = delete;
  FlightRecorder& operator=(const FlightRecorder&) = delete;

  int rank() const { return rank_; }
  int64_t now_ns() const { return clock_(); }

  // A communicator joins (before it records): its label is "<name>/<backend>", e.g. "dp/mpi".
  int add_group(const std::string& name, const char* backend);
  std::string group_label(int group) const;

  // The next operation of `group`: takes its sequence number, or records it as skipped (without
  // one) when TESSERA_FAULT_INJECT asks for op=comm_skip at that number on this rank (once).
  OpTicket begin(int group, const char* op, int64_t count, int peer);
  // The host starts to block on the operation; its clock restarts (MPI's non-blocking operations
  // progress only inside MPI calls, so the time between posting and waiting is not a wait).
  void waiting(const OpTicket& t);
  void done(const OpTicket& t);

  // The newest `n` records, oldest first.
  std::vector<OpRecord> last(int n) const;
  // Operations issued per group so far: "dp/mpi 12, world/mpi 3" (a peer that issued fewer on a
  // group is behind this rank there).
  std::string issued_summary() const;

 private:
  OpRecord* slot(uint64_t id) { return &ring_[id % ring_.size()]; }
  void set_state(const OpTicket& t, OpState s);

  const int rank_;
  const Clock clock_;
  mutable std::mutex mu_;
  std::vector<OpRecord> ring_;
  uint64_t next_id_ = 1;
  bool skip_injected_ = false;
  struct Group {
    std::string name;   // for fault injection's group=
    std::string label;  // name/backend, for messages
    uint64_t issued = 0;
  };
  std::deque<Group> groups_;  // deque: entries never move once added
};

// What a communicator reports to the watchdog: its oldest unfinished operation.
struct PendingOp {
  const char* op = nullptr;
  uint64_t seq = 0;
  int64_t count = 0;
  int peer = -1;
  int64_t since_ns = 0;  // MPI: when the host began to wait; NCCL: when it was enqueued
};

// One MPI-style communicator's side of the recorder: its group, and the operation the host is
// blocked in, which is what the watchdog polls. A null recorder switches tracking off
// (communicators built outside a ParallelContext, e.g. in unit tests).
class OpTracker {
 public:
  OpTracker(FlightRecorder* recorder, const std::string& name, const char* backend);
  FlightRecorder* recorder() const { return rec_; }
  int group() const { return group_; }

  OpTicket begin(const char* op, int64_t count, int peer = -1) {
    return rec_ ? rec_->begin(group_, op, count, peer) : OpTicket{};
  }
  // Brackets the host's blocking wait on `t`. wait_begin sleeps for good when fault injection
  // asks for op=comm_sleep at t's sequence number on this rank (a rank hung inside a collective).
  void wait_begin(const OpTicket& t, const char* op, int64_t count, int peer = -1);
  void wait_end(const OpTicket& t);
  std::optional<PendingOp> blocked() const;

 private:
  FlightRecorder* rec_;
  int group_ = -1;
  std::string name_;
  mutable std::mutex mu_;
  std::optional<PendingOp> blocked_;
};

// Sleeps for good when TESSERA_FAULT_INJECT asks for op=comm_sleep on this rank at `t` (tests:
// a rank stuck inside an operation; the watchdog must end the job).
void maybe_injected_sleep(const FlightRecorder& rec, const OpTicket& t, const std::string& name);

}  // namespace tessera
