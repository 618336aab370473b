// Objective: the training loss on the last pipeline stage, a weighted cross-entropy plus any
// number of extra terms over the same logits (a distillation KL, a logit z-loss, ...). Each term
// reports its value, and its gradient is added to the cross-entropy gradient before the LM head's
// backward. Cross-entropy is computed in place (the logits buffer becomes dlogits), so extra terms
// produce their gradients first, into tensors they own, while the logits are still intact.
// Shape letters: N = B*T rows, Vl this tp rank's vocabulary slice.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/model_shard.h"

namespace tessera {

// Distillation's tensors for one micro-batch (model/distill_loss.h), kept in its activation set.
struct DistillBuffers {
  Tensor teacher_logits;  // (N, Vl): the teacher's logits over the same columns (online)
  Tensor losses;          // (N) f32: per-row T^2 KL
  Tensor lse;             // (2, N) f32: tempered log-sum-exp of the student and the teacher
  Tensor stats;           // (5, N) f32 under tp > 1: two row maxima, then three sums
  Tensor grad;            // (N, Vl): the term's gradient (scratch shared by the sets)
  // From a teacher cache instead of teacher_logits (ExecOptions::distill_top_k = K): views of the
  // batch's cached rows (train/batch.h), and the sparse KD's statistics (ops.h kd_sparse_*).
  Tensor topk_logits;   // (N, K) f32
  Tensor topk_ids;      // (N, K) i32
  Tensor teacher_lse;   // (nT, 2, N) f32
  Tensor sparse_stats;  // (3, N)
  Tensor sparse_max;    // (N) under tp > 1
  Tensor sparse_sums;   // (2 + K, N) under tp > 1
  bool sparse() const { return !sparse_stats.empty(); }
};

// What a loss term reads: this rank's logits slice and the targets (-1: ignored).
struct LossInputs {
  Tensor logits;   // (N, Vl), columns [vocab_start, vocab_start + Vl) of the padded vocabulary
  Tensor targets;  // (N) i32
  int64_t num_valid = 0;              // targets >= 0
  int vocab_size = 0;                 // real vocabulary; columns past it are padding
  int64_t vocab_start = 0;            // tp rank * Vl
  const ModelShard* shard = nullptr;  // tp_comm reduces over the vocabulary slices
  DistillBuffers distill;             // empty unless ExecOptions::distill
};

// An extra term of the objective. A term whose weight is 0 is not evaluated at all (its value
// reads 0 and it adds no gradient), so a zero-weight term leaves training bit for bit as without
// it.
class LossTerm {
 public:
  virtual ~LossTerm() = default;
  virtual const char* name() const = 0;
  virtual float weight() const = 0;
  // The unweighted term for this micro-batch (a mean over its valid targets).
  virtual double forward(const LossInputs& in) = 0;
  // scale * weight * d(term)/d(logits) in a (N, Vl) tensor of the logits' dtype that the term
  // owns; called before the cross-entropy overwrites the logits.
  virtual Tensor backward(const LossInputs& in, float scale) = 0;
};

// One extra term's value (unweighted) and the weight it entered the total with.
struct LossPart {
  std::string name;
  double value = 0.0;
  float weight = 0.0f;
};

// The value of each part of the objective for one micro-batch.
struct LossValues {
  double total = 0.0;  // ce_weight * ce + sum of weight * term
  double ce = 0.0;     // unweighted cross-entropy (mean over valid targets)
  std::vector<LossPart> terms;
};

// Statistics the vocabulary-parallel cross-entropy keeps between forward and backward.
struct CrossEntropyBuffers {
  Tensor losses, lse;  // (N), (N) f32 (f64 for f64 logits)
  Tensor stats;        // (3, N) under tp > 1: row max, sum of exp, target logit
};

// Adds `v` (a micro-batch's values, or a sum of them) to the running sums `sum`: total, ce and
// each term's value, matched by position (the same objective gives the same terms).
void add_losses(LossValues& sum, const LossValues& v);

// Mean of per-row losses (N) f32/f64 over num_valid targets (ignored rows hold 0), summed in
// double on the host: N values, cheap and deterministic.
double mean_loss(const Tensor& losses, int64_t num_valid);

class Objective {
 public:
  void set_ce_weight(float w) { ce_weight_ = w; }
  float ce_weight() const { return ce_weight_; }
  void add_term(std::unique_ptr<LossTerm> term) { terms_.push_back(std::move(term)); }
  bool has_terms() const { return !terms_.empty(); }

  // Evaluation (with_terms = false) computes the cross-entropy alone: the extra terms need what
  // only training keeps (a teacher's logits).
  LossValues forward(const LossInputs& in, const CrossEntropyBuffers& ce,
                     bool with_terms = true) const;
  // Leaves loss_scale * d(objective)/d(logits) in place of the logits.
  void backward(const LossInputs& in, const CrossEntropyBuffers& ce, float loss_scale) const;

 private:
  float ce_weight_ = 1.0f;
  std::vector<std::unique_ptr<LossTerm>> terms_;
};

}  // namespace tessera
