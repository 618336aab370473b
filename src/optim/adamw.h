// AdamW over a ParamStore: FP32 moment buffers (m, v) laid out like the flat parameter buffer,
// decoupled weight decay chosen per parameter class (by default none on norms, biases and
// embeddings), and global gradient-norm clipping folded into the update as a gradient scale.
#pragma once
#include <string>
#include <vector>

#include "config/enums.h"
#include "core/memory.h"
#include "kernels/op_types.h"
#include "model/params.h"

namespace tessera {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;
  std::vector<DecayExempt> no_decay = {DecayExempt::norms, DecayExempt::biases,
                                       DecayExempt::embeddings};
};

// Decay rules and per-parameter hyper-parameters, shared by AdamW and DistributedOptimizer so both
// update every element with the same arithmetic.
// Whether `spec` gets weight decay: weights always; biases, norms and embeddings unless listed in
// cfg.no_decay.
bool adamw_decays(const AdamWConfig& cfg, const ParamSpec& spec);
// The update of one parameter at 1-based optimizer step `step`.
ops::AdamWStep adamw_step_for(const AdamWConfig& cfg, const ParamSpec& spec, float lr,
                              float grad_scale, int64_t step);

class AdamW {
 public:
  // Moments come from `arena` when given (bytes_needed()), else from a buffer the optimizer owns.
  AdamW(const ParamStore& params, const AdamWConfig& cfg, Arena* arena = nullptr);
  static size_t bytes_needed(const ParamStore& params) {
    return bytes_for(params.num_elements(), params.dtype());
  }
  static size_t bytes_for(int64_t num_elements, DType param_dtype);
  // One update of every parameter's master weights with learning rate lr (grads are multiplied by
  // grad_scale first), then the compute-dtype values are refreshed from the masters.
  void step(ParamStore& params, float lr, float grad_scale);
  bool decays(const Param& p) const { return adamw_decays(cfg_, p.spec); }

  int64_t step_count() const { return step_; }
  void set_step_count(int64_t s) { step_ = s; }
  Tensor m() const { return m_view_; }  // (num_elements) f32
  Tensor v() const { return v_view_; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  AdamWConfig cfg_;
  int64_t step_ = 0;
  Buffer owned_;
  Tensor m_view_, v_view_;
};

// Global L2 norm of all gradients (accumulated in double) and the clip factor that brings it to
// max_norm, as torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6)); max_norm <= 0
// disables clipping (factor 1).
double grad_norm(const ParamStore& params);
float clip_factor(double norm, float max_norm);

}  // namespace tessera
