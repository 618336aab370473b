// HiddenLoss: distillation's hidden-state term on one pipeline stage (docs/DISTILL.md). For each
// pair (student S, teacher L) of the recipe's distill.hidden_pairs,
//   hidden_k = 1 / (n Ct) * sum over the n valid rows of ||P_k h_s - h_t||^2,
// h_s (N, C) the student's residual stream after its first S blocks, h_t (N, Ct) the teacher's
// after its first L, P_k a learned (Ct, C) projection when Ct != C (none when the widths are
// equal). The term is the mean of hidden_k over every pair of the run (all stages), weighted by
// beta from the curriculum. Each stage evaluates the pairs whose student block S it holds (the
// teacher's block L must be on the same stage: train/teacher.cpp checks it) and reports its part of
// that mean. The projections are parameters of the stage's store, declared after every other one,
// replicated over tp (so is the residual stream: every tp rank computes the same gradient, tp rank
// 0 owns them). Composed of existing ops (gemm, cast, scale, add, sum_squares): no kernel of its
// own. Not here: where the teacher's states come from (train/pipeline_executor.cpp) and where the
// gradient joins the student's backward (Transformer::backward_stage, at block S's output).
// Shape letters: N = B*T rows, C the student's width, Ct the teacher's.
#pragma once
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/exec_options.h"
#include "model/model_shard.h"
#include "model/params.h"

namespace tessera {

// One pair's forward: diff = P h_s - h_t (proj empty: h_s - h_t, the widths being equal), rows
// whose target is negative set to 0 (they carry no loss and so no gradient). h_t may have another
// float dtype (the teacher's); it is rounded to diff's first. Returns sum(diff^2) / (Ct num_valid),
// 0 when num_valid is 0.
double hidden_pair_forward(Tensor diff /*(N,Ct)*/, Tensor h_s /*(N,C)*/, Tensor h_t /*(N,Ct)*/,
                           Tensor proj /*(Ct,C) or empty*/, std::span<const int32_t> targets,
                           int64_t num_valid);
// One pair's backward, given coef = d(weighted, scaled loss)/d(sum(diff^2)): diff becomes
// g = 2 coef diff, the gradient w.r.t. P h_s (in place: diff is not needed again), and
// dproj += g^T h_s (accumulated, as every parameter gradient; both empty without a projection).
void hidden_pair_backward(Tensor diff /*(N,Ct) -> g*/, Tensor dproj /*(Ct,C) += or empty*/,
                          Tensor h_s /*(N,C)*/, Tensor proj /*(Ct,C) or empty*/, float coef);
// d_state += g P (proj empty: d_state += g): the pair's gradient w.r.t. h_s.
void hidden_pair_state_grad(Tensor d_state /*(N,C) +=*/, Tensor g /*(N,Ct)*/,
                            Tensor proj /*(Ct,C) or empty*/);

class HiddenLoss {
 public:
  // A pair whose student block is on this stage.
  struct Local {
    HiddenPair pair;
    int state = 0;  // its student state is the stage's residual stream after `state` of its blocks
    int proj = -1;  // the projection's parameter index; -1: equal widths, none
  };
  // The pairs whose student block (the pair.student-th) is on this stage, in the run's order.
  static std::vector<Local> on_stage(const std::vector<HiddenPair>& pairs, const ModelShard& shard);
  // "distill.hidden_proj.s<S>_t<L>": named by the pair, so checkpoints do not depend on the order
  // of distill.hidden_pairs.
  static std::string projection_name(const HiddenPair& p);

  // Registers this stage's pairs and the projections of those whose widths differ from the
  // student's (`hidden`), N(0, 1/C) so that P h_s starts at the scale of h_s.
  void declare(ParamStore& ps, const std::vector<HiddenPair>& pairs, int hidden,
               const ModelShard& shard);
  const std::vector<Local>& local() const { return local_; }
  int first_param() const { return first_param_; }  // -1: no projection on this stage

  // beta, set per step by the curriculum. A weight of 0 evaluates nothing (bit for bit as
  // without the term).
  void set_weight(float beta) { beta_ = beta; }
  float weight() const { return beta_; }
  bool active() const { return beta_ != 0.0f && !local_.empty(); }

  // The stage's part of the term for one micro-batch: the sum over its pairs of hidden_k / the
  // run's pair count (unweighted). students[k], teachers[k] and diffs[k] belong to local()[k];
  // targets (N) on the host.
  double forward(const ParamStore& ps, std::span<const Tensor> students,
                 std::span<const Tensor> teachers, std::span<const Tensor> diffs,
                 std::span<const int32_t> targets, int64_t num_valid) const;
  // scale * beta * d(term)/d(P h_s) into diffs[k] (in place) and every projection's gradient.
  void backward_params(ParamStore& ps, std::span<const Tensor> students,
                       std::span<const Tensor> diffs, int64_t num_valid, float scale) const;
  // d_state += local()[k]'s gradient w.r.t. its student state, from g = diffs[k] after
  // backward_params.
  void add_state_grad(const ParamStore& ps, int k, Tensor d_state, Tensor g) const;

 private:
  std::vector<Local> local_;
  int num_pairs_ = 0;  // of the run, over all stages
  int first_param_ = -1;
  float beta_ = 0.0f;
};

}  // namespace tessera
