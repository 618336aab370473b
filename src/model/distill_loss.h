// DistillLoss: the knowledge-distillation term of the objective, T^2 KL(teacher || student) of the
// two distributions at temperature T (Hinton et al.), or the reverse KL(student || teacher), as a
// mean over the micro-batch's valid targets. Vocabulary-parallel under tp: each rank holds the
// same column slice of both logits, and the statistics reduce over tp without gathering the
// vocabulary (kernels/ops.h: kd_shard_*). Its weight alpha and T follow the curriculum
// (config/distill_config.h), set before each step; the cross-entropy gets 1 - alpha. From a
// teacher cache the teacher is its top-K logits and tempered lse (DistillBuffers::sparse()): the
// KL is over the K ids plus one bucket for the rest (ops.h kd_sparse_*), at one of the cache's
// temperatures.
#pragma once
#include <vector>

#include "model/objective.h"

namespace tessera {

class DistillLoss : public LossTerm {
 public:
  // cache_temperatures: those of the teacher cache (empty: an online teacher); every T set must
  // be one of them.
  explicit DistillLoss(bool reverse_kl, std::vector<float> cache_temperatures = {})
      : reverse_(reverse_kl), cache_temps_(std::move(cache_temperatures)) {}
  void set(float alpha, float temperature) {
    alpha_ = alpha;
    temperature_ = temperature;
  }
  float temperature() const { return temperature_; }

  const char* name() const override { return "kd"; }
  float weight() const override { return alpha_; }
  double forward(const LossInputs& in) override;
  Tensor backward(const LossInputs& in, float scale) override;

 private:
  Tensor cached_lse(const DistillBuffers& d) const;  // (2, N) at this T

  bool reverse_;
  std::vector<float> cache_temps_;
  float alpha_ = 0.0f, temperature_ = 1.0f;
};

}  // namespace tessera
