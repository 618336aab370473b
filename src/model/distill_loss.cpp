// The KD term: per-row T^2 KL from the kd_loss ops (one shard, or Megatron's three-step
// vocabulary-parallel reduction under tp), its mean over valid targets, and its gradient.
#include "model/distill_loss.h"

#include "kernels/ops.h"

namespace tessera {

double DistillLoss::forward(const LossInputs& in) {
  const DistillBuffers& d = in.distill;
  TS_CHECK(!d.teacher_logits.empty(), "the KD term runs without the teacher's logits");
  const ModelShard& s = *in.shard;
  if (s.tp_size == 1) {
    ops::kd_loss_forward(d.losses, d.lse, in.logits, d.teacher_logits, in.targets, in.vocab_size,
                         temperature_, reverse_);
  } else {
    // The row maxima of both distributions, then their sums of exp and the cross term, each
    // reduced over the vocabulary slices.
    Tensor row_max = d.stats.slice(0, 2), sums = d.stats.slice(2, 5);
    ops::kd_shard_max(row_max, in.logits, d.teacher_logits, in.vocab_start, in.vocab_size,
                      temperature_);
    s.tp_comm->all_reduce(row_max, ReduceOp::max);
    ops::kd_shard_sums(sums, in.logits, d.teacher_logits, row_max, in.vocab_start, in.vocab_size,
                       temperature_, reverse_);
    s.tp_comm->all_reduce(sums, ReduceOp::sum);
    ops::kd_shard_finish(d.losses, d.lse, row_max, sums, in.targets, temperature_, reverse_);
  }
  return mean_loss(d.losses, in.num_valid);
}

Tensor DistillLoss::backward(const LossInputs& in, float scale) {
  const DistillBuffers& d = in.distill;
  ops::kd_loss_backward(d.grad, in.logits, d.teacher_logits, d.lse, d.losses, in.targets,
                        in.vocab_size, temperature_, reverse_, scale * alpha_ / float(in.num_valid),
                        in.vocab_start);
  return d.grad;
}

}  // namespace tessera
