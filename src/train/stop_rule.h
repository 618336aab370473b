// When the step loop stops early: a stop signal on any rank (stop_signals.h), or a deadline
// (train.time_limit, SLURM_JOB_END_TIME) too close to fit one more step and a checkpoint save.
// The ranks agree at every step boundary, so all of them stop after the same step.
#pragma once
#include <chrono>
#include <optional>
#include <string>

#include "config/recipe.h"
#include "parallel/communicator.h"

namespace tessera {

// The time rule. A step boundary stops the run when the time left is less than
//   kStopSafety * (step_s + save_s) + kStopMarginS,
// step_s being the longest boundary-to-boundary interval so far (evaluations and scheduled saves
// included) and save_s the longest checkpoint save so far, or before any a guess from the bytes
// this rank writes at kAssumedSaveBytesPerS. The margin covers the agreement, MPI_Finalize and
// the launcher; the factor, a step or save slower than any before.
inline constexpr double kStopSafety = 1.5;
inline constexpr double kStopMarginS = 5.0;
inline constexpr double kAssumedSaveBytesPerS = 100e6;

struct StopEstimate {
  double step_s = 0.0;  // 0 before the first step
  double save_s = 0.0;
};

// True when `remaining_s` would not fit another step and a save (the rule above).
bool out_of_time(double remaining_s, const StopEstimate& e);

// The earlier of train.time_limit seconds after the start of training and the absolute end time
// SLURM_JOB_END_TIME (Unix seconds, set by Slurm in the job's environment); none when neither.
class Deadline {
 public:
  using Clock = std::chrono::steady_clock;
  Deadline() = default;
  // time_limit_s <= 0: no limit of its own.
  Deadline(double time_limit_s, std::optional<double> end_epoch_s, Clock::time_point start);

  bool set() const { return time_limit_s_ > 0.0 || end_epoch_s_.has_value(); }
  // Seconds left at (now, now_epoch_s): the smaller of the two; +infinity when none is set.
  double remaining_s(Clock::time_point now, double now_epoch_s) const;
  double remaining_s() const;    // now
  std::string describe() const;  // "train.time_limit 3600 s", "SLURM_JOB_END_TIME 1767225600"

 private:
  double time_limit_s_ = 0.0;
  std::optional<double> end_epoch_s_;
  Clock::time_point start_{};
};

// SLURM_JOB_END_TIME's value as Unix seconds; nullopt when unset, empty or not a positive number.
std::optional<double> parse_job_end_time(const char* text);

// The job's deadline from the recipe and the environment, counting from `start`. Rank 0 warns
// about a SLURM_JOB_END_TIME that is set but unreadable.
Deadline job_deadline(const Recipe& r, Deadline::Clock::time_point start);

enum class StopReason { none, time_limit, signal };

struct StopDecision {
  StopReason reason = StopReason::none;
  int signal = 0;            // reason signal: the highest signal number any rank received
  double remaining_s = 0.0;  // this rank's time left by the deadline
  explicit operator bool() const { return reason != StopReason::none; }
  std::string describe() const;  // "SIGTERM", "SIGUSR1", "12 s left" (the deadline's)
};

// The agreement. Every rank calls at_boundary() at the same step boundaries; each contributes
// its own signal flag and time verdict, combined by one all-reduce (max) of one double over
// `world` on the host, so every rank gets the same answer even when the signal reached only one
// of them or the clocks differ. That is one latency-bound 8-byte all-reduce per step, tens of
// microseconds against steps of 0.1 s and more.
class StopCheck {
 public:
  // `world`: the host communicator of every rank of the job. `save_guess_s`: the save time
  // assumed until one has been measured.
  StopCheck(Communicator& world, Deadline deadline, double save_guess_s);

  StopDecision at_boundary();  // collective over `world`
  void saved(double seconds);  // a checkpoint save took this long
  const StopEstimate& estimate() const { return est_; }

 private:
  Communicator& world_;
  Deadline deadline_;
  StopEstimate est_;
  std::optional<Deadline::Clock::time_point> last_boundary_;
  bool save_measured_ = false;
};

}  // namespace tessera
