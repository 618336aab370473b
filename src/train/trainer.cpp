// The step loop: train_step, then what the schedule asks for after it (a metrics record, an
// evaluation every train.eval_every steps, a checkpoint every checkpoint.every steps), and at the
// end a final evaluation, a final checkpoint and the samples. Everything a step depends on is in
// the checkpoint (weights, moments, step count, loss-scaler and FP8 state; the loader is a pure
// function of (seed, step, rank)), which is why a resumed run reproduces the uninterrupted one bit
// for bit.
#include "train/trainer.h"

#include <chrono>
#include <optional>

#include "core/log.h"
#include "parallel/mpi_runtime.h"
#include "train/evaluate.h"
#include "train/generate.h"
#include "train/metrics.h"
#include "train/run.h"
#include "train/train_step.h"

namespace tessera {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

TrainSummary train(const Recipe& recipe) {
  // Rank 0 binds the metrics port before building the Run (minutes for a large model): a port in
  // use stops the job at once.
  std::optional<TrainExporter> exporter;
  if (recipe.logging.prometheus_port > 0 && world_rank() == 0) exporter.emplace(recipe);
  Run run(recipe);
  const Recipe& r = run.recipe();
  RunMetrics metrics(run, exporter ? &*exporter : nullptr);
  OpProfile profile(run);
  TrainSummary summary;
  summary.first_step = run.start_step();
  const auto loop_start = std::chrono::steady_clock::now();
  int64_t step = run.start_step();
  for (; step < r.train.steps; ++step) {
    profile.before_step(step);
    const auto t0 = std::chrono::steady_clock::now();
    const StepResult s = train_step(run, step);
    const double seconds = seconds_since(t0);
    profile.after_step(seconds);
    const int64_t done = step + 1;
    metrics.record_step(done, s, seconds);
    summary.last_train_loss = s.loss;
    const bool last = done == r.train.steps;
    if (r.train.eval_every > 0 && done % r.train.eval_every == 0 && !last)
      metrics.record_eval(done, evaluate(run));
    if (r.checkpoint.every > 0 && done % r.checkpoint.every == 0 && !last) run.save(done);
  }
  summary.train_seconds = seconds_since(loop_start);
  summary.last_step = step;
  profile.report();
  const EvalResult final_eval = evaluate(run);
  metrics.record_eval(step, final_eval);
  summary.final_val_loss = final_eval.loss;
  if (step > run.start_step() && r.checkpoint.save_final) run.save(step);
  if (run.rank0())
    log_info("trained steps {}..{} in {}", run.start_step(), step,
             format_duration(summary.train_seconds));
  print_samples(run);
  return summary;
}

}  // namespace tessera
