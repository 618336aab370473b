// The KD term: per-row T^2 KL from the kd_loss ops (one shard, or Megatron's three-step
// vocabulary-parallel reduction under tp), its mean over valid targets, and its gradient.
#include "model/distill_loss.h"

#include <cmath>

#include "kernels/ops.h"

namespace tessera {

Tensor DistillLoss::cached_lse(const DistillBuffers& d) const {
  for (size_t i = 0; i < cache_temps_.size(); ++i)
    if (std::abs(cache_temps_[i] - temperature_) <= 1e-6f * temperature_) {
      const int64_t N = d.teacher_lse.shape[2];
      return d.teacher_lse.slice(int64_t(i), int64_t(i) + 1).view({2, N});
    }
  TS_BUG("temperature {} is not among the teacher cache's", temperature_);
}

double DistillLoss::forward(const LossInputs& in) {
  const DistillBuffers& d = in.distill;
  const ModelShard& s = *in.shard;
  if (d.sparse()) {
    const Tensor lse_t = cached_lse(d);
    if (s.tp_size == 1) {
      ops::kd_sparse_forward(d.losses, d.sparse_stats, in.logits, d.topk_logits, d.topk_ids, lse_t,
                             in.targets, in.vocab_size, temperature_, reverse_);
    } else {  // the same three-step reduction over the vocabulary slices
      ops::kd_sparse_shard_max(d.sparse_max, in.logits, in.vocab_start, in.vocab_size,
                               temperature_);
      s.tp_comm->all_reduce(d.sparse_max, ReduceOp::max);
      ops::kd_sparse_shard_sums(d.sparse_sums, in.logits, d.topk_ids, d.sparse_max, in.vocab_start,
                                in.vocab_size, temperature_);
      s.tp_comm->all_reduce(d.sparse_sums, ReduceOp::sum);
      ops::kd_sparse_shard_finish(d.losses, d.sparse_stats, d.sparse_max, d.sparse_sums,
                                  d.topk_logits, lse_t, in.targets, temperature_, reverse_);
    }
    return mean_loss(d.losses, in.num_valid);
  }
  TS_CHECK(!d.teacher_logits.empty(), "the KD term runs without the teacher's logits");
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
  const float dloss = scale * alpha_ / float(in.num_valid);
  if (d.sparse()) {
    ops::kd_sparse_backward(d.grad, in.logits, d.topk_logits, d.topk_ids, cached_lse(d),
                            d.sparse_stats, d.losses, in.targets, in.vocab_size, temperature_,
                            reverse_, dloss, in.vocab_start);
    return d.grad;
  }
  ops::kd_loss_backward(d.grad, in.logits, d.teacher_logits, d.lse, d.losses, in.targets,
                        in.vocab_size, temperature_, reverse_, dloss, in.vocab_start);
  return d.grad;
}

}  // namespace tessera
