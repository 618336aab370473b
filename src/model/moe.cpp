// Mixture-of-Experts layer forward/backward on the MoE ops (kernels/ops_moe.h).
#include "model/moe.h"

#include <cmath>

#include "kernels/ops.h"
#include "kernels/ops_moe.h"

namespace tessera {

namespace {

bool narrow(DType dt) { return dt == DType::bf16 || dt == DType::f16; }
// The router's dtype: FP32 under every compute dtype (f64 in the finite-difference tests).
DType router_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// The shared experts as one MLP: S experts of width Fs side by side are one MLP of width S*Fs
// (the sum of their outputs is the concatenation's down projection).
ModelConfig shared_config(const ModelConfig& cfg, int tp) {
  ModelConfig c = cfg;
  c.ffn_hidden = cfg.moe.shared_experts * cfg.moe.shared_ffn_hidden / tp;
  return c;
}

// Sums what an allocation sequence takes from an Arena, without allocating (the memory plan).
struct ByteCount {
  size_t bytes = 0;
  Tensor alloc(DType t, Shape s) {
    Tensor shape_only(nullptr, t, Device::cpu, s);
    bytes += Arena::aligned(size_t(shape_only.numel()) * dtype_size(t));
    return shape_only;
  }
};

// One allocation sequence for both the arena and the byte count. `cfg` is local.
template <class Alloc>
MoeActs make_acts(Alloc& ar, const ModelConfig& cfg, DType dt, int64_t N) {
  const MoeConfig& m = cfg.moe;
  const int64_t C = cfg.hidden, E = m.num_experts, K = m.topk, R = N * K, Fe = m.ffn_hidden;
  const DType rt = router_dtype(dt);
  MoeActs a;
  if (narrow(dt)) a.x32 = ar.alloc(DType::f32, {N, C});
  a.logits = ar.alloc(rt, {N, E});
  a.probs = ar.alloc(rt, {N, E});
  a.lse = ar.alloc(rt, {N});
  a.topk_idx = ar.alloc(DType::i32, {N, K});
  a.topk_w = ar.alloc(rt, {N, K});
  a.tokens_per_expert = ar.alloc(DType::i32, {E});
  a.offsets = ar.alloc(DType::i32, {E + 1});
  a.slot_row = ar.alloc(DType::i32, {N, K});
  a.row_slot = ar.alloc(DType::i32, {R});
  a.loss = ar.alloc(rt, {2});
  a.xp = ar.alloc(dt, {R, C});
  a.h = ar.alloc(dt, {R, Fe});
  if (cfg.activation == ActivationKind::swiglu) a.up = ar.alloc(dt, {R, Fe});
  a.act = ar.alloc(dt, {R, Fe});
  a.yp = ar.alloc(dt, {R, C});
  return a;
}

template <class Alloc>
MoeScratch make_scratch(Alloc& ar, const ModelConfig& cfg, DType dt, DType grad_dtype, int64_t N) {
  const MoeConfig& m = cfg.moe;
  const int64_t C = cfg.hidden, E = m.num_experts, K = m.topk, R = N * K, Fe = m.ffn_hidden;
  const bool swiglu = cfg.activation == ActivationKind::swiglu;
  const DType rt = router_dtype(dt);
  MoeScratch s;
  if (narrow(dt)) {
    s.w32 = ar.alloc(DType::f32, {E, C});
    s.d_x32 = ar.alloc(DType::f32, {N, C});
    if (grad_dtype != DType::f32) {
      s.d_dw32 = ar.alloc(DType::f32, {E, C});
      s.d_dw = ar.alloc(dt, {E, C});
    }
  }
  s.d_logits = ar.alloc(rt, {N, E});
  s.d_topk_w = ar.alloc(rt, {N, K});
  s.d_yp = ar.alloc(dt, {R, C});
  s.d_xp = ar.alloc(dt, {R, C});
  if (swiglu) s.d_xp2 = ar.alloc(dt, {R, C});
  s.d_act = ar.alloc(dt, {R, Fe});
  s.d_h = ar.alloc(dt, {R, Fe});
  if (swiglu) s.d_up = ar.alloc(dt, {R, Fe});
  s.d_x = ar.alloc(dt, {N, C});
  if (m.shared_experts > 0) s.y = ar.alloc(dt, {N, C});
  return s;
}

// Mlp::alloc_acts and alloc_scratch of the shared experts, counted (they allocate the same
// number of (N, Fs) tensors: 3 for SwiGLU, 2 for GELU).
size_t shared_bytes(const ModelConfig& cfg, DType dt, int64_t N) {
  if (cfg.moe.shared_experts == 0) return 0;
  const int64_t Fs = shared_config(cfg, 1).ffn_hidden;
  const int n = cfg.activation == ActivationKind::swiglu ? 3 : 2;
  return n * Arena::aligned(size_t(N * Fs) * dtype_size(dt));
}

// Scales of moe_router_loss (kernels/ops_moe.h): Switch/GShard's aux loss
// coef * E * sum_e f_e P_e with f_e = count_e / (N K) and P_e = mean_t probs[t,e], and ST-MoE's
// z-loss coef * mean_t lse_t^2, over this micro-batch's N tokens.
double aux_scale(const MoeConfig& m, int64_t N) {
  return double(m.aux_loss_coef) * m.num_experts / (double(N) * double(N) * m.topk);
}
double z_scale(const MoeConfig& m, int64_t N) { return double(m.z_loss_coef) / double(N); }

}  // namespace

void Moe::declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
                  const ModelShard& shard) {
  cfg_ = cfg.moe;
  shard_ = shard;
  kind_ = cfg.activation;
  const int64_t C = cfg.hidden, E = cfg_.num_experts, Fe = cfg_.ffn_hidden;
  const float proj_std = cfg.init_std / std::sqrt(2.0f * cfg.num_layers);  // see Attention
  // Router and routed experts are replicated over tp: every tp rank computes the same full
  // gradient, tp rank 0 owns them (as norms).
  const auto add = [&](const std::string& n, Shape shape, float std) {
    ParamSpec p{name + n, shape, ParamClass::weight, InitKind::normal, std};
    p.owner = shard.tp_rank == 0;
    return ps.add(std::move(p));
  };
  router_ = add(".router.weight", {E, C}, cfg.init_std);
  const bool gelu = kind_ == ActivationKind::gelu;
  w_in_ = add(gelu ? ".experts.fc.weight" : ".experts.gate.weight", {E, Fe, C}, cfg.init_std);
  if (!gelu) w_up_ = add(".experts.up.weight", {E, Fe, C}, cfg.init_std);
  w_out_ = add(gelu ? ".experts.proj.weight" : ".experts.down.weight", {E, C, Fe}, proj_std);
  has_shared_ = cfg_.shared_experts > 0;
  if (has_shared_) shared_.declare(ps, name + ".shared", shared_config(cfg, 1), shard);
}

MoeActs Moe::alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N) {
  MoeActs a = make_acts(arena, cfg, dt, N);
  if (cfg.moe.shared_experts > 0) a.shared = Mlp::alloc_acts(arena, shared_config(cfg, 1), dt, N);
  return a;
}

MoeScratch Moe::alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, DType grad_dtype,
                              int64_t N) {
  MoeScratch s = make_scratch(arena, cfg, dt, grad_dtype, N);
  if (cfg.moe.shared_experts > 0)
    s.shared = Mlp::alloc_scratch(arena, shared_config(cfg, 1), dt, N);
  return s;
}

size_t Moe::acts_bytes(const ModelConfig& cfg, DType dt, int64_t N) {
  ByteCount count;
  make_acts(count, cfg, dt, N);
  return count.bytes + shared_bytes(cfg, dt, N);
}

size_t Moe::scratch_bytes(const ModelConfig& cfg, DType dt, DType grad_dtype, int64_t N) {
  ByteCount count;
  make_scratch(count, cfg, dt, grad_dtype, N);
  return count.bytes + shared_bytes(cfg, dt, N);
}

// Router logits in FP32, softmax + top-k, the dispatch plan and the two losses.
void Moe::route(const ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor x) const {
  const int64_t N = x.dim(0);
  if (!a.x32.empty()) {  // 16-bit compute: the GEMM in FP32 on widened copies (Megatron's)
    ops::cast(a.x32, x);
    ops::cast(s.w32, ps[router_].value);
    ops::matmul_forward(a.logits, a.x32, s.w32, Tensor());
  } else {
    ops::matmul_forward(a.logits, x, ps[router_].value, Tensor());
  }
  ops::moe_router_forward(a.probs, a.lse, a.topk_idx, a.topk_w, a.logits, cfg_.norm_topk_prob);
  ops::moe_dispatch_plan(a.tokens_per_expert, a.offsets, a.slot_row, a.row_slot, a.topk_idx,
                         cfg_.capacity(N));
  ops::moe_router_loss(a.loss, a.probs, a.lse, a.tokens_per_expert, aux_scale(cfg_, N),
                       z_scale(cfg_, N));
}

void Moe::experts_forward(const ParamStore& ps, const MoeActs& a) const {
  ops::grouped_gemm_forward(a.h, a.xp, ps[w_in_].value, a.offsets);
  if (kind_ == ActivationKind::gelu) {
    ops::gelu_forward(a.act, a.h);
  } else {
    ops::grouped_gemm_forward(a.up, a.xp, ps[w_up_].value, a.offsets);
    ops::swiglu_forward(a.act, a.h, a.up);
  }
  ops::grouped_gemm_forward(a.yp, a.act, ps[w_out_].value, a.offsets);
}

void Moe::forward(const ParamStore& ps, MoeActs& a, MoeScratch& s, Tensor y, Tensor x) const {
  route(ps, a, s, x);
  ops::moe_permute(a.xp, x, a.row_slot, cfg_.topk);
  experts_forward(ps, a);
  ops::moe_unpermute(y, a.yp, a.slot_row, a.topk_w);
  if (has_shared_) {
    shared_.forward(ps, a.shared, s.y, x);  // all-reduced over tp inside
    ops::add_inplace(y, s.y);
  }
}

// d_yp -> d_xp through the experts (their weight gradients accumulate).
void Moe::experts_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s) const {
  ops::grouped_gemm_backward(s.d_act, ps[w_out_].grad, s.d_yp, a.act, ps[w_out_].value, a.offsets);
  if (kind_ == ActivationKind::gelu) {
    ops::gelu_backward(s.d_h, s.d_act, a.h);
    ops::grouped_gemm_backward(s.d_xp, ps[w_in_].grad, s.d_h, a.xp, ps[w_in_].value, a.offsets);
    return;
  }
  ops::swiglu_backward(s.d_h, s.d_up, s.d_act, a.h, a.up);
  ops::grouped_gemm_backward(s.d_xp, ps[w_in_].grad, s.d_h, a.xp, ps[w_in_].value, a.offsets);
  ops::grouped_gemm_backward(s.d_xp2, ps[w_up_].grad, s.d_up, a.xp, ps[w_up_].value, a.offsets);
  ops::add_inplace(s.d_xp, s.d_xp2);
}

// d_topk_w and the losses -> d_logits -> dx += d_logits W, dW += d_logits^T x, all in FP32.
void Moe::router_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor x,
                          float loss_scale) const {
  const int64_t N = x.dim(0);
  ops::moe_router_backward(s.d_logits, s.d_topk_w, a.probs, a.lse, a.topk_idx, a.tokens_per_expert,
                           aux_scale(cfg_, N) * loss_scale, z_scale(cfg_, N) * loss_scale,
                           cfg_.norm_topk_prob);
  Tensor grad = ps[router_].grad;
  if (a.x32.empty()) {
    ops::gemm(s.d_x, s.d_logits, ps[router_].value, false, false, 1.0f, 0.0f);
    ops::matmul_backward(Tensor(), grad, Tensor(), s.d_logits, x, ps[router_].value);
    return;
  }
  ops::cast(s.w32, ps[router_].value);  // the forward's copy was overwritten by later blocks
  ops::gemm(s.d_x32, s.d_logits, s.w32, false, false, 1.0f, 0.0f);
  ops::cast(s.d_x, s.d_x32);
  if (grad.dtype == DType::f32) {  // FP32 gradients: accumulate straight into them
    ops::matmul_backward(Tensor(), grad, Tensor(), s.d_logits, a.x32, s.w32);
  } else {
    zero_tensor(s.d_dw32);
    ops::matmul_backward(Tensor(), s.d_dw32, Tensor(), s.d_logits, a.x32, s.w32);
    ops::cast(s.d_dw, s.d_dw32);
    ops::add_inplace(grad, s.d_dw);
  }
}

void Moe::backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor dx, Tensor dy, Tensor x,
                   float loss_scale) const {
  ops::moe_unpermute_backward(s.d_yp, s.d_topk_w, dy, a.yp, a.slot_row, a.row_slot, a.topk_w);
  experts_backward(ps, a, s);
  ops::moe_permute_backward(dx, s.d_xp, a.slot_row);
  router_backward(ps, a, s, x, loss_scale);  // leaves the router's input gradient in s.d_x
  ops::add_inplace(dx, s.d_x);
  if (has_shared_) {
    shared_.backward(ps, a.shared, s.shared, s.d_x, dy, x);  // summed over tp inside
    ops::add_inplace(dx, s.d_x);
  }
}

}  // namespace tessera
