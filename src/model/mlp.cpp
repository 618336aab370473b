// Feed-forward layer forward/backward (GELU MLP or SwiGLU).
#include "model/mlp.h"

#include <cmath>

#include "kernels/ops.h"

namespace tessera {

void Mlp::declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
                  const ModelShard& shard) {
  shard_ = shard;
  kind_ = cfg.activation;
  const int C = cfg.hidden, F = cfg.ffn_hidden;
  const float proj_std = cfg.init_std / std::sqrt(2.0f * cfg.num_layers);  // see Attention
  if (kind_ == ActivationKind::gelu) {
    in_.declare(ps, name + ".fc", C, F, cfg.bias, cfg.init_std, TpSplit::column, shard);
    out_.declare(ps, name + ".proj", F, C, cfg.bias, proj_std, TpSplit::row, shard);
  } else {
    in_.declare(ps, name + ".gate", C, F, cfg.bias, cfg.init_std, TpSplit::column, shard);
    up_.declare(ps, name + ".up", C, F, cfg.bias, cfg.init_std, TpSplit::column, shard);
    up_.shares_input_with_previous = true;  // gate and up both read x
    out_.declare(ps, name + ".down", F, C, cfg.bias, proj_std, TpSplit::row, shard);
  }
}

MlpActs Mlp::alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N) {
  MlpActs a;
  a.h = arena.alloc(dt, {N, cfg.ffn_hidden});
  if (cfg.activation == ActivationKind::swiglu) a.up = arena.alloc(dt, {N, cfg.ffn_hidden});
  a.act = arena.alloc(dt, {N, cfg.ffn_hidden});
  return a;
}

MlpScratch Mlp::alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N) {
  MlpScratch s;
  s.d_act = arena.alloc(dt, {N, cfg.ffn_hidden});
  s.d_h = arena.alloc(dt, {N, cfg.ffn_hidden});
  if (cfg.activation == ActivationKind::swiglu) s.d_up = arena.alloc(dt, {N, cfg.ffn_hidden});
  return s;
}

void Mlp::forward(const ParamStore& ps, MlpActs& a, Tensor y, Tensor x) const {
  in_.forward(ps, a.h, x);
  if (kind_ == ActivationKind::gelu) {
    ops::gelu_forward(a.act, a.h);
  } else {
    up_.forward(ps, a.up, x);
    ops::swiglu_forward(a.act, a.h, a.up);
  }
  out_.forward(ps, y, a.act);
  reduce_from_tp_region_forward(shard_, y);
}

void Mlp::backward(ParamStore& ps, const MlpActs& a, MlpScratch& s, Tensor dx, Tensor dy,
                   Tensor x) const {
  reduce_from_tp_region_backward(shard_, dy);
  out_.backward(ps, s.d_act, dy, a.act, false);
  const bool gated = kind_ != ActivationKind::gelu;
  if (gated) {
    // FP8 turns SwiGLU's gradients straight into the projections' E5M2 operands when it can.
    const bool fused = in_.compute && in_.compute == up_.compute &&
                       in_.compute->swiglu_backward(in_, up_, s.d_h, s.d_up, s.d_act, a.h, a.up);
    if (!fused) ops::swiglu_backward(s.d_h, s.d_up, s.d_act, a.h, a.up);
  } else {
    ops::gelu_backward(s.d_h, s.d_act, a.h);
  }
  // x fed every rank's FFN slice: dx is summed over tp (overlapping the weight gradients).
  if (gated)
    column_parallel_backward(ps, shard_, {{&in_, s.d_h}, {&up_, s.d_up}}, dx, x);
  else
    column_parallel_backward(ps, shard_, {{&in_, s.d_h}}, dx, x);
}

}  // namespace tessera
