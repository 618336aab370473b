// Pre-norm Transformer block: x_mid = x + attn(norm1(x)); x_out = x_mid + ffn(norm2(x_mid)), where
// ffn is the dense MLP or, in the blocks the moe section names, a Mixture-of-Experts layer.
// Shape letters: N rows (= B*T), C width.
#pragma once
#include "model/attention.h"
#include "model/mlp.h"
#include "model/moe.h"

namespace tessera {

struct BlockActs {
  Tensor ln1_out, ln1_mean, ln1_rstd;  // (N,C), (N), (N)
  AttentionActs attn;
  Tensor resid_mid;                    // (N,C) x + attention branch
  Tensor ln2_out, ln2_mean, ln2_rstd;  // (N,C), (N), (N)
  MlpActs mlp;                         // dense blocks
  MoeActs moe;                         // MoE blocks
};

// Temporaries shared by every block (forward branch output and backward gradients).
struct BlockScratch {
  Tensor branch;  // (N,C) output of attention or MLP before the residual add
  Tensor d_norm;  // (N,C) gradient at a norm's output
  Tensor d_tmp;   // (N,C) gradient at a norm's input, before it is added to the residual gradient
  AttentionScratch attn;
  MlpScratch mlp;
  MoeScratch moe;
};

// Which feed-forward kinds a set of activations must hold: one block's, or, for the set that
// recomputation shares, every kind on the stage.
struct FfnKinds {
  bool dense = true;
  bool moe = false;
};

class Block {
 public:
  // cfg is the whole model (see Attention/Mlp); alloc_* take a local config. `layer` is the
  // block's global index (cfg.moe.is_moe_layer decides its feed-forward kind).
  void declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg, int layer,
               const ModelShard& shard = {});
  int first_param() const { return first_param_; }  // index of its first parameter
  bool is_moe() const { return is_moe_; }
  const Moe& moe() const { return moe_; }
  Moe& moe() { return moe_; }
  void set_attention_impl(ops::AttentionImpl impl) { attn_.set_impl(impl); }
  // ep: the expert-parallel size (the MoE layer's receive buffers grow with it).
  static BlockActs alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int B, int T,
                              FfnKinds kinds = {}, int ep = 1);
  static BlockScratch alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt,
                                    DType grad_dtype, int B, int T, FfnKinds kinds = {},
                                    int ep = 1);

  void forward(const ParamStore& ps, BlockActs& a, BlockScratch& s, Tensor x_out,
               Tensor x_in) const;
  // On entry dx holds dL/dx_out; on return dL/dx_in (updated in place). loss_scale weights the
  // MoE losses' gradients as it weights the objective's.
  void backward(ParamStore& ps, const BlockActs& a, BlockScratch& s, Tensor dx, Tensor x_in,
                float loss_scale = 1.0f) const;
  template <class F>
  void for_each_linear(F&& f) {
    attn_.for_each_linear(f);
    if (is_moe_)
      moe_.for_each_linear(f);
    else
      mlp_.for_each_linear(f);
  }

 private:
  int first_param_ = -1;
  Norm ln1_, ln2_;
  Attention attn_;
  bool is_moe_ = false;
  Mlp mlp_;
  Moe moe_;
};

}  // namespace tessera
