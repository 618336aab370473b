// ExecOptions: how a model runs, as opposed to what it is (ModelConfig). None of these change the
// weights, so a resumed run may choose them differently (the gradients live within one step) —
// except hidden_pairs, whose projections are parameters of the training run (kept in its
// checkpoints, not part of the model's architecture). The trainer derives them from the recipe
// (train.recompute, parallel.recompute_stages, precision.high_precision, distill).
#pragma once
#include <vector>

#include "kernels/op_types.h"

namespace tessera {

// One pair of distillation's hidden-state loss (model/hidden_loss.h; the recipe's
// distill.hidden_pairs): the student's residual stream after its first `student` blocks against
// the teacher's after its first `teacher` blocks, the latter teacher_hidden wide.
struct HiddenPair {
  int student = 0;         // 1 .. the student's num_layers
  int teacher = 0;         // 1 .. the teacher's num_layers
  int teacher_hidden = 0;  // the teacher's width (Ct); the student's is its own model.hidden (C)
  bool operator==(const HiddenPair&) const = default;
};

struct ExecOptions {
  // How attention runs on CUDA (train.attention); every attention op is given it.
  ops::AttentionImpl attention = ops::AttentionImpl::cudnn;
  // Activation recomputation: keep only each block's input; backward re-runs the block.
  bool recompute = false;
  // precision.high_precision: [lm_head] under 16-bit compute: the LM head's GEMMs, logits and
  // cross-entropy in FP32 (from FP32 copies of its weight and input).
  bool fp32_lm_head = false;
  // precision.high_precision: [embedding] under 16-bit compute: the lookup reads the FP32 master
  // table (and positions), sums in FP32 and rounds once into the residual stream, as Megatron's
  // embedding weights in FP32 do. Needs the masters on every rank (not with ZeRO-1).
  bool fp32_embedding = false;
  // precision.grad_reduce: fp32 under 16-bit compute: parameter gradients are FP32 (accumulated
  // over micro-batches and reduced over dp in FP32); otherwise they have the compute dtype.
  bool fp32_grads = false;
  // MoE statistics kept per block between resets: the micro-batches of one optimizer step.
  int moe_stat_records = 1;
  // Forward only (a distillation teacher): the parameters keep no gradients; backward is a bug.
  bool frozen = false;
  // Distillation: the last stage's training activation sets hold the teacher's logits (N, Vl)
  // and the KD loss's statistics, and the scratch its gradient (model/distill_loss.h).
  bool distill = false;
  // Distillation from a teacher cache (distill.teacher_cache): the KD loss reads the teacher's
  // top distill_top_k logits and ids per position and its lse at distill_num_temps temperatures
  // (the batch's cached rows) instead of its logits. 0: an online teacher.
  int distill_top_k = 0;
  int distill_num_temps = 0;
  // Distillation's hidden-state loss: every pair of the run (each stage uses those whose student
  // block it holds, declares their projections after its other parameters, and keeps one (N, Ct)
  // difference per pair in each training activation set). Empty: none.
  std::vector<HiddenPair> hidden_pairs;
};

}  // namespace tessera
