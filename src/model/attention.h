// Causal self-attention layer: q/k/v projections (separate, so tensor parallelism can split them by
// heads), optional per-head QK RMSNorm (Qwen3), RoPE, grouped-query attention, output projection.
// Shape letters: B batch, T time, C width, Hq query heads, Hkv key/value heads, D head dim, N =
// B*T.
#pragma once
#include "core/memory.h"
#include "kernels/op_types.h"
#include "model/linear.h"

namespace tessera {

// What forward saves for backward.
struct AttentionActs {
  Tensor q_raw, k_raw;    // (B,T,Hq,D), (B,T,Hkv,D) before QK-norm (only with qk_norm)
  Tensor q_rstd, k_rstd;  // (B*T*Hq), (B*T*Hkv)                    (only with qk_norm)
  Tensor q, k, v;         // (B,T,Hq,D), (B,T,Hkv,D), (B,T,Hkv,D) as fed to attention (post-RoPE)
  Tensor out;             // (B,T,Hq,D) attention output before the output projection
  Tensor lse;             // (B,Hq,T)
};

// Backward temporaries, shared by all layers.
struct AttentionScratch {
  Tensor d_out;           // (B,T,Hq,D)
  Tensor dq, dk, dv;      // (B,T,Hq,D), (B,T,Hkv,D), (B,T,Hkv,D)
  Tensor dq_raw, dk_raw;  // (only with qk_norm)
};

class Attention {
 public:
  // cfg is the whole model; under tensor parallelism this rank holds heads
  // [tp_rank * Hq/tp, (tp_rank + 1) * Hq/tp) and the matching KV heads (GQA groups stay whole).
  void declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
               const ModelShard& shard = {});
  void set_impl(ops::AttentionImpl impl) { impl_ = impl; }
  // Activation sizes come from a LOCAL config (heads already divided by tp).
  static AttentionActs alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int B, int T);
  static AttentionScratch alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, int B,
                                        int T);

  // y (N,C) = attention of x (N,C); y is written (overwrite).
  void forward(const ParamStore& ps, AttentionActs& a, Tensor y, Tensor x) const;
  // dx (N,C) is overwritten with the gradient with respect to x.
  void backward(ParamStore& ps, const AttentionActs& a, AttentionScratch& s, Tensor dx, Tensor dy,
                Tensor x) const;
  // Its linears in declaration order (FP8 setup).
  template <class F>
  void for_each_linear(F&& f) {
    for (Linear* l : {&wq_, &wk_, &wv_, &wo_}) f(*l);
  }

 private:
  Linear wq_, wk_, wv_, wo_;  // q/k/v column-parallel, wo row-parallel
  ModelShard shard_;
  int q_norm_ = -1, k_norm_ = -1;                        // (D) weights, qk_norm only
  int num_heads_ = 0, num_kv_heads_ = 0, head_dim_ = 0;  // local head counts
  bool rope_ = false;
  // How attention runs on CUDA; passed to every attention op (ExecOptions::attention).
  ops::AttentionImpl impl_ = ops::AttentionImpl::cudnn;
  float rope_theta_ = 10000.0f;
  float norm_eps_ = 1e-6f;
};

}  // namespace tessera
