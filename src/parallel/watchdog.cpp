// Watchdog: the poll loop, the hang decision, the one-line report and the end of the job.
#include "parallel/watchdog.h"

#include <fmt/format.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_runtime.h"

namespace tessera {

namespace {

// Polls often enough to fire within a tenth of the timeout, at most once a second (each poll
// takes a lock per communicator and, on NCCL, queries one event each).
std::chrono::milliseconds poll_period(double timeout_s) {
  const double ms = std::min(1000.0, std::max(50.0, timeout_s * 100.0));
  return std::chrono::milliseconds(int64_t(ms));
}

const char* backend(const Communicator& c) { return c.device() == Device::cpu ? "mpi" : "nccl"; }

std::string describe(const OpRecord& r, const FlightRecorder& rec, int64_t now_ns) {
  std::string s = fmt::format("{} {}#{}", rec.group_label(r.group), r.op, r.seq);
  if (r.peer >= 0) s += fmt::format(" peer {}", r.peer);
  s += fmt::format(" {}", op_state_name(r.state));
  if (r.state == OpState::posted || r.state == OpState::waiting)
    s += fmt::format(" {:.1f}s", double(now_ns - r.start_ns) * 1e-9);
  return s;
}

}  // namespace

std::optional<Hang> find_hang(const std::vector<Communicator*>& comms, int64_t now_ns,
                              double timeout_s) {
  std::optional<Hang> worst;
  for (Communicator* c : comms) {
    const std::optional<PendingOp> p = c->oldest_pending();
    if (!p) continue;
    const double seconds = double(now_ns - p->since_ns) * 1e-9;
    if (seconds > timeout_s && (!worst || seconds > worst->seconds)) worst = Hang{c, *p, seconds};
  }
  return worst;
}

std::string hang_line(const FlightRecorder& recorder, const Hang& hang, double timeout_s) {
  const PendingOp& op = hang.op;
  std::string line = fmt::format(
      "rank {}: stuck in {} on group '{}' ({}, seq {}, {} elements{}) for {:.1f} s "
      "(parallel.timeout_s {}); issued per group: {}; last ops:",
      recorder.rank(), op.op, hang.comm->name(), backend(*hang.comm), op.seq, op.count,
      op.peer >= 0 ? fmt::format(", peer {}", op.peer) : "", hang.seconds, timeout_s,
      recorder.issued_summary());
  const int64_t now = recorder.now_ns();
  const std::vector<OpRecord> last = recorder.last(kLastOps);
  for (size_t i = 0; i < last.size(); ++i)
    line += (i ? ", " : " ") + describe(last[i], recorder, now);
  return line;
}

Watchdog::Watchdog(std::vector<Communicator*> comms, const FlightRecorder& recorder,
                   double timeout_s, OnHang on_hang)
    : comms_(std::move(comms)),
      recorder_(recorder),
      timeout_s_(timeout_s),
      on_hang_(std::move(on_hang)) {
  TS_CHECK(timeout_s_ > 0, "watchdog timeout {} s", timeout_s_);
  if (!on_hang_) on_hang_ = [this](const std::string& line) { end_job_for_hang(comms_, line); };
  int level = MPI_THREAD_MULTIPLE;
  if (mpi_active()) MPI_Query_thread(&level);
  if (level != MPI_THREAD_MULTIPLE)
    log_warn(
        "MPI runs at thread level {}, below MPI_THREAD_MULTIPLE ({}): on a hang the watchdog "
        "ends its own process and leaves ending the job to the launcher",
        level, MPI_THREAD_MULTIPLE);
  thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::run() {
  const auto period = poll_period(timeout_s_);
  std::unique_lock lock(mu_);
  while (!wake_.wait_for(lock, period, [this] { return stop_; })) {
    lock.unlock();
    const std::optional<Hang> hang = find_hang(comms_, recorder_.now_ns(), timeout_s_);
    if (hang) {
      on_hang_(hang_line(recorder_, *hang, timeout_s_));
      return;  // one report per watchdog
    }
    lock.lock();
  }
}

void end_job_for_hang(const std::vector<Communicator*>& comms, const std::string& line) {
  std::fprintf(stderr, "watchdog: %s\n", line.c_str());
  std::fflush(stderr);
  std::this_thread::sleep_for(std::chrono::duration<double>(kGraceSeconds));
  // If an abort below hangs in turn (ncclCommAbort on a wedged GPU, MPI_Abort without a
  // launcher that answers), this ends the process anyway.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    std::_Exit(1);
  }).detach();
  for (Communicator* c : comms) c->abort_for_watchdog();
  // MPI_Abort from this thread is only allowed at MPI_THREAD_MULTIPLE (the training thread is
  // inside MPI). MPI_Query_thread may be called from any thread.
  int level = MPI_THREAD_SINGLE;
  if (mpi_active()) MPI_Query_thread(&level);
  if (level == MPI_THREAD_MULTIPLE) abort_job(1);
  std::fflush(stdout);
  std::_Exit(1);
}

}  // namespace tessera
