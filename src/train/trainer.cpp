// The step loop: at each step boundary the ranks agree whether to stop (stop_rule.h), then
// train_step and what the schedule asks for after it (a metrics record, an evaluation every
// train.eval_every steps, a checkpoint every checkpoint.every steps), and at the end a final
// evaluation, a final checkpoint and the samples. Everything a step depends on is in the checkpoint
// (weights, moments, step count, loss-scaler and FP8 state; the loader is a pure function of
// (seed, step, rank)), which is why a resumed run reproduces the uninterrupted one bit for bit,
// from any step: a preempted run's checkpoint is an ordinary one.
#include "train/trainer.h"

#include <chrono>
#include <filesystem>
#include <optional>

#include "core/fault_inject.h"
#include "core/log.h"
#include "io/checkpoint.h"
#include "parallel/mpi_runtime.h"
#include "train/evaluate.h"
#include "train/generate.h"
#include "train/metrics.h"
#include "train/run.h"
#include "train/stop_rule.h"
#include "train/train_step.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string step_dir(const Recipe& r, int64_t step) {
  return (fs::path(io::checkpoints_dir(r.train.out_dir)) / io::step_dir_name(step)).string();
}

// The step of this run directory's own checkpoint the run resumed from, else -1: stopping right
// after such a resume must not write that checkpoint again.
int64_t resumed_own_checkpoint(const Run& run) {
  if (run.resumed_from().empty()) return -1;
  std::error_code ec;
  const bool own = fs::equivalent(run.resumed_from(), step_dir(run.recipe(), run.start_step()), ec);
  return own ? run.start_step() : -1;
}

// Until a save has been timed: this rank's FP32 masters and two AdamW moments at a slow file
// system's pace (stop_rule.h).
double save_guess_s(Run& run) {
  return double(run.model().params().num_elements()) * 3 * 4 / kAssumedSaveBytesPerS;
}

}  // namespace

TrainSummary train(const Recipe& recipe) {
  const auto started = std::chrono::steady_clock::now();
  signal_point(world_rank(), "term_in_warmup", 0);  // tests: preempted before the Run exists
  // Rank 0 binds the metrics port before building the Run (minutes for a large model): a port in
  // use stops the job at once.
  std::optional<TrainExporter> exporter;
  if (recipe.logging.prometheus_port > 0 && world_rank() == 0) exporter.emplace(recipe);
  Run run(recipe);
  const Recipe& r = run.recipe();
  RunMetrics metrics(run, exporter ? &*exporter : nullptr);
  OpProfile profile(run);
  const Deadline deadline = job_deadline(r, started);
  if (deadline.set() && run.rank0())
    log_info("deadline: {}; {:.0f} s left", deadline.describe(), deadline.remaining_s());
  StopCheck stop(run.ctx().host_comm(Group::world), deadline, save_guess_s(run));
  int64_t saved_step = resumed_own_checkpoint(run);
  const auto save = [&](int64_t at) {
    const auto t0 = std::chrono::steady_clock::now();
    run.save(at);
    stop.saved(seconds_since(t0));
    saved_step = at;
  };
  TrainSummary summary;
  summary.first_step = run.start_step();
  const auto loop_start = std::chrono::steady_clock::now();
  int64_t step = run.start_step();
  StopDecision stopping;
  for (;; ++step) {
    stopping = stop.at_boundary();  // also after the last step: a stop skips the final phase
    if (stopping || step == r.train.steps) break;
    profile.before_step(step);
    const auto t0 = std::chrono::steady_clock::now();
    const StepResult s = train_step(run, step);
    const double seconds = seconds_since(t0);
    profile.after_step(seconds);
    const int64_t done = step + 1;
    metrics.record_step(done, s, seconds);
    summary.last_train_loss = s.loss;
    const bool last = done == r.train.steps;
    if (r.train.eval_every > 0 && done % r.train.eval_every == 0 && !last) {
      signal_point(run.ctx().rank(), "term_in_eval", done);  // tests: preempted as it starts
      metrics.record_eval(done, evaluate(run));
    }
    if (r.checkpoint.every > 0 && done % r.checkpoint.every == 0 && !last) save(done);
  }
  summary.train_seconds = seconds_since(loop_start);
  summary.last_step = step;
  profile.report();
  if (stopping) {
    summary.preempted = true;
    summary.stop_reason = stopping.reason == StopReason::signal
                              ? stopping.describe()
                              : deadline.describe() + ": " + stopping.describe();
    summary.checkpoint = step_dir(r, step);
    if (run.rank0())
      log_info("stopping after step {} ({}): {}", step, summary.stop_reason,
               saved_step == step ? "its checkpoint is written already" : "saving a checkpoint");
    if (saved_step != step) save(step);
    return summary;
  }
  const EvalResult final_eval = evaluate(run);
  metrics.record_eval(step, final_eval);
  summary.final_val_loss = final_eval.loss;
  if (step > run.start_step() && r.checkpoint.save_final) save(step);
  if (run.rank0())
    log_info("trained steps {}..{} in {}", run.start_step(), step,
             format_duration(summary.train_seconds));
  print_samples(run);
  return summary;
}

}  // namespace tessera
