// EngineModel's step: embedding, L blocks (attention over the paged KV cache; dense MLP or MoE),
// final norm and LM head on the rows whose logits are wanted. Mirrors Transformer::forward_stage
// (src/model/transformer.cpp, block.cpp, attention.cpp, mlp.cpp, moe.cpp) op for op, with the
// engine's linear and paged attention in place of cuBLAS and the dense causal attention.
#include "infer/engine_model.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/ops.h"
#include "kernels/ops_moe.h"

namespace tessera {

// A step's activations, for up to M rows (slices [0, M) are used each step).
struct EngineModel::Scratch {
  int64_t max_rows = 0, max_logit_rows = 0, max_seqs = 0, max_width = 0;
  Tensor idx;                             // i32: the step's index tensors, packed (below)
  Tensor x, x_mid, h, branch, add;        // (M,C)
  Tensor q_raw, q, k_raw, k, v, att;      // (M,Hq*D) / (M,Hkv*D)
  Tensor attn_scratch;                    // paged attention's partials (f32 words)
  Tensor mean, rstd, q_rstd, k_rstd;      // (M), (M), (M*Hq), (M*Hkv) f32
  Tensor f1, f2, f3;                      // (M*K or M, Fmax)
  Tensor x32, r_logits, probs, lse;       // MoE: (M,C) f32, (M,E), (M,E), (M) f32
  Tensor topk_idx, topk_w, tpe, offsets;  // (M,K) i32, (M,K) f32, (E) i32, (E+1) i32
  Tensor slot_row, row_slot, xp, yp;      // (M,K) i32, (M*K) i32, (M*K,C), (M*K,C)
  Tensor xr, hr, r_mean, r_rstd;          // (R,C), (R,C), (R), (R)
  Tensor logits, logits32;                // (R,V) dtype, (R,V) f32
  // This step's views of idx.
  int64_t M = 0, R = 0;
  Tensor tokens, positions, slots, seq, tables, logit_rows;
  int max_context = 0;
};

EngineModel::EngineModel() = default;
EngineModel::~EngineModel() = default;

KvCacheArena EngineModel::make_kv_cache(int64_t num_blocks, int64_t block_size) const {
  TS_CHECK(num_blocks > 0 && block_size > 0, "cache of {} blocks of {}", num_blocks, block_size);
  KvCacheArena kv;
  kv.num_blocks = num_blocks;
  kv.block_size = block_size;
  const int64_t Hkv = cfg_.num_kv_heads, D = cfg_.resolved_head_dim(), L = cfg_.num_layers;
  const Shape shape{num_blocks, block_size, Hkv, D};
  const size_t each = Arena::aligned(dtype_storage_bytes(options_.dtype, shape.numel()));
  kv.buffer = Buffer(options_.device, each * size_t(2 * L));
  auto* base = static_cast<char*>(kv.buffer.data());
  for (int64_t l = 0; l < L; ++l) {
    kv.k.emplace_back(base + size_t(2 * l) * each, options_.dtype, options_.device, shape);
    kv.v.emplace_back(base + size_t(2 * l + 1) * each, options_.dtype, options_.device, shape);
  }
  return kv;
}

void EngineModel::reserve(int64_t max_rows, int64_t max_logit_rows, int64_t max_seqs,
                          int64_t max_table_width, int64_t max_context) {
  TS_CHECK(
      max_rows > 0 && max_logit_rows > 0 && max_seqs > 0 && max_table_width > 0 && max_context > 0,
      "reserve({}, {}, {}, {}, {})", max_rows, max_logit_rows, max_seqs, max_table_width,
      max_context);
  const ModelConfig& c = cfg_;
  const int64_t M = max_rows, R = max_logit_rows, C = c.hidden, V = c.vocab_size;
  const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.resolved_head_dim();
  const bool moe = c.moe.enabled();
  const int64_t E = c.moe.num_experts, K = moe ? c.moe.topk : 1;
  int64_t F = c.ffn_hidden;
  if (moe)
    F = std::max<int64_t>({F, c.moe.ffn_hidden, c.moe.shared_experts * c.moe.shared_ffn_hidden});
  const int64_t ffn_rows = moe ? M * K : M;
  const DType dt = options_.dtype, f32 = DType::f32, i32 = DType::i32;
  const int64_t num_idx = 4 * M + max_seqs * max_table_width + R;

  // Two passes over the same allocation sequence: count, then carve.
  size_t bytes = 0;
  const auto plan = [&](auto&& alloc) {
    Scratch s;
    s.max_rows = M, s.max_logit_rows = R, s.max_seqs = max_seqs, s.max_width = max_table_width;
    s.idx = alloc(i32, Shape{num_idx});
    for (Tensor* t : {&s.x, &s.x_mid, &s.h, &s.branch, &s.add}) *t = alloc(dt, Shape{M, C});
    s.q = alloc(dt, Shape{M, Hq * D});
    s.k = alloc(dt, Shape{M, Hkv * D});
    s.v = alloc(dt, Shape{M, Hkv * D});
    s.att = alloc(dt, Shape{M, Hq * D});
    const int64_t words = (ops::paged_attention_scratch_bytes(M, Hq, D, max_context) + 3) / 4;
    if (words > 0) s.attn_scratch = alloc(f32, Shape{words});
    if (c.qk_norm) {
      s.q_raw = alloc(dt, Shape{M, Hq * D});
      s.k_raw = alloc(dt, Shape{M, Hkv * D});
      s.q_rstd = alloc(f32, Shape{M * Hq});
      s.k_rstd = alloc(f32, Shape{M * Hkv});
    }
    s.mean = alloc(f32, Shape{M});
    s.rstd = alloc(f32, Shape{M});
    for (Tensor* t : {&s.f1, &s.f2, &s.f3}) *t = alloc(dt, Shape{ffn_rows, F});
    if (moe) {
      s.x32 = alloc(f32, Shape{M, C});
      s.r_logits = alloc(f32, Shape{M, E});
      s.probs = alloc(f32, Shape{M, E});
      s.lse = alloc(f32, Shape{M});
      s.topk_idx = alloc(i32, Shape{M, K});
      s.topk_w = alloc(f32, Shape{M, K});
      s.tpe = alloc(i32, Shape{E});
      s.offsets = alloc(i32, Shape{E + 1});
      s.slot_row = alloc(i32, Shape{M, K});
      s.row_slot = alloc(i32, Shape{M * K});
      s.xp = alloc(dt, Shape{M * K, C});
      s.yp = alloc(dt, Shape{M * K, C});
    }
    s.xr = alloc(dt, Shape{R, C});
    s.hr = alloc(dt, Shape{R, C});
    s.r_mean = alloc(f32, Shape{R});
    s.r_rstd = alloc(f32, Shape{R});
    s.logits = alloc(dt, Shape{R, V});
    if (dt != f32) s.logits32 = alloc(f32, Shape{R, V});
    return s;
  };
  plan([&](DType t, Shape sh) {
    bytes += Arena::aligned(dtype_storage_bytes(t, sh.numel()));
    return Tensor();
  });
  work_ = Arena(options_.device, bytes, "engine workspace");
  scratch_ = std::make_unique<Scratch>(plan([&](DType t, Shape sh) { return work_.alloc(t, sh); }));
  host_i32_.assign(size_t(num_idx), 0);
}

namespace {

void linear(const EngineLinear& l, Tensor out, Tensor inp) {
  ops::infer_linear_forward(out, inp, l.weight, l.bias);
}

void norm(const ModelConfig& c, const EngineNorm& n, Tensor out, Tensor mean, Tensor rstd,
          Tensor inp) {
  if (c.norm == NormKind::layernorm)
    ops::layernorm_forward(out, mean, rstd, inp, n.weight, n.bias, c.norm_eps);
  else
    ops::rmsnorm_forward(out, rstd, inp, n.weight, c.norm_eps);
}

}  // namespace

void EngineModel::ffn_forward(const EngineFfn& f, Tensor y, Tensor x, Scratch& s) const {
  const int64_t N = x.dim(0), F = f.width;
  const Tensor h = s.f1.view({s.f1.dim(0) * s.f1.dim(1)}).slice(0, N * F).view({N, F});
  linear(f.in, h, x);
  if (cfg_.activation == ActivationKind::gelu) {
    ops::gelu_forward(h, h);
    linear(f.out, y, h);
    return;
  }
  const Tensor up = s.f2.view({s.f2.dim(0) * s.f2.dim(1)}).slice(0, N * F).view({N, F});
  const Tensor act = s.f3.view({s.f3.dim(0) * s.f3.dim(1)}).slice(0, N * F).view({N, F});
  linear(f.up, up, x);
  ops::swiglu_forward(act, h, up);
  linear(f.out, y, act);
}

// Router in f32, a dropless dispatch plan, each expert over its rows, the weighted combine and the
// shared expert: Moe::forward without capacity (inference keeps every token).
void EngineModel::moe_forward(const EngineLayer& layer, Tensor y, Tensor x, Scratch& s) const {
  const int64_t M = x.dim(0), K = cfg_.moe.topk, E = cfg_.moe.num_experts;
  Tensor x32 = s.x32.slice(0, M);
  if (x.dtype == DType::f32)
    x32 = x;
  else
    ops::cast(x32, x);
  const Tensor logits = s.r_logits.slice(0, M), topk_idx = s.topk_idx.slice(0, M);
  const Tensor topk_w = s.topk_w.slice(0, M), slot_row = s.slot_row.slice(0, M);
  const Tensor row_slot = s.row_slot.slice(0, M * K);
  const Tensor xp = s.xp.slice(0, M * K), yp = s.yp.slice(0, M * K);
  ops::infer_linear_forward(logits, x32, layer.router, Tensor());
  ops::moe_router_forward(s.probs.slice(0, M), s.lse.slice(0, M), topk_idx, topk_w, logits,
                          cfg_.moe.norm_topk_prob);
  ops::moe_dispatch_plan(s.tpe, s.offsets, slot_row, row_slot, topk_idx, /*capacity=*/0);
  ops::moe_permute(xp, x, row_slot, int(K));
  // The experts' row ranges on the host: one synchronization per MoE layer.
  std::vector<int32_t> offsets(size_t(E + 1));
  copy_bytes(offsets.data(), Device::cpu, s.offsets.data, s.offsets.device,
             offsets.size() * sizeof(int32_t));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t a = offsets[size_t(e)], b = offsets[size_t(e + 1)];
    if (b > a) ffn_forward(layer.experts[size_t(e)], yp.slice(a, b), xp.slice(a, b), s);
  }
  ops::moe_unpermute(y, yp, slot_row, topk_w);
  if (layer.shared.width > 0) {
    const Tensor sy = s.add.slice(0, M);
    ffn_forward(layer.shared, sy, x, s);
    ops::add_inplace(y, sy);
  }
}

void EngineModel::layer_forward(const EngineLayer& layer, int l, Scratch& s,
                                KvCacheArena& kv) const {
  const ModelConfig& c = cfg_;
  const int64_t M = s.M, Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.resolved_head_dim();
  const Tensor x = s.x.slice(0, M), x_mid = s.x_mid.slice(0, M), h = s.h.slice(0, M);
  const Tensor branch = s.branch.slice(0, M), mean = s.mean.slice(0, M);
  const Tensor rstd = s.rstd.slice(0, M);
  const Tensor q = s.q.slice(0, M), k = s.k.slice(0, M), v = s.v.slice(0, M);
  const Tensor att = s.att.slice(0, M);

  norm(c, layer.ln1, h, mean, rstd, x);
  const bool qk_norm = layer.q_norm.data != nullptr;
  const Tensor q_lin = qk_norm ? s.q_raw.slice(0, M) : q;
  const Tensor k_lin = qk_norm ? s.k_raw.slice(0, M) : k;
  linear(layer.wq, q_lin, h);
  linear(layer.wk, k_lin, h);
  linear(layer.wv, v, h);
  if (qk_norm) {
    ops::rmsnorm_forward(q.view({M * Hq, D}), s.q_rstd.slice(0, M * Hq), q_lin.view({M * Hq, D}),
                         layer.q_norm, c.norm_eps);
    ops::rmsnorm_forward(k.view({M * Hkv, D}), s.k_rstd.slice(0, M * Hkv), k_lin.view({M * Hkv, D}),
                         layer.k_norm, c.norm_eps);
  }
  const Tensor q3 = q.view({M, Hq, D}), k3 = k.view({M, Hkv, D}), v3 = v.view({M, Hkv, D});
  if (c.position == PositionKind::rope) {
    ops::rope_rows_forward(q3, q3, s.positions, c.rope_theta);
    ops::rope_rows_forward(k3, k3, s.positions, c.rope_theta);
  }
  ops::kv_cache_write(kv.k[size_t(l)], kv.v[size_t(l)], k3, v3, s.slots);
  ops::paged_attention_forward(att.view({M, Hq, D}), q3, kv.k[size_t(l)], kv.v[size_t(l)], s.tables,
                               s.seq, s.positions, 1.0f / std::sqrt(float(D)), s.max_context,
                               s.attn_scratch);
  linear(layer.wo, branch, att);
  if (c.norm == NormKind::layernorm) {
    ops::add_layernorm_forward(x_mid, h, mean, rstd, x, branch, layer.ln2.weight, layer.ln2.bias,
                               c.norm_eps);
  } else {
    ops::add_forward(x_mid, x, branch);
    ops::rmsnorm_forward(h, rstd, x_mid, layer.ln2.weight, c.norm_eps);
  }
  if (layer.is_moe)
    moe_forward(layer, branch, h, s);
  else
    ffn_forward(layer.mlp, branch, h, s);
  ops::add_forward(x, x_mid, branch);  // the next block's input
}

const std::vector<float>& EngineModel::forward(const StepRows& rows, KvCacheArena& kv) {
  TS_CHECK(scratch_, "EngineModel::forward before reserve()");
  Scratch& s = *scratch_;
  const int64_t M = int64_t(rows.tokens.size()), R = int64_t(rows.logit_rows.size());
  const int64_t MB = rows.table_width, S = MB > 0 ? int64_t(rows.block_tables.size()) / MB : 0;
  TS_CHECK(M >= 1 && M <= s.max_rows && R <= s.max_logit_rows && S <= s.max_seqs &&
               MB <= s.max_width && rows.positions.size() == size_t(M) &&
               rows.slots.size() == size_t(M) && rows.seq.size() == size_t(M),
           "step of {} rows, {} logit rows, {} x {} tables vs reserve {} {} {} {}", M, R, S, MB,
           s.max_rows, s.max_logit_rows, s.max_seqs, s.max_width);
  // One host-to-device copy of every index tensor, packed: tokens, positions, slots, seq, tables,
  // logit rows.
  size_t n = 0;
  const auto put = [&](const std::vector<int32_t>& v) {
    std::copy(v.begin(), v.end(), host_i32_.begin() + ptrdiff_t(n));
    const Tensor t = s.idx.slice(int64_t(n), int64_t(n + v.size()));
    n += v.size();
    return t;
  };
  s.M = M;
  s.R = R;
  s.tokens = put(rows.tokens);
  s.positions = put(rows.positions);
  s.slots = put(rows.slots);
  s.seq = put(rows.seq);
  s.tables = put(rows.block_tables).view({S, MB});
  s.logit_rows = put(rows.logit_rows);
  s.max_context = rows.max_context;
  copy_bytes(s.idx.data, s.idx.device, host_i32_.data(), Device::cpu, n * sizeof(int32_t));

  const int64_t C = cfg_.hidden;
  const Tensor x = s.x.slice(0, M);
  ops::embedding_forward(x.view({1, M, C}), s.tokens.view({1, M}), wte_, Tensor());
  if (wpe_.data) {
    const Tensor pe = s.add.slice(0, M);
    ops::embedding_forward(pe.view({1, M, C}), s.positions.view({1, M}), wpe_, Tensor());
    ops::add_inplace(x, pe);
  }
  for (size_t l = 0; l < layers_.size(); ++l) layer_forward(layers_[l], int(l), s, kv);

  logits_.resize(size_t(R * cfg_.vocab_size));
  if (R == 0) return logits_;
  // Only the wanted rows go through the final norm and the head: gather them (the embedding
  // lookup with the residual stream as its table).
  const Tensor xr = s.xr.slice(0, R), hr = s.hr.slice(0, R);
  ops::embedding_forward(xr.view({1, R, C}), s.logit_rows.view({1, R}), x, Tensor());
  norm(cfg_, final_norm_, hr, s.r_mean.slice(0, R), s.r_rstd.slice(0, R), xr);
  Tensor logits = s.logits.slice(0, R);
  ops::infer_linear_forward(logits, hr, lm_head_, Tensor());
  if (logits.dtype != DType::f32) {
    ops::cast(s.logits32.slice(0, R), logits);
    logits = s.logits32.slice(0, R);
  }
  copy_bytes(logits_.data(), Device::cpu, logits.data, logits.device,
             logits_.size() * sizeof(float));
  return logits_;
}

}  // namespace tessera
