// train_step: one optimizer step, top to bottom (the contract is in train_step.h).
#include "train/train_step.h"

#include <chrono>
#include <cmath>
#include <limits>

#include "core/fault_inject.h"
#include "kernels/ops.h"
#include "train/distill.h"

namespace tessera {

namespace {

// True when any gradient on any rank holds an Inf or NaN: every rank checks its whole local
// gradient buffer (a sum of squares in double overflows only on a non-finite element) and the
// flags are combined over the world, so dp replicas, tp ranks and pipeline stages all agree.
bool grads_overflowed(Run& run) {
  const double local = ops::sum_squares(run.model().params().flat_grads());
  return run.ctx()
             .host_comm(Group::world)
             .all_reduce_scalar(std::isfinite(local) ? 0.0 : 1.0, ReduceOp::max) > 0.0;
}

// Forward and backward of every micro-batch of this dp rank; returns the sums of their losses
// (total, cross-entropy and each extra term; last stage only) and adds this stage's part of the
// hidden-state term's to *hidden_sum.
LossValues forward_backward(Run& run, int64_t step, float loss_scale, double* hidden_sum) {
  LossValues sum;
  for (int flush = 0; flush < run.num_flushes(); ++flush) {
    const auto fill = [&](int m, Batch& batch) {
      run.data().fill_train(step, flush * run.flush_micro() + m, batch);
    };
    // The data-parallel buckets launch during the step's last backward.
    const bool last = flush == run.num_flushes() - 1;
    const PipelineExecutor::Result res = run.pipe().train_step(fill, loss_scale, [&] {
      if (last) run.ddp().begin_last_microbatch();
    });
    add_losses(sum, res.parts);  // its total is res.loss_sum
    *hidden_sum += res.hidden_sum;
  }
  return sum;
}

// Distillation's step metrics: the curriculum's values and the mean cross-entropy, KD and
// hidden-state losses (the last summed over the stages that hold its pairs).
void record_distill(Run& run, const DistillWeights& w, const LossValues& sum, double hidden_sum,
                    StepResult& res) {
  const double n = double(run.num_micro()) * run.recipe().parallel.dp;
  res.distill = true;
  res.kd_weights = w;
  res.ce_loss = run.replica_sum(sum.ce) / n;
  double kd = 0.0;
  for (const LossPart& t : sum.terms)
    if (t.name == std::string("kd")) kd = t.value;
  res.kd_loss = run.replica_sum(kd) / n;
  // beta 0 evaluates nothing: the loss is the objective's alone, bit for bit.
  if (w.hidden_weight != 0.0f) {
    res.hidden_loss = run.stage_sum(hidden_sum) / n;
    res.loss += double(w.hidden_weight) * res.hidden_loss;
  }
}

}  // namespace

StepResult train_step(Run& run, int64_t step) {
  const Recipe& r = run.recipe();
  StepResult res;
  res.lr = run.lr().at(static_cast<int>(step));
  res.loss_scale = run.scaler() ? run.scaler()->scale() : 1.0f;
  fault_point(run.ctx().rank(), "train_step", step + 1);

  run.model().params().zero_grad();
  // QAT trains against fake-quantized weights from qat.start_step on; before, every GEMM is the
  // model's own (bit for bit the run without qat).
  if (run.qat()) run.qat()->set_active(r.qat.active_at(step));
  res.qat = run.qat() && run.qat()->active();
  const DistillWeights kd = begin_distill_step(run, step);
  const auto t0 = std::chrono::steady_clock::now();
  const float micro_scale = 1.0f / float(int64_t(run.num_micro()) * r.parallel.dp);
  double hidden_sum = 0.0;
  const LossValues losses = forward_backward(run, step, micro_scale * res.loss_scale, &hidden_sum);
  res.pipeline_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  run.ddp().finish();
  res.busy_s = run.pipe().take_busy_seconds();
  if (fault_requested(run.ctx().rank(), "inf_grad", step + 1))  // tests: one rank overflows
    ops::fill(run.model().params().flat_grads().slice(0, 1),
              std::numeric_limits<float>::infinity());
  res.loss = run.replica_sum(losses.total / run.num_micro()) / r.parallel.dp;
  if (run.kd_loss()) record_distill(run, kd, losses, hidden_sum, res);

  // Every rank passes the same flag, so every scaler takes the same decision.
  if (run.scaler()) res.skipped = run.scaler()->update(grads_overflowed(run));
  if (!res.skipped) {
    res.grad_norm = run.opt().global_grad_norm(run.model().params()) / res.loss_scale;
    if (!std::isfinite(res.grad_norm) || !std::isfinite(res.loss))
      TS_USER_ERROR("{}: training diverged at step {} (loss {}, grad norm {}); lower optim.lr",
                    r.file, step + 1, res.loss, res.grad_norm);
    // Unscaling is folded into AdamW's gradient scale with the clip factor.
    run.opt().step(run.model().params(), res.lr,
                   clip_factor(res.grad_norm, r.optim.grad_clip) / res.loss_scale);
  }
  // Delayed scaling: this step's amaxes, agreed over tp and dp, set the next step's scales.
  if (run.fp8()) run.fp8()->end_step(&run.ctx().comm(Group::tp), &run.ctx().comm(Group::dp));
  if (run.qat()) run.qat()->invalidate();  // the weights moved: re-quantize them once, on next use
  if (r.model.moe.enabled()) res.moe = moe_step_metrics(run);
  ops::synchronize(run.device());
  return res;
}

}  // namespace tessera
