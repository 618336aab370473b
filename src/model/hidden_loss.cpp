// The hidden-state term of a distillation: per-pair forward and backward composed of existing ops,
// the stage's pairs and their projections, and the term's weight and scale.
#include "model/hidden_loss.h"

#include <fmt/format.h>

#include <cmath>

#include "core/error.h"
#include "core/memory.h"
#include "kernels/ops.h"

namespace tessera {

double hidden_pair_forward(Tensor diff, Tensor h_s, Tensor h_t, Tensor proj,
                           std::span<const int32_t> targets, int64_t num_valid) {
  const int64_t N = diff.dim(0), Ct = diff.dim(1);
  TS_CHECK(h_s.dim(0) == N && h_t.dim(0) == N && h_t.dim(1) == Ct && int64_t(targets.size()) == N,
           "hidden pair: diff ({}, {}), h_s rows {}, h_t ({}, {}), {} targets", N, Ct, h_s.dim(0),
           h_t.dim(0), h_t.dim(1), targets.size());
  // diff = -h_t first (rounded to diff's dtype once), then P h_s or h_s is added to it.
  if (h_t.dtype == diff.dtype)
    copy_tensor(diff, h_t);
  else
    ops::cast(diff, h_t);
  if (!proj.empty()) {
    // diff (N, Ct) = h_s (N, C) P^T (C, Ct) - h_t: one GEMM, rounded once.
    ops::gemm(diff, h_s, proj, false, true, 1.0f, -1.0f);
  } else {
    TS_CHECK(h_s.dim(1) == Ct, "hidden pair without a projection: widths {} and {}", h_s.dim(1),
             Ct);
    ops::scale_inplace(diff, -1.0f);  // exact
    ops::add_inplace(diff, h_s);
  }
  // Ignored rows carry neither loss nor gradient: zero each run of them.
  for (int64_t r = 0; r < N;) {
    if (targets[r] >= 0) {
      ++r;
      continue;
    }
    int64_t end = r + 1;
    while (end < N && targets[end] < 0) ++end;
    zero_tensor(diff.slice(r, end));
    r = end;
  }
  if (num_valid == 0) return 0.0;
  return ops::sum_squares(diff) / (double(Ct) * double(num_valid));
}

void hidden_pair_backward(Tensor diff, Tensor dproj, Tensor h_s, Tensor proj, float coef) {
  ops::scale_inplace(diff, 2.0f * coef);
  // dproj (Ct, C) += g^T (Ct, N) h_s (N, C); matmul_backward accumulates into the parameter
  // gradient (FP32 beside 16-bit activations too).
  if (!proj.empty()) ops::matmul_backward(Tensor(), dproj, Tensor(), diff, h_s, proj);
}

void hidden_pair_state_grad(Tensor d_state, Tensor g, Tensor proj) {
  if (proj.empty()) {
    ops::add_inplace(d_state, g);
  } else {
    // d_state (N, C) += g (N, Ct) P (Ct, C).
    ops::gemm(d_state, g, proj, false, false, 1.0f, 1.0f);
  }
}

std::vector<HiddenLoss::Local> HiddenLoss::on_stage(const std::vector<HiddenPair>& pairs,
                                                    const ModelShard& shard) {
  std::vector<Local> out;
  for (const HiddenPair& p : pairs) {
    // The state after S blocks is the output of block S - 1 (0-based): local block
    // S - 1 - first_layer, whose output is the stage's residual stream after S - first_layer.
    const int state = p.student - shard.first_layer;
    if (state >= 1 && state <= shard.num_layers) out.push_back(Local{p, state, -1});
  }
  return out;
}

std::string HiddenLoss::projection_name(const HiddenPair& p) {
  return fmt::format("distill.hidden_proj.s{}_t{}", p.student, p.teacher);
}

void HiddenLoss::declare(ParamStore& ps, const std::vector<HiddenPair>& pairs, int hidden,
                         const ModelShard& shard) {
  TS_CHECK(local_.empty() && first_param_ < 0, "hidden-state loss declared twice");
  num_pairs_ = int(pairs.size());
  local_ = on_stage(pairs, shard);
  for (Local& l : local_) {
    TS_CHECK(l.pair.teacher_hidden > 0, "hidden pair {} without the teacher's width",
             projection_name(l.pair));
    if (l.pair.teacher_hidden == hidden) continue;
    ParamSpec p{projection_name(l.pair),
                {l.pair.teacher_hidden, hidden},
                ParamClass::weight,
                InitKind::normal,
                float(1.0 / std::sqrt(double(hidden)))};
    p.owner = shard.tp_rank == 0;  // replicated over tp: every tp rank computes the same gradient
    l.proj = ps.add(std::move(p));
    if (first_param_ < 0) first_param_ = l.proj;
  }
}

double HiddenLoss::forward(const ParamStore& ps, std::span<const Tensor> students,
                           std::span<const Tensor> teachers, std::span<const Tensor> diffs,
                           std::span<const int32_t> targets, int64_t num_valid) const {
  TS_CHECK(students.size() == local_.size() && teachers.size() == local_.size() &&
               diffs.size() == local_.size(),
           "hidden-state loss: {} pairs on this stage, given {} / {} / {} tensors", local_.size(),
           students.size(), teachers.size(), diffs.size());
  double sum = 0.0;
  for (size_t k = 0; k < local_.size(); ++k) {
    const Tensor proj = local_[k].proj >= 0 ? ps[local_[k].proj].value : Tensor();
    sum += hidden_pair_forward(diffs[k], students[k], teachers[k], proj, targets, num_valid);
  }
  return sum / double(num_pairs_);
}

void HiddenLoss::backward_params(ParamStore& ps, std::span<const Tensor> students,
                                 std::span<const Tensor> diffs, int64_t num_valid,
                                 float scale) const {
  TS_CHECK(num_valid > 0, "hidden-state backward without valid targets");
  for (size_t k = 0; k < local_.size(); ++k) {
    // d(scale beta / P * sum(diff^2) / (Ct n)) / d sum(diff^2).
    const double ct = double(local_[k].pair.teacher_hidden);
    const float coef =
        float(double(scale) * double(beta_) / (double(num_pairs_) * ct * double(num_valid)));
    const bool proj = local_[k].proj >= 0;
    hidden_pair_backward(diffs[k], proj ? ps[local_[k].proj].grad : Tensor(), students[k],
                         proj ? ps[local_[k].proj].value : Tensor(), coef);
  }
}

void HiddenLoss::add_state_grad(const ParamStore& ps, int k, Tensor d_state, Tensor g) const {
  const Tensor proj = local_[k].proj >= 0 ? ps[local_[k].proj].value : Tensor();
  hidden_pair_state_grad(d_state, g, proj);
}

}  // namespace tessera
