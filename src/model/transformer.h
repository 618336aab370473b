// Transformer: decoder-only language model = token (+ learned position) embedding, L blocks, final
// norm, LM head (tied to the embedding or its own), softmax cross-entropy. Explicit forward and
// backward; activations live in a separate Activations object sized for one (B, T), so the same
// weights serve training, evaluation and sampling at other shapes.
// Shape letters: B batch, T time, C width, V padded vocabulary, N = B*T, L layers.
#pragma once
#include <memory>
#include <vector>

#include "core/memory.h"
#include "model/block.h"

namespace tessera {

class Transformer;

// Everything forward saves for backward, plus backward's temporaries, for one (B, T).
class Activations {
 public:
  // Tensors come from `arena` when given (bytes_needed()), else from an arena of its own.
  Activations(const Transformer& model, int B, int T, bool training, Arena* arena = nullptr);
  static size_t bytes_needed(const ModelConfig& cfg, DType dtype, int B, int T, bool training);
  int B() const { return B_; }
  int T() const { return T_; }
  size_t bytes() const { return bytes_; }

 private:
  friend class Transformer;
  int B_, T_;
  bool training_, recompute_;
  size_t bytes_ = 0;
  Arena own_;
  std::vector<Tensor> resid;       // L+1 x (N,C): input of block l, resid[L] = last block output
  std::vector<BlockActs> blocks;   // L sets, or 1 shared set when recomputing
  BlockScratch scratch;
  Tensor lnf_out, lnf_mean, lnf_rstd;  // (N,C), (N), (N)
  Tensor logits;                   // (N,V); becomes dlogits in backward
  Tensor losses, lse;              // (N), (N)
  Tensor d_lnf;                    // (N,C)
  Tensor d_resid;                  // (N,C)
};

class Transformer {
 public:
  // Parameters come from `arena` when given (ParamStore::bytes_for(cfg.num_params(), dtype)).
  Transformer(const ModelConfig& cfg, DType dtype, Device device, Arena* arena = nullptr);
  const ModelConfig& config() const { return cfg_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  void init_weights(uint64_t seed) { params_.init(seed); }

  // Runs the model on tokens (B,T) i32. With targets (B,T) i32 (negative = ignored) it also
  // computes per-token losses and returns their mean over valid targets; without, returns 0 and
  // only the logits are meaningful. tokens/targets live on the model's device.
  double forward(Activations& acts, Tensor tokens, Tensor targets) const;
  // Backpropagates d(loss_scale * mean loss) into the parameter gradients (accumulating).
  // Must follow forward() on the same acts, tokens and targets.
  void backward(Activations& acts, Tensor tokens, Tensor targets, float loss_scale);

  Tensor logits(const Activations& acts) const { return acts.logits; }  // (B*T, V)
  int64_t count_valid(Tensor targets) const;

 private:
  friend class Activations;
  void forward_trunk(Activations& acts, Tensor tokens) const;
  Tensor head_weight() const;
  int head_grad_param() const;

  ModelConfig cfg_;
  DType dtype_;
  Device device_;
  ParamStore params_;
  int wte_ = -1, wpe_ = -1, lm_head_ = -1;
  std::vector<Block> blocks_;
  Norm final_norm_;
};

}  // namespace tessera
