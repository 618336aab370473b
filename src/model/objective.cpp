// The objective: (vocabulary-parallel) cross-entropy with Megatron's three-step reduction, plus
// extra loss terms whose gradients are added to the in-place cross-entropy gradient.
#include "model/objective.h"

#include <vector>

#include "core/memory.h"
#include "kernels/ops.h"

namespace tessera {

namespace {

// Per-row losses into ce.losses (ignored rows 0) and ce.lse.
void cross_entropy_rows(const LossInputs& in, const CrossEntropyBuffers& ce) {
  const ModelShard& s = *in.shard;
  if (s.tp_size == 1) {
    ops::cross_entropy_forward(ce.losses, ce.lse, in.logits, in.targets, in.vocab_size);
    return;
  }
  // Global row max, then the sums of exp and the target logit (which only its owner rank
  // contributes) in one all-reduce, then lse and the loss.
  const int64_t N = in.targets.numel();
  Tensor row_max = ce.stats.slice(0, 1).view({N});
  Tensor sums = ce.stats.slice(1, 3);
  Tensor sum_exp = sums.slice(0, 1).view({N}), target_logit = sums.slice(1, 2).view({N});
  ops::cross_entropy_shard_max(row_max, in.logits, in.vocab_start, in.vocab_size);
  s.tp_comm->all_reduce(row_max, ReduceOp::max);
  ops::cross_entropy_shard_sums(sum_exp, target_logit, in.logits, row_max, in.targets,
                                in.vocab_start, in.vocab_size);
  s.tp_comm->all_reduce(sums, ReduceOp::sum);
  ops::cross_entropy_shard_finish(ce.losses, ce.lse, row_max, sum_exp, target_logit, in.targets);
}

}  // namespace

double mean_loss(const Tensor& losses, int64_t num_valid) {
  const int64_t N = losses.numel();
  std::vector<double> host(N);
  Tensor host_losses(host.data(), DType::f64, Device::cpu, {N});
  if (losses.device == Device::cpu) {
    ops::cast(host_losses, losses);
  } else {
    std::vector<float> f(N);
    copy_bytes(f.data(), Device::cpu, losses.data, losses.device, losses.nbytes());
    for (int64_t i = 0; i < N; ++i) host[i] = f[i];
  }
  double sum = 0.0;
  for (double v : host) sum += v;
  return num_valid > 0 ? sum / double(num_valid) : 0.0;
}

void add_losses(LossValues& sum, const LossValues& v) {
  sum.total += v.total;
  sum.ce += v.ce;
  if (sum.terms.empty()) sum.terms.resize(v.terms.size());
  for (size_t i = 0; i < v.terms.size(); ++i) {
    sum.terms[i].name = v.terms[i].name;
    sum.terms[i].value += v.terms[i].value;
    sum.terms[i].weight = v.terms[i].weight;
  }
}

LossValues Objective::forward(const LossInputs& in, const CrossEntropyBuffers& ce,
                              bool with_terms) const {
  cross_entropy_rows(in, ce);
  LossValues v;
  v.ce = mean_loss(ce.losses, in.num_valid);
  v.total = double(ce_weight_) * v.ce;
  if (!with_terms) return v;
  for (const auto& t : terms_) {
    const float w = t->weight();
    const double x = w != 0.0f ? t->forward(in) : 0.0;
    v.terms.push_back({t->name(), x, w});
    v.total += double(w) * x;
  }
  return v;
}

void Objective::backward(const LossInputs& in, const CrossEntropyBuffers& ce,
                         float loss_scale) const {
  // The terms' gradients, summed into the first one's tensor, join the cross-entropy's in its
  // backward pass (its addend), so the logits are written once.
  Tensor extra;
  for (const auto& t : terms_) {
    if (t->weight() == 0.0f) continue;
    const Tensor d = t->backward(in, loss_scale);
    if (extra.empty())
      extra = d;
    else
      ops::add_inplace(extra, d);
  }
  // d(loss_scale * ce_weight * mean) / d loss_n = loss_scale * ce_weight / valid.
  ops::cross_entropy_backward(in.logits, in.logits, ce.lse, in.targets, in.vocab_size,
                              loss_scale * ce_weight_ / float(in.num_valid), in.vocab_start, extra);
}

}  // namespace tessera
