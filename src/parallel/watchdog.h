// Watchdog: a thread per rank that ends a hung job. It polls the communicators it is given for
// their oldest unfinished operation; one older than parallel.timeout_s makes it print one line
// naming this rank, the operation, its group, its sequence number and the last operations of the
// flight recorder, abort the NCCL communicators, and end the job (MPI_Abort).
//
// Only a rank knows where it is stuck, and MPI is what is stuck, so no rank asks the others: each
// prints its own line. A hang leaves every rank blocked (the culprit in the operation it never
// finishes, its peers in that one or the next), so every watchdog fires within about a poll of
// the others; each waits kGraceSeconds after printing before it aborts, so the others' lines are
// out too. The culprit is the rank whose line shows the lowest count on the group: each line
// lists the operations this rank has issued per group.
#pragma once
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/flight_recorder.h"

namespace tessera {

// Seconds between a watchdog's line and its abort: the other ranks' watchdogs print theirs.
inline constexpr double kGraceSeconds = 3.0;
// Operations of the flight recorder a line shows.
inline constexpr int kLastOps = 8;

struct Hang {
  const Communicator* comm = nullptr;
  PendingOp op;
  double seconds = 0;  // how long it has been unfinished
};

// The longest-unfinished operation over `comms` if it has been so for more than timeout_s at
// now_ns (pure apart from polling the communicators; the watchdog's decision, unit tested).
std::optional<Hang> find_hang(const std::vector<Communicator*>& comms, int64_t now_ns,
                              double timeout_s);

// "rank R: stuck in OP on group G (seq N, E elements[, peer P]) for T s (parallel.timeout_s X);
// issued per group: ...; last ops: ..." (one line, no newline).
std::string hang_line(const FlightRecorder& recorder, const Hang& hang, double timeout_s);

class Watchdog {
 public:
  // Receives the line of a detected hang, on the watchdog's thread. The default prints it, waits
  // kGraceSeconds, calls abort_for_watchdog() on every communicator and ends the job with status
  // 1: MPI_Abort when MPI runs at MPI_THREAD_MULTIPLE (MpiRuntime asks for it), else _Exit, which
  // mpirun and `srun --kill-on-bad-exit` turn into the end of the job.
  using OnHang = std::function<void(const std::string& line)>;

  // Starts the thread; timeout_s > 0. The communicators and the recorder must outlive it.
  Watchdog(std::vector<Communicator*> comms, const FlightRecorder& recorder, double timeout_s,
           OnHang on_hang = {});
  ~Watchdog();  // stops and joins the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  void run();

  std::vector<Communicator*> comms_;
  const FlightRecorder& recorder_;
  double timeout_s_;
  OnHang on_hang_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;  // last: started once the members above exist
};

// The default OnHang (see Watchdog); never returns.
[[noreturn]] void end_job_for_hang(const std::vector<Communicator*>& comms,
                                   const std::string& line);

}  // namespace tessera
