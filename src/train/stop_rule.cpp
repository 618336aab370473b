// The time rule, the job deadline and the per-boundary agreement on stopping (stop_rule.h).
#include "train/stop_rule.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <limits>

#include "core/log.h"
#include "parallel/mpi_runtime.h"
#include "train/stop_signals.h"

namespace tessera {

namespace {

double epoch_now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

const char* signal_name(int signo) {
  if (signo == SIGTERM) return "SIGTERM";
  if (signo == SIGUSR1) return "SIGUSR1";
  return "a signal";
}

}  // namespace

bool out_of_time(double remaining_s, const StopEstimate& e) {
  return remaining_s < kStopSafety * (e.step_s + e.save_s) + kStopMarginS;
}

Deadline::Deadline(double time_limit_s, std::optional<double> end_epoch_s, Clock::time_point start)
    : time_limit_s_(time_limit_s), end_epoch_s_(end_epoch_s), start_(start) {}

double Deadline::remaining_s(Clock::time_point now, double now_epoch_s) const {
  double left = std::numeric_limits<double>::infinity();
  if (time_limit_s_ > 0.0)
    left = time_limit_s_ - std::chrono::duration<double>(now - start_).count();
  if (end_epoch_s_) left = std::min(left, *end_epoch_s_ - now_epoch_s);
  return left;
}

double Deadline::remaining_s() const { return remaining_s(Clock::now(), epoch_now_s()); }

std::string Deadline::describe() const {
  std::string s;
  if (time_limit_s_ > 0.0) s = fmt::format("train.time_limit {} s", time_limit_s_);
  if (end_epoch_s_)
    s += fmt::format("{}SLURM_JOB_END_TIME {:.0f}", s.empty() ? "" : " and ", *end_epoch_s_);
  return s.empty() ? "none" : s;
}

std::optional<double> parse_job_end_time(const char* text) {
  if (!text || !*text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text, &end);
  if (errno != 0 || *end != '\0' || !std::isfinite(v) || v <= 0.0) return std::nullopt;
  return v;
}

Deadline job_deadline(const Recipe& r, Deadline::Clock::time_point start) {
  const char* env = std::getenv("SLURM_JOB_END_TIME");
  const std::optional<double> end = parse_job_end_time(env);
  if (env && *env && !end && world_rank() == 0)  // every rank reads the same environment
    log_warn("SLURM_JOB_END_TIME='{}' is not Unix seconds; ignoring it", env);
  return Deadline(r.train.time_limit, end, start);
}

std::string StopDecision::describe() const {
  if (reason == StopReason::signal) return signal_name(signal);
  if (reason == StopReason::time_limit)
    return fmt::format("{:.0f} s left", std::max(0.0, remaining_s));
  return "none";
}

StopCheck::StopCheck(Communicator& world, Deadline deadline, double save_guess_s)
    : world_(world), deadline_(deadline) {
  est_.save_s = save_guess_s;
}

StopDecision StopCheck::at_boundary() {
  const auto now = Deadline::Clock::now();
  if (last_boundary_)
    est_.step_s =
        std::max(est_.step_s, std::chrono::duration<double>(now - *last_boundary_).count());
  last_boundary_ = now;
  StopDecision d;
  d.remaining_s = deadline_.remaining_s(now, epoch_now_s());
  // One value per rank: its signal's number (SIGTERM 15, SIGUSR1 10), else 1 when its deadline
  // is too close, else 0. The maximum says whether to stop, and a signal outranks the deadline.
  const int signo = stop_signal_received();
  const double mine = signo > 0 ? double(signo) : out_of_time(d.remaining_s, est_) ? 1.0 : 0.0;
  const double all = world_.all_reduce_scalar(mine, ReduceOp::max);
  if (all >= 2.0) {
    d.reason = StopReason::signal;
    d.signal = int(all);
  } else if (all >= 1.0) {
    d.reason = StopReason::time_limit;
  }
  return d;
}

void StopCheck::saved(double seconds) {
  // The first measurement replaces the guess, which may have been far too high or too low.
  est_.save_s = save_measured_ ? std::max(est_.save_s, seconds) : seconds;
  save_measured_ = true;
}

}  // namespace tessera
