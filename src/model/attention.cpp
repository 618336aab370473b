// Attention layer forward/backward. The forward chain is
//   x -> (wq, wk, wv) -> [QK-norm] -> [RoPE] -> causal GQA attention -> wo -> y
// and backward walks it in reverse; RoPE is applied in place since its backward needs no input.
#include "model/attention.h"

#include <cmath>

#include "kernels/ops.h"

namespace tessera {

void Attention::declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
                        const ModelShard& shard) {
  shard_ = shard;
  num_heads_ = cfg.num_heads / shard.tp_size;
  num_kv_heads_ = cfg.num_kv_heads / shard.tp_size;
  head_dim_ = cfg.resolved_head_dim();
  rope_ = cfg.position == PositionKind::rope;
  rope_theta_ = cfg.rope_theta;
  norm_eps_ = cfg.norm_eps;
  const int C = cfg.hidden, D = head_dim_;
  // GPT-2: residual projections are scaled by 1/sqrt(2 L) so the residual stream's variance does
  // not grow with depth.
  const float proj_std = cfg.init_std / std::sqrt(2.0f * cfg.num_layers);
  const int Hq = cfg.num_heads, Hkv = cfg.num_kv_heads;
  wq_.declare(ps, name + ".wq", C, Hq * D, cfg.bias, cfg.init_std, TpSplit::column, shard);
  wk_.declare(ps, name + ".wk", C, Hkv * D, cfg.bias, cfg.init_std, TpSplit::column, shard);
  wv_.declare(ps, name + ".wv", C, Hkv * D, cfg.bias, cfg.init_std, TpSplit::column, shard);
  wk_.shares_input_with_previous = wv_.shares_input_with_previous = true;  // all read x
  wo_.declare(ps, name + ".wo", Hq * D, C, cfg.bias, proj_std, TpSplit::row, shard);
  if (cfg.qk_norm) {
    // Shared by every head; each tp rank sees only its heads, so its gradient is partial.
    const auto qk = [&](const char* which) {
      ParamSpec p{name + which, {D}, ParamClass::norm, InitKind::ones, 0.0f};
      p.tp_partial_grad = shard.tp_size > 1;
      p.owner = shard.tp_rank == 0;
      return ps.add(std::move(p));
    };
    q_norm_ = qk(".q_norm.weight");
    k_norm_ = qk(".k_norm.weight");
  }
}

static DType stat_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

AttentionActs Attention::alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int B, int T) {
  const int Hq = cfg.num_heads, Hkv = cfg.num_kv_heads, D = cfg.resolved_head_dim();
  AttentionActs a;
  if (cfg.qk_norm) {
    a.q_raw = arena.alloc(dt, {B, T, Hq, D});
    a.k_raw = arena.alloc(dt, {B, T, Hkv, D});
    a.q_rstd = arena.alloc(stat_dtype(dt), {int64_t(B) * T * Hq});
    a.k_rstd = arena.alloc(stat_dtype(dt), {int64_t(B) * T * Hkv});
  }
  a.q = arena.alloc(dt, {B, T, Hq, D});
  a.k = arena.alloc(dt, {B, T, Hkv, D});
  a.v = arena.alloc(dt, {B, T, Hkv, D});
  a.out = arena.alloc(dt, {B, T, Hq, D});
  a.lse = arena.alloc(stat_dtype(dt), {B, Hq, T});
  return a;
}

AttentionScratch Attention::alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, int B,
                                          int T) {
  const int Hq = cfg.num_heads, Hkv = cfg.num_kv_heads, D = cfg.resolved_head_dim();
  AttentionScratch s;
  s.d_out = arena.alloc(dt, {B, T, Hq, D});
  s.dq = arena.alloc(dt, {B, T, Hq, D});
  s.dk = arena.alloc(dt, {B, T, Hkv, D});
  s.dv = arena.alloc(dt, {B, T, Hkv, D});
  if (cfg.qk_norm) {
    s.dq_raw = arena.alloc(dt, {B, T, Hq, D});
    s.dk_raw = arena.alloc(dt, {B, T, Hkv, D});
  }
  return s;
}

// Rows of head vectors: (B,T,H,D) viewed as (B*T*H, D) for per-head RMSNorm.
static Tensor head_rows(Tensor t) { return t.view({t.numel() / t.dim(-1), t.dim(-1)}); }
// (B,T,H,D) viewed as (B*T, H*D) for the projections.
static Tensor token_rows(Tensor t) { return t.view({t.dim(0) * t.dim(1), t.dim(2) * t.dim(3)}); }

void Attention::forward(const ParamStore& ps, AttentionActs& a, Tensor y, Tensor x) const {
  const bool qk_norm = q_norm_ >= 0;
  Tensor q_lin = qk_norm ? a.q_raw : a.q;
  Tensor k_lin = qk_norm ? a.k_raw : a.k;
  wq_.forward(ps, token_rows(q_lin), x);
  wk_.forward(ps, token_rows(k_lin), x);
  wv_.forward(ps, token_rows(a.v), x);
  if (qk_norm) {
    ops::rmsnorm_forward(head_rows(a.q), a.q_rstd, head_rows(a.q_raw), ps[q_norm_].value,
                         norm_eps_);
    ops::rmsnorm_forward(head_rows(a.k), a.k_rstd, head_rows(a.k_raw), ps[k_norm_].value,
                         norm_eps_);
  }
  if (rope_) {
    ops::rope_forward(a.q, a.q, rope_theta_, 0);
    ops::rope_forward(a.k, a.k, rope_theta_, 0);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  ops::attention_forward(a.out, a.lse, a.q, a.k, a.v, scale, impl_);
  wo_.forward(ps, y, token_rows(a.out));
  reduce_from_tp_region_forward(shard_, y);  // sum of the ranks' head groups
}

void Attention::backward(ParamStore& ps, const AttentionActs& a, AttentionScratch& s, Tensor dx,
                         Tensor dy, Tensor x) const {
  const bool qk_norm = q_norm_ >= 0;
  reduce_from_tp_region_backward(shard_, dy);
  wo_.backward(ps, token_rows(s.d_out), dy, token_rows(a.out), false);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  ops::attention_backward(s.dq, s.dk, s.dv, s.d_out, a.q, a.k, a.v, a.out, a.lse, scale, impl_);
  if (rope_) {
    ops::rope_backward(s.dq, s.dq, rope_theta_, 0);
    ops::rope_backward(s.dk, s.dk, rope_theta_, 0);
  }
  Tensor dq_lin = s.dq, dk_lin = s.dk;
  if (qk_norm) {
    ops::rmsnorm_backward(head_rows(s.dq_raw), ps[q_norm_].grad, head_rows(s.dq),
                          head_rows(a.q_raw), ps[q_norm_].value, a.q_rstd);
    ops::rmsnorm_backward(head_rows(s.dk_raw), ps[k_norm_].grad, head_rows(s.dk),
                          head_rows(a.k_raw), ps[k_norm_].value, a.k_rstd);
    dq_lin = s.dq_raw;
    dk_lin = s.dk_raw;
  }
  // x fed every rank's heads: dx is summed over tp (overlapping the weight gradients).
  column_parallel_backward(
      ps, shard_,
      {{&wq_, token_rows(dq_lin)}, {&wk_, token_rows(dk_lin)}, {&wv_, token_rows(s.dv)}}, dx, x);
}

}  // namespace tessera
