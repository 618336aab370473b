// Transformer forward/backward: embedding -> blocks -> final norm -> LM head -> cross-entropy,
// and back. With recomputation only each block's input is kept; backward re-runs that block's
// forward into one shared activation set just before its backward.
#include "model/transformer.h"

#include <vector>

#include "kernels/ops.h"

namespace tessera {

static DType stat_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

size_t Activations::bytes_needed(const ModelConfig& c, DType dtype, int B, int T, bool training) {
  // Must mirror the allocations in Activations' constructor (an overrun is caught by the arena).
  const size_t e = dtype_size(dtype);
  const int64_t N = int64_t(B) * T, C = c.hidden, F = c.ffn_hidden, V = c.padded_vocab_size;
  const int64_t D = c.resolved_head_dim(), Hq = c.num_heads, Hkv = c.num_kv_heads;
  auto al = [](size_t b) { return Arena::aligned(b); };
  const size_t s = dtype_size(stat_dtype(dtype));
  size_t attn = al(N * Hq * D * e) * 2 + al(N * Hkv * D * e) * 2 + al(B * Hq * T * s);
  if (c.qk_norm) attn += al(N * Hq * D * e) + al(N * Hkv * D * e) + al(N * Hq * s) + al(N * Hkv * s);
  size_t mlp = al(N * F * e) * (c.activation == ActivationKind::swiglu ? 3 : 2);
  size_t block = al(N * C * e) * 3 + al(N * s) * 4 + attn + mlp;
  size_t scratch = al(N * C * e) * 3 + al(N * Hq * D * e) * 2 + al(N * Hkv * D * e) * 2 +
                   (c.qk_norm ? al(N * Hq * D * e) + al(N * Hkv * D * e) : 0) +
                   al(N * F * e) * (c.activation == ActivationKind::swiglu ? 3 : 2);
  const int num_block_sets = (training && !c.recompute) ? c.num_layers : 1;  // as the constructor
  size_t total = al(N * C * e) * (c.num_layers + 1) + block * num_block_sets + scratch;
  total += al(N * C * e) + al(N * s) * 2 + al(N * V * e) + al(N * s) * 2 + al(N * C * e) * 2;
  return total;
}

Activations::Activations(const Transformer& model, int B, int T, bool training, Arena* arena)
    : B_(B), T_(T), training_(training), recompute_(model.config().recompute) {
  const ModelConfig& c = model.config();
  TS_CHECK(T <= c.max_seq_len, "sequence {} longer than max_seq_len {}", T, c.max_seq_len);
  const DType dt = model.dtype();
  const int64_t N = int64_t(B) * T;
  bytes_ = bytes_needed(c, dt, B, T, training);
  if (!arena) {
    own_ = Arena(model.device(), bytes_, "activations");
    arena = &own_;
  }
  Arena& arena_ = *arena;
  for (int l = 0; l <= c.num_layers; ++l) resid.push_back(arena_.alloc(dt, {N, c.hidden}));
  const int num_sets = (training && !recompute_) ? c.num_layers : 1;
  for (int l = 0; l < num_sets; ++l) blocks.push_back(Block::alloc_acts(arena_, c, dt, B, T));
  scratch = Block::alloc_scratch(arena_, c, dt, B, T);
  lnf_out = arena_.alloc(dt, {N, c.hidden});
  lnf_mean = arena_.alloc(stat_dtype(dt), {N});
  lnf_rstd = arena_.alloc(stat_dtype(dt), {N});
  logits = arena_.alloc(dt, {N, c.padded_vocab_size});
  losses = arena_.alloc(stat_dtype(dt), {N});
  lse = arena_.alloc(stat_dtype(dt), {N});
  d_lnf = arena_.alloc(dt, {N, c.hidden});
  d_resid = arena_.alloc(dt, {N, c.hidden});
}

Transformer::Transformer(const ModelConfig& cfg, DType dtype, Device device, Arena* arena)
    : cfg_(cfg), dtype_(dtype), device_(device) {
  const int V = cfg.padded_vocab_size, C = cfg.hidden;
  TS_CHECK(V >= cfg.vocab_size && cfg.vocab_size > 0, "vocab {} padded {}", cfg.vocab_size, V);
  wte_ = params_.add({"embed.wte", {V, C}, ParamClass::embedding, InitKind::normal, cfg.init_std});
  if (cfg.position == PositionKind::learned)
    wpe_ = params_.add({"embed.wpe", {cfg.max_seq_len, C}, ParamClass::embedding,
                        InitKind::normal, cfg.init_std});
  blocks_.resize(cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; ++l) blocks_[l].declare(params_, fmt::format("layers.{}", l), cfg);
  final_norm_.declare(params_, "final_norm", C, cfg.norm, cfg.bias, cfg.norm_eps);
  if (!cfg.tied_embeddings)
    lm_head_ = params_.add({"lm_head.weight", {V, C}, ParamClass::weight, InitKind::normal,
                            cfg.init_std});
  TS_CHECK(params_.num_elements() == cfg.num_params(), "parameter count {} vs config {}",
           params_.num_elements(), cfg.num_params());
  params_.allocate(dtype, device, arena);
}

Tensor Transformer::head_weight() const {
  return cfg_.tied_embeddings ? params_[wte_].value : params_[lm_head_].value;
}
int Transformer::head_grad_param() const { return cfg_.tied_embeddings ? wte_ : lm_head_; }

int64_t Transformer::count_valid(Tensor targets) const {
  std::vector<int32_t> host(targets.numel());
  copy_bytes(host.data(), Device::cpu, targets.data, targets.device, targets.nbytes());
  int64_t n = 0;
  for (int32_t t : host) n += t >= 0;
  return n;
}

void Transformer::forward_trunk(Activations& a, Tensor tokens) const {
  const int C = cfg_.hidden;
  Tensor x0 = a.resid[0].view({a.B_, a.T_, C});
  Tensor wpe = wpe_ >= 0 ? params_[wpe_].value : Tensor();
  ops::embedding_forward(x0, tokens, params_[wte_].value, wpe);
  for (int l = 0; l < cfg_.num_layers; ++l) {
    BlockActs& acts = a.blocks[a.blocks.size() == 1 ? 0 : l];
    blocks_[l].forward(params_, acts, a.scratch, a.resid[l + 1], a.resid[l]);
  }
  final_norm_.forward(params_, a.lnf_out, a.lnf_mean, a.lnf_rstd, a.resid[cfg_.num_layers]);
  ops::matmul_forward(a.logits, a.lnf_out, head_weight(), Tensor());
}

double Transformer::forward(Activations& a, Tensor tokens, Tensor targets) const {
  expect_shape(tokens, {a.B_, a.T_}, "tokens");
  forward_trunk(a, tokens);
  if (targets.empty()) return 0.0;
  expect_shape(targets, {a.B_, a.T_}, "targets");
  const int64_t N = int64_t(a.B_) * a.T_;
  ops::cross_entropy_forward(a.losses, a.lse, a.logits, targets.view({N}), cfg_.vocab_size);
  // Mean over valid targets, summed in double on the host (N values: cheap, deterministic).
  std::vector<double> host(N);
  Tensor host_losses(host.data(), DType::f64, Device::cpu, {N});
  if (a.losses.device == Device::cpu) {
    ops::cast(host_losses, a.losses);
  } else {
    std::vector<float> f(N);
    copy_bytes(f.data(), Device::cpu, a.losses.data, a.losses.device, a.losses.nbytes());
    for (int64_t i = 0; i < N; ++i) host[i] = f[i];
  }
  double sum = 0.0;
  for (double v : host) sum += v;
  const int64_t valid = count_valid(targets);
  return valid > 0 ? sum / double(valid) : 0.0;
}

void Transformer::backward(Activations& a, Tensor tokens, Tensor targets, float loss_scale) {
  TS_CHECK(a.training_, "backward on activations allocated for inference");
  const int64_t N = int64_t(a.B_) * a.T_;
  const int64_t valid = count_valid(targets);
  if (valid == 0) return;
  // d(loss_scale * mean) / d loss_n = loss_scale / valid; dlogits is computed in place.
  ops::cross_entropy_backward(a.logits, a.logits, a.lse, targets.view({N}), cfg_.vocab_size,
                              loss_scale / float(valid));
  const int head = head_grad_param();
  ops::matmul_backward(a.d_lnf, params_[head].grad, Tensor(), a.logits, a.lnf_out, head_weight());
  final_norm_.backward(params_, a.d_resid, a.d_lnf, a.resid[cfg_.num_layers], a.lnf_mean,
                       a.lnf_rstd);
  for (int l = cfg_.num_layers - 1; l >= 0; --l) {
    BlockActs& acts = a.blocks[a.blocks.size() == 1 ? 0 : l];
    if (a.recompute_ && l != cfg_.num_layers - 1) {
      // Re-run this block's forward into the shared set. It rewrites resid[l+1] with the value it
      // already holds (the ops are deterministic), which no later backward step reads.
      blocks_[l].forward(params_, acts, a.scratch, a.resid[l + 1], a.resid[l]);
    }
    blocks_[l].backward(params_, acts, a.scratch, a.d_resid, a.resid[l]);
  }
  Tensor wpe_grad = wpe_ >= 0 ? params_[wpe_].grad : Tensor();
  ops::embedding_backward(params_[wte_].grad, wpe_grad, a.d_resid.view({a.B_, a.T_, cfg_.hidden}),
                          tokens);
}

}  // namespace tessera
