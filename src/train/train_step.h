// One optimizer step under any (dp, tp, pp) layout: zero the gradients; run every pipeline flush
// of this dp rank's micro-batches (forward, the objective, backward with the loss scaled by
// loss_scale / (M dp), so the gradients summed over dp are the mean over the step's tokens);
// (distilling: the curriculum sets the KD, CE and hidden-state weights and runs the teacher beside
// each forward); finish the data-parallel reduction; under fp16 skip the step job-wide when any
// gradient overflowed; otherwise clip by the global norm and take the AdamW step; then roll FP8
// scales.
#pragma once
#include <cstdint>

#include <vector>

#include "train/moe_metrics.h"
#include "train/run.h"

namespace tessera {

struct StepResult {
  double loss = 0.0;       // the objective's mean over the step's tokens, the same on every rank
  double grad_norm = 0.0;  // of the unscaled gradients, before clipping (0 when skipped)
  float lr = 0.0f;
  float loss_scale = 1.0f;  // the scale this step's backward used (1 without fp16)
  bool skipped = false;     // fp16: a gradient overflowed somewhere, nothing was updated
  double pipeline_s = 0.0;  // wall time of the forward/backward phase
  double busy_s = 0.0;      // stage compute time within it (measured with logging.profile_ops)
  std::vector<MoeLayerMetrics> moe;  // MoE models: the router statistics of this step
  // Distillation: the curriculum's values for this step and its mean cross-entropy, KD and
  // hidden-state losses (unweighted; loss = alpha kd_loss + (1 - alpha) ce_loss +
  // kd_weights.hidden_weight hidden_loss; hidden_loss is 0 when that weight is).
  bool distill = false;
  DistillWeights kd_weights;
  double ce_loss = 0.0, kd_loss = 0.0, hidden_loss = 0.0;
  bool qat = false;  // this step's GEMMs read fake-quantized weights (qat.start_step reached)
};

// `step` is 0-based: the LR schedule's clock, and the loader's (seed, step, rank) -> batch key.
StepResult train_step(Run& run, int64_t step);

}  // namespace tessera
