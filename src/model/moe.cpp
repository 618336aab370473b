// Mixture-of-Experts layer forward/backward on the MoE ops (kernels/ops_moe.h).
#include "model/moe.h"

#include <algorithm>
#include <cmath>
#include <vector>

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
MoeActs make_acts(Alloc& ar, const ModelConfig& cfg, DType dt, int64_t N, int ep) {
  const MoeConfig& m = cfg.moe;
  const int64_t C = cfg.hidden, E = m.num_experts, K = m.topk, R = N * K, Fe = m.ffn_hidden;
  const int64_t Re = ep * R;
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
  a.h = ar.alloc(dt, {Re, Fe});
  if (cfg.activation == ActivationKind::swiglu) a.up = ar.alloc(dt, {Re, Fe});
  a.act = ar.alloc(dt, {Re, Fe});
  a.yp = ar.alloc(dt, {R, C});
  if (ep > 1) {
    a.xg = ar.alloc(dt, {Re, C});
    a.ep_offsets = ar.alloc(DType::i32, {E / ep + 1});
    a.ep_map = ar.alloc(DType::i32, {Re});
    a.ep_inv = ar.alloc(DType::i32, {Re});
  }
  return a;
}

template <class Alloc>
MoeScratch make_scratch(Alloc& ar, const ModelConfig& cfg, DType dt, DType grad_dtype, int64_t N,
                        int ep) {
  const MoeConfig& m = cfg.moe;
  const int64_t C = cfg.hidden, E = m.num_experts, K = m.topk, R = N * K, Fe = m.ffn_hidden;
  const int64_t Re = ep * R;
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
  if (swiglu) s.d_xp2 = ar.alloc(dt, {Re, C});
  s.d_act = ar.alloc(dt, {Re, Fe});
  s.d_h = ar.alloc(dt, {Re, Fe});
  if (swiglu) s.d_up = ar.alloc(dt, {Re, Fe});
  s.d_x = ar.alloc(dt, {N, C});
  if (m.shared_experts > 0) s.y = ar.alloc(dt, {N, C});
  if (ep > 1) {
    s.ep_a = ar.alloc(dt, {Re, C});
    s.ep_b = ar.alloc(dt, {Re, C});
  }
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
  // Routed experts over ep: this rank's El = E/ep experts, a slice along dim 0 of (E, ...).
  const int64_t El = E / shard.ep_size;
  const auto add_experts = [&](const std::string& n, int64_t rows, int64_t cols, float std) {
    ParamSpec p{name + n, {El, rows, cols}, ParamClass::weight, InitKind::normal, std};
    p.owner = shard.tp_rank == 0;
    if (shard.ep_size > 1) {
      p.global_shape = {E, rows, cols};
      p.shard_dim = 0;
      p.shard_offset = shard.ep_rank * El;
      p.expert_parallel = true;
    }
    return ps.add(std::move(p));
  };
  router_ = add(".router.weight", {E, C}, cfg.init_std);
  const bool gelu = kind_ == ActivationKind::gelu;
  w_in_ = add_experts(gelu ? ".experts.fc.weight" : ".experts.gate.weight", Fe, C, cfg.init_std);
  if (!gelu) w_up_ = add_experts(".experts.up.weight", Fe, C, cfg.init_std);
  w_out_ = add_experts(gelu ? ".experts.proj.weight" : ".experts.down.weight", C, Fe, proj_std);
  has_shared_ = cfg_.shared_experts > 0;
  if (has_shared_) shared_.declare(ps, name + ".shared", shared_config(cfg, 1), shard);
}

MoeActs Moe::alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N, int ep) {
  MoeActs a = make_acts(arena, cfg, dt, N, ep);
  if (cfg.moe.shared_experts > 0) a.shared = Mlp::alloc_acts(arena, shared_config(cfg, 1), dt, N);
  return a;
}

MoeScratch Moe::alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, DType grad_dtype,
                              int64_t N, int ep) {
  MoeScratch s = make_scratch(arena, cfg, dt, grad_dtype, N, ep);
  if (cfg.moe.shared_experts > 0)
    s.shared = Mlp::alloc_scratch(arena, shared_config(cfg, 1), dt, N);
  return s;
}

size_t Moe::acts_bytes(const ModelConfig& cfg, DType dt, int64_t N, int ep) {
  ByteCount count;
  make_acts(count, cfg, dt, N, ep);
  return count.bytes + shared_bytes(cfg, dt, N);
}

size_t Moe::scratch_bytes(const ModelConfig& cfg, DType dt, DType grad_dtype, int64_t N, int ep) {
  ByteCount count;
  make_scratch(count, cfg, dt, grad_dtype, N, ep);
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

void Moe::experts_forward(const ParamStore& ps, const MoeActs& a, Tensor y, Tensor x,
                          Tensor offsets) const {
  const int64_t R = x.dim(0);
  const Tensor h = a.h.slice(0, R), act = a.act.slice(0, R);
  if (expert_compute_) expert_compute_->expert_input(x);  // in place: backward's dW reads it so
  ops::grouped_gemm_forward(h, x, expert_weight(ps, w_in_), offsets);
  if (kind_ == ActivationKind::gelu) {
    ops::gelu_forward(act, h);
  } else {
    const Tensor up = a.up.slice(0, R);
    ops::grouped_gemm_forward(up, x, expert_weight(ps, w_up_), offsets);
    ops::swiglu_forward(act, h, up);
  }
  if (expert_compute_) expert_compute_->expert_input(act);
  ops::grouped_gemm_forward(y, act, expert_weight(ps, w_out_), offsets);
}

namespace {

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}
std::vector<int64_t> times(const std::vector<int64_t>& v, int64_t c) {
  std::vector<int64_t> out(v);
  for (int64_t& x : out) x *= c;
  return out;
}
void upload(Tensor dst, const std::vector<int32_t>& v) {
  copy_bytes(dst.data, dst.device, v.data(), Device::cpu, v.size() * sizeof(int32_t));
}

// The regrouping of received rows. cnt_in[p*El + l] rows arrive from rank p for local expert l,
// in (p, l) order; the grouped order is (l, p). map[g] = received row of grouped row g, inv its
// inverse, both -1 past the received rows (Rv >= them); offsets (El+1) of the grouped rows.
void ep_regroup(const std::vector<int32_t>& cnt_in, int P, int64_t El, int64_t Rv,
                std::vector<int32_t>& map, std::vector<int32_t>& inv,
                std::vector<int32_t>& offsets) {
  std::vector<int64_t> start(cnt_in.size());  // received row of block (p, l)
  int64_t r = 0;
  for (size_t b = 0; b < cnt_in.size(); ++b) start[b] = r, r += cnt_in[b];
  map.assign(Rv, -1);
  inv.assign(Rv, -1);
  offsets.assign(El + 1, 0);
  int64_t g = 0;
  for (int64_t l = 0; l < El; ++l) {
    for (int p = 0; p < P; ++p) {
      const int64_t b = p * El + l;
      for (int64_t i = 0; i < cnt_in[b]; ++i, ++g) {
        map[g] = int32_t(start[b] + i);
        inv[start[b] + i] = int32_t(g);
      }
    }
    offsets[l + 1] = int32_t(g);
  }
}

}  // namespace

// Dispatch to the expert owners and combine back (docs/MOE.md): the plan's offsets to the host
// (the one synchronisation), per-expert counts exchanged, rows all-to-all'd, regrouped by local
// expert, through the experts, ungrouped and all-to-all'd back into a.yp.
void Moe::ep_forward(const ParamStore& ps, MoeActs& a, MoeScratch& s) const {
  const int P = shard_.ep_size;
  const int64_t E = cfg_.num_experts, El = E / P, C = a.xp.dim(1);
  std::vector<int32_t> off(E + 1), cnt(E), cnt_in(E);
  copy_bytes(off.data(), Device::cpu, a.offsets.data, a.offsets.device, off.size() * 4);
  for (int64_t e = 0; e < E; ++e) cnt[e] = off[e + 1] - off[e];
  const std::vector<int64_t> per_peer(P, El);
  shard_.ep_host_comm->all_to_all_v(Tensor(cnt_in.data(), DType::i32, Device::cpu, {E}), per_peer,
                                    Tensor(cnt.data(), DType::i32, Device::cpu, {E}), per_peer);
  a.ep_send.assign(P, 0);
  a.ep_recv.assign(P, 0);
  for (int p = 0; p < P; ++p) {
    a.ep_send[p] = off[(p + 1) * El] - off[p * El];
    for (int64_t l = 0; l < El; ++l) a.ep_recv[p] += cnt_in[p * El + l];
  }
  const int64_t Rs = off[E], Rr = sum(a.ep_recv), Rv = std::max<int64_t>(Rr, 1);
  std::vector<int32_t> map, inv, loff;
  ep_regroup(cnt_in, P, El, Rv, map, inv, loff);
  upload(a.ep_map, map);
  upload(a.ep_inv, inv);
  upload(a.ep_offsets, loff);
  const Tensor xr = s.ep_a.slice(0, Rv), xg = a.xg.slice(0, Rv), yr = s.ep_b.slice(0, Rv);
  shard_.ep_comm->all_to_all_v(xr.slice(0, Rr), times(a.ep_recv, C), a.xp.slice(0, Rs),
                               times(a.ep_send, C));
  ops::moe_permute(xg, xr, a.ep_map.slice(0, Rv), 1);
  const Tensor yg = s.ep_a.slice(0, Rv);  // xr is spent
  experts_forward(ps, a, yg, xg, a.ep_offsets);
  ops::moe_permute(yr, yg, a.ep_inv.slice(0, Rv), 1);
  shard_.ep_comm->all_to_all_v(a.yp.slice(0, Rs), times(a.ep_send, C), yr.slice(0, Rr),
                               times(a.ep_recv, C));
}

void Moe::forward(const ParamStore& ps, MoeActs& a, MoeScratch& s, Tensor y, Tensor x) const {
  route(ps, a, s, x);
  ops::moe_permute(a.xp, x, a.row_slot, cfg_.topk);
  if (shard_.ep_size > 1)
    ep_forward(ps, a, s);
  else
    experts_forward(ps, a, a.yp, a.xp, a.offsets);
  ops::moe_unpermute(y, a.yp, a.slot_row, a.topk_w);
  if (has_shared_) {
    shared_.forward(ps, a.shared, s.y, x);  // all-reduced over tp inside
    ops::add_inplace(y, s.y);
  }
}

// dy -> dx through the experts on rows grouped by `offsets` (their weight gradients accumulate).
void Moe::experts_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor dx, Tensor dy,
                           Tensor x, Tensor offsets) const {
  const int64_t R = x.dim(0);
  const Tensor h = a.h.slice(0, R), act = a.act.slice(0, R);
  const Tensor d_act = s.d_act.slice(0, R), d_h = s.d_h.slice(0, R);
  // With an ExpertCompute, x and act are its transformed rows (the forward changed them in place)
  // and the weights its copies: the gradients pass straight through to the stored weights.
  ops::grouped_gemm_backward(d_act, ps[w_out_].grad, dy, act, expert_weight(ps, w_out_), offsets);
  if (kind_ == ActivationKind::gelu) {
    ops::gelu_backward(d_h, d_act, h);
    ops::grouped_gemm_backward(dx, ps[w_in_].grad, d_h, x, expert_weight(ps, w_in_), offsets);
    return;
  }
  const Tensor d_up = s.d_up.slice(0, R), d_x2 = s.d_xp2.slice(0, R);
  ops::swiglu_backward(d_h, d_up, d_act, h, a.up.slice(0, R));
  ops::grouped_gemm_backward(dx, ps[w_in_].grad, d_h, x, expert_weight(ps, w_in_), offsets);
  ops::grouped_gemm_backward(d_x2, ps[w_up_].grad, d_up, x, expert_weight(ps, w_up_), offsets);
  ops::add_inplace(dx, d_x2);
}

// The adjoint of ep_forward, s.d_yp -> s.d_xp: the combine's all-to-all-v runs as a dispatch,
// each regrouping gathers by the other map, the dispatch's runs as a combine.
void Moe::ep_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s) const {
  const int64_t C = a.xp.dim(1), Rs = sum(a.ep_send), Rr = sum(a.ep_recv);
  const int64_t Rv = std::max<int64_t>(Rr, 1);
  const Tensor d_yr = s.ep_a.slice(0, Rv), d_yg = s.ep_b.slice(0, Rv);
  shard_.ep_comm->all_to_all_v(d_yr.slice(0, Rr), times(a.ep_recv, C), s.d_yp.slice(0, Rs),
                               times(a.ep_send, C));
  ops::moe_permute_backward(d_yg, d_yr, a.ep_map.slice(0, Rv).view({Rv, 1}));
  const Tensor d_xg = s.ep_a.slice(0, Rv), d_xr = s.ep_b.slice(0, Rv);  // d_yr is spent
  experts_backward(ps, a, s, d_xg, d_yg, a.xg.slice(0, Rv), a.ep_offsets);
  ops::moe_permute_backward(d_xr, d_xg, a.ep_inv.slice(0, Rv).view({Rv, 1}));  // d_yg is spent
  shard_.ep_comm->all_to_all_v(s.d_xp.slice(0, Rs), times(a.ep_send, C), d_xr.slice(0, Rr),
                               times(a.ep_recv, C));
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
  if (shard_.ep_size > 1)
    ep_backward(ps, a, s);
  else
    experts_backward(ps, a, s, s.d_xp, s.d_yp, a.xp, a.offsets);
  ops::moe_permute_backward(dx, s.d_xp, a.slot_row);
  router_backward(ps, a, s, x, loss_scale);  // leaves the router's input gradient in s.d_x
  ops::add_inplace(dx, s.d_x);
  if (has_shared_) {
    shared_.backward(ps, a.shared, s.shared, s.d_x, dy, x);  // summed over tp inside
    ops::add_inplace(dx, s.d_x);
  }
}

}  // namespace tessera
