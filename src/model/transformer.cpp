// Transformer forward/backward: embedding -> blocks -> final norm -> LM head -> cross-entropy,
// and back, for one pipeline stage and one tensor-parallel slice. With recomputation only each
// block's input is kept; backward re-runs that block's forward into one shared activation set.
#include "model/transformer.h"

#include <algorithm>
#include <vector>

#include "kernels/ops.h"

namespace tessera {

static DType stat_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// The feed-forward kind of local block l, and every kind on the stage (what recomputation's
// shared set and the scratch must hold).
static FfnKinds block_ffn_kind(const ModelConfig& cfg, const ModelShard& s, int l) {
  const bool moe = cfg.moe.is_moe_layer(s.first_layer + l);
  return FfnKinds{!moe, moe};
}
static FfnKinds stage_ffn_kinds(const ModelConfig& cfg, const ModelShard& s) {
  FfnKinds k{false, false};
  for (int l = 0; l < s.num_layers; ++l) {
    const FfnKinds b = block_ffn_kind(cfg, s, l);
    k.dense |= b.dense;
    k.moe |= b.moe;
  }
  return k;
}

ModelConfig Transformer::local_config(const ModelConfig& cfg, const ModelShard& shard_in) {
  const ModelShard s = shard_in.resolved(cfg);
  ModelConfig l = cfg;
  l.head_dim = cfg.resolved_head_dim();
  l.num_heads = cfg.num_heads / s.tp_size;
  l.num_kv_heads = cfg.num_kv_heads / s.tp_size;
  l.ffn_hidden = cfg.ffn_hidden / s.tp_size;
  if (cfg.moe.shared_experts > 0) {  // the shared experts as one MLP of this rank's width
    l.moe.shared_ffn_hidden = cfg.moe.shared_experts * cfg.moe.shared_ffn_hidden / s.tp_size;
    l.moe.shared_experts = 1;
  }
  l.padded_vocab_size = cfg.padded_vocab_size / s.tp_size;
  l.num_layers = s.num_layers;
  return l;
}

size_t Activations::bytes_needed(const ModelConfig& cfg, DType dtype, int B, int T, bool training,
                                 const ModelShard& shard, const ExecOptions& exec, bool shares) {
  // Must mirror the allocations in Activations' constructor (an overrun is caught by the arena).
  const ModelShard sh = shard.resolved(cfg);
  const ModelConfig c = Transformer::local_config(cfg, sh);
  const size_t e = dtype_size(dtype);
  const int64_t N = int64_t(B) * T, C = c.hidden, F = c.ffn_hidden, V = c.padded_vocab_size;
  const int64_t D = c.resolved_head_dim(), Hq = c.num_heads, Hkv = c.num_kv_heads;
  auto al = [](size_t b) { return Arena::aligned(b); };
  const size_t s = dtype_size(stat_dtype(dtype));
  size_t attn = al(N * Hq * D * e) * 2 + al(N * Hkv * D * e) * 2 + al(B * Hq * T * s);
  if (c.qk_norm)
    attn += al(N * Hq * D * e) + al(N * Hkv * D * e) + al(N * Hq * s) + al(N * Hkv * s);
  const size_t mlp = al(N * F * e) * (c.activation == ActivationKind::swiglu ? 3 : 2);
  const size_t block = al(N * C * e) * 3 + al(N * s) * 4 + attn;
  const DType grad_dt = ParamStore::grad_dtype_for(dtype, exec.fp32_grads);
  const auto ffn = [&](FfnKinds k) {
    return (k.dense ? mlp : 0) + (k.moe ? Moe::acts_bytes(c, dtype, N, sh.ep_size) : 0);
  };
  const FfnKinds all = stage_ffn_kinds(cfg, sh);
  size_t total = al(N * C * e) * (c.num_layers + 1);
  if (training && !exec.recompute) {  // one set per block, as the constructor
    for (int l = 0; l < c.num_layers; ++l) total += block + ffn(block_ffn_kind(cfg, sh, l));
  } else if (!(shares && training)) {  // a sharing training set uses the owner's recompute set
    total += block + ffn(all);
  }
  if (!shares)
    total += al(N * C * e) * 3 + al(N * Hq * D * e) * 2 + al(N * Hkv * D * e) * 2 +
             (c.qk_norm ? al(N * Hq * D * e) + al(N * Hkv * D * e) : 0) + (all.dense ? mlp : 0) +
             (all.moe ? Moe::scratch_bytes(c, dtype, grad_dt, N, sh.ep_size) : 0);  // scratch
  if (sh.last_stage()) {
    const bool head32 = exec.fp32_lm_head && dtype != DType::f32 && dtype != DType::f64;
    total += al(N * C * e) + al(N * s) * 2 + al(N * V * (head32 ? 4 : e)) + al(N * s) * 2 +
             al(N * C * e);
    if (sh.tp_size > 1) total += al(3 * N * s);
    if (training && exec.distill) {  // teacher logits and KD statistics; the gradient is scratch
      const size_t le = head32 ? 4 : e;
      const int64_t K = exec.distill_top_k;
      if (K > 0)  // the cached rows live in the batch
        total += al(N * s) + al(3 * N * s) + (sh.tp_size > 1 ? al(N * s) + al((2 + K) * N * s) : 0);
      else
        total += al(N * V * le) + al(N * s) + al(2 * N * s) + (sh.tp_size > 1 ? al(5 * N * s) : 0);
      total += shares ? 0 : al(N * V * le);
    }
    // FP32 gradients take the head's f32 weight gradient directly; 16-bit ones need it formed
    // apart (head_dw32) and rounded (head_dw).
    if (head32)
      total +=
          al(N * C * 4) + al(V * C * 4) +
          (training ? al(N * C * 4) + (exec.fp32_grads ? 0 : al(V * C * 4) + al(V * C * e)) : 0);
  }
  total += al(N * C * e);                                                        // d_resid
  if (sh.first_stage() && exec.fp32_embedding && e < 4) total += al(N * C * 4);  // embed32
  if (training)  // hidden_diff: one (N, Ct) per hidden-state pair of this stage
    for (const HiddenLoss::Local& l : HiddenLoss::on_stage(exec.hidden_pairs, sh))
      total += al(N * l.pair.teacher_hidden * e);
  return total;
}

Activations::Activations(const Transformer& model, int B, int T, bool training, Arena* arena,
                         Activations* share)
    : B_(B), T_(T), training_(training), recompute_(model.exec_.recompute) {
  TS_CHECK(!share || (share->B_ == B && share->T_ == T && share->set_owner_ == share),
           "activations shared with a set of another shape, or one that shares itself");
  const ModelConfig& c = model.local_;
  TS_CHECK(T <= c.max_seq_len, "sequence {} longer than max_seq_len {}", T, c.max_seq_len);
  const DType dt = model.dtype();
  const DType st = stat_dtype(dt);
  const int64_t N = int64_t(B) * T;
  bytes_ = bytes_needed(model.cfg_, dt, B, T, training, model.shard_, model.exec_, share);
  if (!arena) {
    own_ = Arena(model.device(), bytes_, "activations");
    arena = &own_;
  }
  Arena& ar = *arena;
  for (int l = 0; l <= c.num_layers; ++l) resid.push_back(ar.alloc(dt, {N, c.hidden}));
  if (model.shard_.first_stage() && model.fp32_embedding())
    embed32 = ar.alloc(DType::f32, {N, c.hidden});
  const ModelShard& sh = model.shard_;
  const FfnKinds all = stage_ffn_kinds(model.cfg_, sh);
  if (training && !recompute_) {
    for (int l = 0; l < c.num_layers; ++l)
      blocks.push_back(
          Block::alloc_acts(ar, c, dt, B, T, block_ffn_kind(model.cfg_, sh, l), sh.ep_size));
  } else if (share && training) {  // the owner's recomputation set
    TS_CHECK(share->training_ && share->blocks.size() == 1, "sharing a set without recomputation");
    blocks = share->blocks;
    set_owner_ = share;
  } else {
    blocks.push_back(Block::alloc_acts(ar, c, dt, B, T, all, sh.ep_size));
  }
  scratch =
      share ? share->scratch
            : Block::alloc_scratch(ar, c, dt, model.params().grad_dtype(), B, T, all, sh.ep_size);
  if (model.shard_.last_stage()) {
    lnf_out = ar.alloc(dt, {N, c.hidden});
    lnf_mean = ar.alloc(st, {N});
    lnf_rstd = ar.alloc(st, {N});
    const bool head32 = model.exec_.fp32_lm_head && dt != DType::f32 && dt != DType::f64;
    logits = ar.alloc(head32 ? DType::f32 : dt, {N, c.padded_vocab_size});
    if (head32) {
      lnf_out32 = ar.alloc(DType::f32, {N, c.hidden});
      head_w32 = ar.alloc(DType::f32, {c.padded_vocab_size, c.hidden});
      if (training) d_lnf32 = ar.alloc(DType::f32, {N, c.hidden});
      if (training && model.params().grad_dtype() != DType::f32) {
        head_dw32 = ar.alloc(DType::f32, {c.padded_vocab_size, c.hidden});
        head_dw = ar.alloc(dt, {c.padded_vocab_size, c.hidden});
      }
    }
    losses = ar.alloc(st, {N});
    lse = ar.alloc(st, {N});
    if (model.shard_.tp_size > 1) ce_stats = ar.alloc(st, {3, N});
    if (training && model.exec_.distill) {
      DistillBuffers& d = distill;
      const bool tp = model.shard_.tp_size > 1;
      const int64_t K = model.exec_.distill_top_k;
      d.losses = ar.alloc(st, {N});
      if (K > 0) {
        d.sparse_stats = ar.alloc(st, {3, N});
        if (tp) d.sparse_max = ar.alloc(st, {N});
        if (tp) d.sparse_sums = ar.alloc(st, {2 + K, N});
      } else {
        d.teacher_logits = ar.alloc(logits.dtype, {N, c.padded_vocab_size});
        d.lse = ar.alloc(st, {2, N});
        if (tp) d.stats = ar.alloc(st, {5, N});
      }
      d.grad = share ? share->distill.grad : ar.alloc(logits.dtype, {N, c.padded_vocab_size});
    }
    d_lnf = ar.alloc(dt, {N, c.hidden});
  }
  d_resid = ar.alloc(dt, {N, c.hidden});
  if (training)
    for (const HiddenLoss::Local& l : model.hidden_.local())
      hidden_diff.push_back(ar.alloc(dt, {N, l.pair.teacher_hidden}));
}

Transformer::Transformer(DeclareOnly, const ModelConfig& cfg, const ModelShard& shard,
                         const std::vector<HiddenPair>& hidden_pairs)
    : cfg_(cfg),
      local_(local_config(cfg, shard)),
      shard_(shard.resolved(cfg)),
      dtype_(DType::f32),
      device_(Device::cpu) {
  exec_.hidden_pairs = hidden_pairs;
  declare_params();
}

Transformer::Transformer(const ModelConfig& cfg, DType dtype, Device device, Arena* arena,
                         const ModelShard& shard, int64_t pad_multiple, bool with_master,
                         const ExecOptions& exec)
    : Transformer(DeclareOnly{}, cfg, shard, exec.hidden_pairs) {
  shard_.check_comms();
  exec_ = exec;
  for (Block& b : blocks_) b.set_attention_impl(exec.attention);
  dtype_ = dtype;
  device_ = device;
  params_.allocate(dtype, device, arena, pad_multiple, with_master, exec.fp32_grads, !exec.frozen);
  allocate_moe_records();
  TS_CHECK(!exec.fp32_embedding || with_master || dtype == DType::f32 || dtype == DType::f64,
           "fp32_embedding reads the FP32 master table, which this store does not keep");
}

void Transformer::allocate_moe_records() {
  const int64_t cap = std::max(1, exec_.moe_stat_records);
  const DType rt = dtype_ == DType::f64 ? DType::f64 : DType::f32;
  const int64_t E = cfg_.moe.num_experts;
  const size_t loss_bytes = Arena::aligned(size_t(cap) * 2 * dtype_size(rt));
  const size_t count_bytes = Arena::aligned(size_t(cap * E) * 4);
  size_t total = 0;
  for (const Block& b : blocks_) total += b.is_moe() ? loss_bytes + count_bytes : 0;
  if (total == 0) return;
  moe_record_buf_ = Buffer(device_, total);
  char* p = static_cast<char*>(moe_record_buf_.data());
  for (const Block& b : blocks_) {
    moe_loss_rec_.emplace_back();
    moe_count_rec_.emplace_back();
    if (!b.is_moe()) continue;
    moe_loss_rec_.back() = Tensor(p, rt, device_, {cap, 2});
    moe_count_rec_.back() = Tensor(p + loss_bytes, DType::i32, device_, {cap, E});
    p += loss_bytes + count_bytes;
  }
}

void Transformer::record_moe_stats(int l, const MoeActs& a) const {
  const int64_t row = moe_records_ % moe_loss_rec_[l].dim(0);
  copy_tensor(moe_loss_rec_[l].slice(row, row + 1).view({2}), a.loss);
  copy_tensor(moe_count_rec_[l].slice(row, row + 1).view({cfg_.moe.num_experts}),
              a.tokens_per_expert);
  moe_tokens_ = a.topk_idx.dim(0);
}

std::vector<MoeLayerStats> Transformer::moe_stats() const {
  std::vector<MoeLayerStats> out;
  const int64_t cap = std::max(1, exec_.moe_stat_records);
  const int64_t n = std::min(moe_records_, cap);
  for (int l = 0; l < int(moe_loss_rec_.size()); ++l) {
    if (moe_loss_rec_[l].empty()) continue;
    MoeLayerStats st;
    st.layer = shard_.first_layer + l;
    st.num_experts = cfg_.moe.num_experts;
    st.topk = cfg_.moe.topk;
    st.tokens = moe_tokens_;
    st.capacity = cfg_.moe.capacity(moe_tokens_);
    const int64_t E = st.num_experts;
    std::vector<double> losses(size_t(cap) * 2);
    std::vector<int32_t> counts(size_t(cap * E));
    const Tensor lr = moe_loss_rec_[l];
    if (lr.dtype == DType::f64) {
      copy_bytes(losses.data(), Device::cpu, lr.data, lr.device, lr.nbytes());
    } else {
      std::vector<float> f(size_t(cap) * 2);
      copy_bytes(f.data(), Device::cpu, lr.data, lr.device, lr.nbytes());
      for (size_t i = 0; i < f.size(); ++i) losses[i] = f[i];
    }
    const Tensor cr = moe_count_rec_[l];
    copy_bytes(counts.data(), Device::cpu, cr.data, cr.device, cr.nbytes());
    for (int64_t r = 0; r < n; ++r) {
      st.aux.push_back(losses[size_t(r) * 2]);
      st.z.push_back(losses[size_t(r) * 2 + 1]);
      st.tokens_per_expert.emplace_back(counts.begin() + r * E, counts.begin() + (r + 1) * E);
    }
    out.push_back(std::move(st));
  }
  return out;
}

double Transformer::moe_losses(const Activations& a) const {
  TS_CHECK(a.blocks.size() == blocks_.size(), "moe_losses needs one activation set per block");
  double sum = 0.0;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    if (!blocks_[l].is_moe()) continue;
    const Tensor loss = a.blocks[l].moe.loss;
    double v[2];
    if (loss.dtype == DType::f64) {
      copy_bytes(v, Device::cpu, loss.data, loss.device, sizeof v);
    } else {
      float f[2];
      copy_bytes(f, Device::cpu, loss.data, loss.device, sizeof f);
      v[0] = f[0], v[1] = f[1];
    }
    sum += v[0] + v[1];
  }
  return sum;
}

int64_t Transformer::local_num_params(const ModelConfig& cfg, const ModelShard& shard,
                                      const std::vector<HiddenPair>& hidden_pairs) {
  return Transformer(DeclareOnly{}, cfg, shard, hidden_pairs).params_.num_elements();
}

ParamStore Transformer::declared_params(const ModelConfig& cfg, const ModelShard& shard,
                                        const std::vector<HiddenPair>& hidden_pairs) {
  return std::move(Transformer(DeclareOnly{}, cfg, shard, hidden_pairs).params_);
}

std::vector<Transformer::LinearDecl> Transformer::declared_linears(const ModelConfig& cfg,
                                                                   const ModelShard& shard) {
  Transformer m(DeclareOnly{}, cfg, shard);
  std::vector<LinearDecl> out;
  m.for_each_linear([&](const Linear& l) {
    out.push_back({m.params_[l.weight].spec.name, l.out_features, l.in_features,
                   l.shares_input_with_previous});
  });
  return out;
}

size_t Transformer::param_bytes(const ModelConfig& cfg, const ModelShard& shard, DType dtype,
                                int64_t pad_multiple, bool with_master, bool fp32_grads,
                                bool with_grads, const std::vector<HiddenPair>& hidden_pairs) {
  const int64_t n = ParamStore::padded(local_num_params(cfg, shard, hidden_pairs), pad_multiple);
  return ParamStore::bytes_for(n, dtype, with_master, fp32_grads, with_grads);
}

void Transformer::declare_params() {
  const ModelConfig& cfg = cfg_;
  const ModelShard& s = shard_;
  if (s.ep_size > 1) params_.align_expert_runs(s.expert_align);
  const int V = cfg.padded_vocab_size, C = cfg.hidden, Vl = V / s.tp_size;
  TS_CHECK(V >= cfg.vocab_size && cfg.vocab_size > 0, "vocab {} padded {}", cfg.vocab_size, V);
  // Vocabulary-parallel table: this tp rank holds rows [tp_rank * Vl, (tp_rank + 1) * Vl).
  const auto vocab_table = [&](const std::string& name, ParamClass cls) {
    ParamSpec p{name, {Vl, C}, cls, InitKind::normal, cfg.init_std};
    if (s.tp_size > 1) {
      p.global_shape = Shape{V, C};
      p.shard_dim = 0;
      p.shard_offset = int64_t(s.tp_rank) * Vl;
    }
    return p;
  };
  const bool tied_across_stages = cfg.tied_embeddings && s.pp_size > 1;
  if (s.first_stage()) {
    ParamSpec wte = vocab_table("embed.wte", ParamClass::embedding);
    wte.embedding_group = tied_across_stages;
    wte_ = params_.add(std::move(wte));
    if (cfg.position == PositionKind::learned) {
      ParamSpec wpe{
          "embed.wpe", {cfg.max_seq_len, C}, ParamClass::embedding, InitKind::normal, cfg.init_std};
      wpe.owner = s.tp_rank == 0;  // replicated over tp, added by tp rank 0 only
      wpe_ = params_.add(std::move(wpe));
    }
  }
  blocks_.resize(s.num_layers);
  for (int i = 0; i < s.num_layers; ++i)
    blocks_[i].declare(params_, fmt::format("layers.{}", s.first_layer + i), cfg, s.first_layer + i,
                       s);
  if (s.last_stage()) {
    final_norm_first_ = params_.size();
    final_norm_.declare(params_, "final_norm", C, cfg.norm, cfg.bias, cfg.norm_eps, s);
    if (!cfg.tied_embeddings) {
      lm_head_ = params_.add(vocab_table("lm_head.weight", ParamClass::weight));
    } else if (tied_across_stages) {
      // Megatron's shared embedding: the last stage keeps its own copy of the first stage's table
      // (same name, same initial values); their gradients are summed over the embedding group, so
      // the two copies take identical steps. The first stage owns it.
      ParamSpec copy = vocab_table("embed.wte", ParamClass::embedding);
      copy.embedding_group = true;
      copy.owner = false;
      lm_head_ = params_.add(std::move(copy));
    }
  }
  if (s.tp_size == 1 && s.pp_size == 1 && s.ep_size == 1)
    TS_CHECK(params_.num_elements() == cfg.num_params(), "parameter count {} vs config {}",
             params_.num_elements(), cfg.num_params());
  // Distillation's projections come last: backward completes their gradients first.
  hidden_.declare(params_, exec_.hidden_pairs, C, s);
}

Tensor Transformer::head_weight() const { return params_[head_grad_param()].value; }
int Transformer::head_grad_param() const { return lm_head_ >= 0 ? lm_head_ : wte_; }

int64_t Transformer::count_valid(Tensor targets) const {
  std::vector<int32_t> host(targets.numel());
  copy_bytes(host.data(), Device::cpu, targets.data, targets.device, targets.nbytes());
  int64_t n = 0;
  for (int32_t t : host) n += t >= 0;
  return n;
}

void Transformer::forward_stage(Activations& a, Tensor tokens) const {
  const int C = cfg_.hidden;
  if (shard_.first_stage()) {
    expect_shape(tokens, {a.B_, a.T_}, "tokens");
    Tensor x0 = a.resid[0].view({a.B_, a.T_, C});
    // Vocabulary-parallel embedding: each tp rank looks up the tokens in its rows (zero rows for
    // the others) and tp rank 0 adds the positions; the sum over tp is the full embedding.
    const bool positions = wpe_ >= 0 && shard_.tp_rank == 0;
    const int64_t Vl = local_.padded_vocab_size;
    if (a.embed32.empty()) {
      ops::embedding_forward(x0, tokens, params_[wte_].value,
                             positions ? params_[wpe_].value : Tensor(),
                             int64_t(shard_.tp_rank) * Vl, cfg_.padded_vocab_size);
      reduce_from_tp_region_forward(shard_, a.resid[0]);
    } else {  // precision.high_precision: [embedding]: the FP32 masters, one rounding
      ops::embedding_forward(a.embed32.view({a.B_, a.T_, C}), tokens, params_[wte_].master,
                             positions ? params_[wpe_].master : Tensor(),
                             int64_t(shard_.tp_rank) * Vl, cfg_.padded_vocab_size);
      reduce_from_tp_region_forward(shard_, a.embed32);  // the tp sum in FP32 too
      ops::cast(a.resid[0], a.embed32);
    }
  }
  for (int l = 0; l < local_.num_layers; ++l) {
    BlockActs& acts = a.blocks[a.blocks.size() == 1 ? 0 : l];
    blocks_[l].forward(params_, acts, a.scratch, a.resid[l + 1], a.resid[l]);
    if (a.training_ && blocks_[l].is_moe()) record_moe_stats(l, acts.moe);
  }
  if (a.training_ && moe_record_buf_.data() != nullptr) ++moe_records_;
  if (a.recompute_) a.set_owner_->last_block_of_ = &a;
  if (shard_.last_stage()) {
    final_norm_.forward(params_, a.lnf_out, a.lnf_mean, a.lnf_rstd, a.resid[local_.num_layers]);
    copy_to_tp_region_forward(shard_, a.lnf_out);  // every rank's vocabulary slice reads it
    if (a.lnf_out32.empty()) {
      ops::matmul_forward(a.logits, a.lnf_out, head_weight(), Tensor());
    } else {  // precision.high_precision: [lm_head]
      ops::cast(a.lnf_out32, a.lnf_out);
      ops::cast(a.head_w32, head_weight());
      ops::matmul_forward(a.logits, a.lnf_out32, a.head_w32, Tensor());
    }
  }
}

LossInputs Transformer::loss_inputs(const Activations& a, Tensor targets) const {
  TS_CHECK(shard_.last_stage(), "loss on pipeline stage {}", shard_.pp_rank);
  expect_shape(targets, {a.B_, a.T_}, "targets");
  LossInputs in;
  in.logits = a.logits;
  in.targets = targets.view({int64_t(a.B_) * a.T_});
  in.num_valid = count_valid(targets);
  in.vocab_size = cfg_.vocab_size;
  in.vocab_start = int64_t(shard_.tp_rank) * local_.padded_vocab_size;
  in.shard = &shard_;
  in.distill = a.distill;
  return in;
}

double Transformer::hidden_forward(Activations& a, std::span<const int32_t> targets,
                                   std::span<const Tensor> teachers) const {
  TS_CHECK(a.training_ && a.hidden_diff.size() == hidden_.local().size(),
           "hidden-state loss on activations without its buffers ({} of {} pairs)",
           a.hidden_diff.size(), hidden_.local().size());
  TS_CHECK(int64_t(targets.size()) == int64_t(a.B_) * a.T_, "{} targets for ({}, {})",
           targets.size(), a.B_, a.T_);
  int64_t valid = 0;
  for (int32_t t : targets) valid += t >= 0;
  std::vector<Tensor> students;
  for (const HiddenLoss::Local& l : hidden_.local()) students.push_back(a.resid[l.state]);
  const double v = hidden_.forward(params_, students, teachers, a.hidden_diff, targets, valid);
  a.hidden_ready_ = true;
  a.hidden_valid_ = valid;
  return v;
}

LossValues Transformer::loss_forward(Activations& a, Tensor targets) const {
  return objective_.forward(loss_inputs(a, targets), {a.losses, a.lse, a.ce_stats}, a.training_);
}

double Transformer::forward(Activations& a, Tensor tokens, Tensor targets) const {
  TS_CHECK(shard_.pp_size == 1, "Transformer::forward on a pipeline stage; use forward_stage");
  forward_stage(a, tokens);
  return targets.empty() ? 0.0 : loss_forward(a, targets).total;
}

void Transformer::backward(Activations& a, Tensor tokens, Tensor targets, float loss_scale) {
  TS_CHECK(shard_.pp_size == 1, "Transformer::backward on a pipeline stage; use backward_stage");
  backward_stage(a, tokens, targets, loss_scale);
}

void Transformer::backward_stage(Activations& a, Tensor tokens, Tensor targets, float loss_scale) {
  TS_CHECK(a.training_, "backward on activations allocated for inference");
  TS_CHECK(!exec_.frozen, "backward through a frozen model");
  const int L = local_.num_layers;
  // Distillation's hidden-state term: its gradient does not depend on the chain below the loss,
  // so the projections' gradients are formed first (their buckets may launch at once), and each
  // pair's gradient w.r.t. its student state joins d_resid where the backward reaches that state.
  bool hidden = false;
  std::vector<Tensor> students;
  if (hidden_.active()) {
    TS_CHECK(a.hidden_ready_, "hidden-state backward without hidden_forward on these activations");
    a.hidden_ready_ = false;
    if (a.hidden_valid_ > 0) {  // otherwise the term was 0, with no gradient
      for (const HiddenLoss::Local& l : hidden_.local()) students.push_back(a.resid[l.state]);
      hidden_.backward_params(params_, students, a.hidden_diff, a.hidden_valid_, loss_scale);
      if (hidden_.first_param() >= 0) grads_ready(hidden_.first_param());
      hidden = true;
    }
  }
  // d_resid holds d(loss)/d(residual stream after `state` of the stage's blocks).
  const auto add_hidden_grads = [&](int state) {
    if (!hidden) return;
    for (size_t k = 0; k < hidden_.local().size(); ++k)
      if (hidden_.local()[k].state == state)
        hidden_.add_state_grad(params_, int(k), a.d_resid, a.hidden_diff[k]);
  };
  if (shard_.last_stage()) {
    const LossInputs in = loss_inputs(a, targets);
    if (in.num_valid == 0) {
      // Nothing to learn from; upstream stages still expect a gradient.
      zero_tensor(a.d_resid);
    } else {
      // dlogits (the objective's gradient) replaces the logits.
      objective_.backward(in, {a.losses, a.lse, a.ce_stats}, loss_scale);
      const int head = head_grad_param();
      // d_lnf (N,C) = dlogits (N,Vl) W (Vl,C), summed over the vocabulary slices while the
      // head's weight gradient computes.
      if (a.lnf_out32.empty()) {
        ops::gemm(a.d_lnf, a.logits, head_weight(), false, false, 1.0f, 0.0f);
        CommHandle d_lnf_sum = copy_to_tp_region_backward_async(shard_, a.d_lnf);
        ops::matmul_backward(Tensor(), params_[head].grad, Tensor(), a.logits, a.lnf_out,
                             head_weight());
        if (d_lnf_sum) d_lnf_sum->wait();
      } else {
        // FP32 head: the products and the tp sum in FP32; the weight gradient accumulates into
        // an FP32 gradient directly, or is formed in FP32 and added to a 16-bit one (one more
        // rounding than the fused accumulate).
        ops::gemm(a.d_lnf32, a.logits, a.head_w32, false, false, 1.0f, 0.0f);
        CommHandle d_lnf_sum = copy_to_tp_region_backward_async(shard_, a.d_lnf32);
        if (a.head_dw32.empty()) {
          ops::matmul_backward(Tensor(), params_[head].grad, Tensor(), a.logits, a.lnf_out32,
                               a.head_w32);
        } else {
          zero_tensor(a.head_dw32);
          ops::matmul_backward(Tensor(), a.head_dw32, Tensor(), a.logits, a.lnf_out32, a.head_w32);
          ops::cast(a.head_dw, a.head_dw32);
          ops::add_inplace(params_[head].grad, a.head_dw);
        }
        if (d_lnf_sum) d_lnf_sum->wait();
        ops::cast(a.d_lnf, a.d_lnf32);
      }
      final_norm_.backward(params_, a.d_resid, a.d_lnf, a.resid[L], a.lnf_mean, a.lnf_rstd);
    }
    grads_ready(final_norm_first_);
  }
  // The recomputation set still holds this micro-batch's last block unless another forward
  // (of a micro-batch sharing the set) ran since.
  const bool last_block_kept = a.set_owner_->last_block_of_ == &a;
  a.set_owner_->last_block_of_ = nullptr;
  add_hidden_grads(L);
  for (int l = L - 1; l >= 0; --l) {
    BlockActs& acts = a.blocks[a.blocks.size() == 1 ? 0 : l];
    if (a.recompute_ && (l != L - 1 || !last_block_kept)) {
      // Re-run this block's forward into the recomputation set. It rewrites resid[l+1] with the
      // value it already holds (the ops are deterministic), which no later step reads.
      blocks_[l].forward(params_, acts, a.scratch, a.resid[l + 1], a.resid[l]);
    }
    blocks_[l].backward(params_, acts, a.scratch, a.d_resid, a.resid[l], loss_scale);
    grads_ready(blocks_[l].first_param());
    add_hidden_grads(l);
  }
  if (shard_.first_stage()) {
    Tensor wpe_grad = wpe_ >= 0 ? params_[wpe_].grad : Tensor();
    const int64_t Vl = local_.padded_vocab_size;
    ops::embedding_backward(params_[wte_].grad, wpe_grad, a.d_resid.view({a.B_, a.T_, cfg_.hidden}),
                            tokens, int64_t(shard_.tp_rank) * Vl, cfg_.padded_vocab_size);
    grads_ready(0);
  }
}

}  // namespace tessera
