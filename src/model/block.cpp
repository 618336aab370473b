// Transformer block forward/backward: two pre-norm residual branches.
#include "model/block.h"

#include "kernels/ops.h"

namespace tessera {

void Block::declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg, int layer,
                    const ModelShard& shard) {
  first_param_ = ps.size();
  ln1_.declare(ps, name + ".ln1", cfg.hidden, cfg.norm, cfg.bias, cfg.norm_eps, shard);
  attn_.declare(ps, name + ".attn", cfg, shard);
  ln2_.declare(ps, name + ".ln2", cfg.hidden, cfg.norm, cfg.bias, cfg.norm_eps, shard);
  is_moe_ = cfg.moe.is_moe_layer(layer);
  if (is_moe_)
    moe_.declare(ps, name + ".moe", cfg, shard);
  else
    mlp_.declare(ps, name + ".mlp", cfg, shard);
}

static DType stat_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

BlockActs Block::alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int B, int T,
                            FfnKinds kinds, int ep) {
  const int64_t N = int64_t(B) * T, C = cfg.hidden;
  BlockActs a;
  a.ln1_out = arena.alloc(dt, {N, C});
  a.ln1_mean = arena.alloc(stat_dtype(dt), {N});
  a.ln1_rstd = arena.alloc(stat_dtype(dt), {N});
  a.attn = Attention::alloc_acts(arena, cfg, dt, B, T);
  a.resid_mid = arena.alloc(dt, {N, C});
  a.ln2_out = arena.alloc(dt, {N, C});
  a.ln2_mean = arena.alloc(stat_dtype(dt), {N});
  a.ln2_rstd = arena.alloc(stat_dtype(dt), {N});
  if (kinds.dense) a.mlp = Mlp::alloc_acts(arena, cfg, dt, N);
  if (kinds.moe) a.moe = Moe::alloc_acts(arena, cfg, dt, N, ep);
  return a;
}

BlockScratch Block::alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, DType grad_dtype,
                                  int B, int T, FfnKinds kinds, int ep) {
  const int64_t N = int64_t(B) * T, C = cfg.hidden;
  BlockScratch s;
  s.branch = arena.alloc(dt, {N, C});
  s.d_norm = arena.alloc(dt, {N, C});
  s.d_tmp = arena.alloc(dt, {N, C});
  s.attn = Attention::alloc_scratch(arena, cfg, dt, B, T);
  if (kinds.dense) s.mlp = Mlp::alloc_scratch(arena, cfg, dt, N);
  if (kinds.moe) s.moe = Moe::alloc_scratch(arena, cfg, dt, grad_dtype, N, ep);
  return s;
}

void Block::forward(const ParamStore& ps, BlockActs& a, BlockScratch& s, Tensor x_out,
                    Tensor x_in) const {
  ln1_.forward(ps, a.ln1_out, a.ln1_mean, a.ln1_rstd, x_in);
  attn_.forward(ps, a.attn, s.branch, a.ln1_out);
  ln2_.forward_after_add(ps, a.resid_mid, a.ln2_out, a.ln2_mean, a.ln2_rstd, x_in, s.branch);
  if (is_moe_)
    moe_.forward(ps, a.moe, s.moe, s.branch, a.ln2_out);
  else
    mlp_.forward(ps, a.mlp, s.branch, a.ln2_out);
  ops::add_forward(x_out, a.resid_mid, s.branch);
}

void Block::backward(ParamStore& ps, const BlockActs& a, BlockScratch& s, Tensor dx, Tensor x_in,
                     float loss_scale) const {
  // The residual add passes dx straight through; each branch adds its input gradient to it.
  if (is_moe_)
    moe_.backward(ps, a.moe, s.moe, s.d_norm, dx, a.ln2_out, loss_scale);
  else
    mlp_.backward(ps, a.mlp, s.mlp, s.d_norm, dx, a.ln2_out);
  ln2_.backward(ps, s.d_tmp, s.d_norm, a.resid_mid, a.ln2_mean, a.ln2_rstd);
  ops::add_inplace(dx, s.d_tmp);  // dx is now dL/d resid_mid
  attn_.backward(ps, a.attn, s.attn, s.d_norm, dx, a.ln1_out);
  ln1_.backward(ps, s.d_tmp, s.d_norm, x_in, a.ln1_mean, a.ln1_rstd);
  ops::add_inplace(dx, s.d_tmp);  // dx is now dL/d x_in
}

}  // namespace tessera
