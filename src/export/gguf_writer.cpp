// GGUF export: architecture choice, llama.cpp's metadata keys and tensor names, the Q/K row
// permutation of the `llama` architecture, the tokenizer as tokenizer.ggml.* arrays.
#include "export/gguf_writer.h"

#include <filesystem>
#include <memory>
#include <set>

#include <fmt/format.h>

#include "core/error.h"
#include "data/tokenizer.h"
#include "export/gguf_blocks.h"
#include "export/weight_quant.h"

namespace tessera::exporting {

const char* gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::f32: return "f32";
    case GgufType::f16: return "f16";
    case GgufType::bf16: return "bf16";
    case GgufType::q8_0: return "q8_0";
    case GgufType::q4_0: return "q4_0";
  }
  return "?";
}

const char* gguf_arch_name(GgufArch arch) {
  switch (arch) {
    case GgufArch::gpt2: return "gpt2";
    case GgufArch::llama: return "llama";
    case GgufArch::qwen3: return "qwen3";
    case GgufArch::qwen3moe: return "qwen3moe";
  }
  return "?";
}

namespace {

// A switch the target architecture needs to have `want`.
template <class T>
void require(const std::string& where, const char* arch, const char* key, T have, T want) {
  if (have != want)
    TS_USER_ERROR(
        "{}: model.{} = {} cannot be exported to GGUF: llama.cpp's {} architecture needs {} "
        "(no llama.cpp architecture computes this model)",
        where, key, have, arch, want);
}

void check_moe(const ModelConfig& cfg, const std::string& where) {
  const MoeConfig& m = cfg.moe;
  const auto no = [&](bool bad, const std::string& what) {
    if (bad)
      TS_USER_ERROR(
          "{}: {} cannot be exported to GGUF: llama.cpp's MoE architectures (qwen3moe, "
          "llama) have {}",
          where, what,
          "every block MoE, no shared experts, SwiGLU experts and "
          "renormalized top-k weights");
  };
  no(m.shared_experts > 0, fmt::format("moe.shared_experts = {}", m.shared_experts));
  no(m.first_dense_layers > 0, fmt::format("moe.first_dense_layers = {}", m.first_dense_layers));
  no(m.every != 1, fmt::format("moe.every = {}", m.every));
  no(!m.norm_topk_prob, "moe.norm_topk_prob = false");
  no(cfg.activation != ActivationKind::swiglu, "GELU experts (model.activation = gelu)");
}

}  // namespace

GgufArch gguf_arch_for(const ModelConfig& cfg, const std::string& where) {
  if (cfg.family == ModelFamily::gpt2) {
    const char* a = "gpt2";
    require(where, a, "norm", std::string(to_string(cfg.norm)), std::string("layernorm"));
    require(where, a, "position", std::string(to_string(cfg.position)), std::string("learned"));
    require(where, a, "activation", std::string(to_string(cfg.activation)), std::string("gelu"));
    require(where, a, "bias", cfg.bias, true);
    require(where, a, "qk_norm", cfg.qk_norm, false);
    require(where, a, "num_heads * head_dim", cfg.num_heads * cfg.resolved_head_dim(), cfg.hidden);
    if (cfg.moe.enabled())
      TS_USER_ERROR(
          "{}: a gpt2-family MoE model cannot be exported to GGUF: llama.cpp's gpt2 "
          "architecture has no experts",
          where);
    return GgufArch::gpt2;
  }
  const char* a = cfg.qk_norm ? "qwen3" : "llama";
  require(where, a, "norm", std::string(to_string(cfg.norm)), std::string("rmsnorm"));
  require(where, a, "position", std::string(to_string(cfg.position)), std::string("rope"));
  require(where, a, "activation", std::string(to_string(cfg.activation)), std::string("swiglu"));
  require(where, a, "bias", cfg.bias, false);
  if (cfg.moe.enabled()) {
    check_moe(cfg, where);
    return cfg.qk_norm ? GgufArch::qwen3moe : GgufArch::llama;
  }
  return cfg.qk_norm ? GgufArch::qwen3 : GgufArch::llama;
}

TensorRole tensor_role(const std::string& name, size_t ndim) {
  if (ndim == 1) return TensorRole::vector;
  if (name == "embed.wte" || name == "embed.wpe") return TensorRole::embedding;
  if (name == "lm_head.weight") return TensorRole::lm_head;
  if (name.find(".router.") != std::string::npos) return TensorRole::router;
  return TensorRole::block_linear;
}

GgmlType gguf_storage_type(GgufType type, TensorRole role, int64_t in_features) {
  if (role == TensorRole::vector || role == TensorRole::router) return GgmlType::f32;
  const bool quantized = type == GgufType::q8_0 || type == GgufType::q4_0;
  if (quantized && (role != TensorRole::block_linear || in_features % 32 != 0))
    return GgmlType::f16;
  switch (type) {
    case GgufType::f32: return GgmlType::f32;
    case GgufType::f16: return GgmlType::f16;
    case GgufType::bf16: return GgmlType::bf16;
    case GgufType::q8_0: return GgmlType::q8_0;
    case GgufType::q4_0: return GgmlType::q4_0;
  }
  TS_BUG("gguf type {}", int(type));
}

namespace {

uint32_t file_type_code(GgufType type) {  // llama_ftype (include/llama.h)
  switch (type) {
    case GgufType::f32: return 0;
    case GgufType::f16: return 1;
    case GgufType::q4_0: return 2;
    case GgufType::q8_0: return 7;
    case GgufType::bf16: return 32;
  }
  TS_BUG("gguf type {}", int(type));
}

// llama.cpp's LLAMA_ROPE_TYPE_NORM rotates adjacent pairs (2j, 2j+1); Tessera (as Hugging Face)
// rotates (j, j + D/2). Reordering each head's rows so that new row 2j + s = old row s * D/2 + j
// makes the interleaved rotation act on exactly the pairs Tessera rotates (convert_hf_to_gguf's
// permute). w (heads * D, cols).
std::vector<float> interleave_rope_rows(const std::vector<float>& w, int64_t heads,
                                        int64_t head_dim, int64_t cols) {
  TS_CHECK(int64_t(w.size()) == heads * head_dim * cols && head_dim % 2 == 0,
           "RoPE permutation of {} values as {} heads x {} x {}", w.size(), heads, head_dim, cols);
  std::vector<float> out(w.size());
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < half; ++j)
      for (int64_t s = 0; s < 2; ++s) {
        const float* src = w.data() + (h * head_dim + s * half + j) * cols;
        std::copy(src, src + cols, out.data() + (h * head_dim + 2 * j + s) * cols);
      }
  return out;
}

// The builder's view of one output tensor: its values (already permuted / fused), row-major as
// (outer..., in_features), and its GGUF name and type.
struct Planned {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch order: (..., rows, in_features)
  std::shared_ptr<const std::vector<float>> values;
  TensorRole role;
};

class Planner {
 public:
  Planner(const ExportModel& m, GgufArch arch, const std::string& where)
      : m_(m), arch_(arch), where_(where) {}

  // The tensor under its Tessera name, or null when absent (optional tensors).
  const ExportTensor* find(const std::string& name) const {
    return m_.has(name) ? &m_.at(name) : nullptr;
  }
  void add(const std::string& gguf_name, const std::string& tessera_name) {
    const ExportTensor& t = take(tessera_name);
    // Not owned: the model outlives the builder's use of it.
    add_values(gguf_name, tessera_name, t.shape,
               std::shared_ptr<const std::vector<float>>(std::shared_ptr<void>(), &t.data));
  }
  void add_optional(const std::string& gguf_name, const std::string& tessera_name) {
    if (find(tessera_name)) add(gguf_name, tessera_name);
  }
  void add_values(const std::string& gguf_name, const std::string& role_name,
                  std::vector<int64_t> shape, std::shared_ptr<const std::vector<float>> v) {
    const TensorRole role = tensor_role(role_name, shape.size());
    out_.push_back({gguf_name, std::move(shape), std::move(v), role});
  }
  const ExportTensor& take(const std::string& name) {
    if (!m_.has(name))
      TS_USER_ERROR("{}: the checkpoint has no tensor {} (a {} model needs it)", where_, name,
                    gguf_arch_name(arch_));
    used_.insert(name);
    return m_.at(name);
  }
  // Every tensor of the checkpoint must have found a place in the file: one left over means the
  // model has a part the architecture would silently drop.
  void check_all_used() const {
    for (const auto& [name, t] : m_.tensors)
      if (!used_.count(name))
        TS_USER_ERROR("{}: tensor {} has no place in llama.cpp's {} architecture", where_, name,
                      gguf_arch_name(arch_));
  }
  std::vector<Planned>& planned() { return out_; }

 private:
  const ExportModel& m_;
  GgufArch arch_;
  std::string where_;
  std::set<std::string> used_;
  std::vector<Planned> out_;
};

void plan_gpt2_attention(Planner& p, const std::string& src, const std::string& dst) {
  // Fused QKV: rows q, then k, then v (llama.cpp splits the product in that order).
  for (const char* part : {"weight", "bias"}) {
    auto fused = std::make_shared<std::vector<float>>();
    std::vector<int64_t> shape;
    for (const char* w : {"wq", "wk", "wv"}) {
      const ExportTensor& t = p.take(fmt::format("{}.attn.{}.{}", src, w, part));
      fused->insert(fused->end(), t.data.begin(), t.data.end());
      if (shape.empty())
        shape = t.shape;
      else
        shape[0] += t.shape[0];
    }
    p.add_values(fmt::format("{}.attn_qkv.{}", dst, part), fmt::format("{}.attn.wq.{}", src, part),
                 shape, fused);
  }
  p.add(dst + ".attn_output.weight", src + ".attn.wo.weight");
  p.add(dst + ".attn_output.bias", src + ".attn.wo.bias");
}

void plan_llama_attention(Planner& p, const ModelConfig& cfg, GgufArch arch, const std::string& src,
                          const std::string& dst) {
  const int64_t D = cfg.resolved_head_dim();
  const auto qk = [&](const char* w, const char* name, int64_t heads) {
    const ExportTensor& t = p.take(fmt::format("{}.attn.{}.weight", src, w));
    auto v = arch == GgufArch::llama
                 ? std::make_shared<const std::vector<float>>(
                       interleave_rope_rows(t.data, heads, D, t.shape[1]))
                 : std::shared_ptr<const std::vector<float>>(std::shared_ptr<void>(), &t.data);
    p.add_values(fmt::format("{}.{}.weight", dst, name), fmt::format("{}.attn.{}.weight", src, w),
                 t.shape, v);
  };
  qk("wq", "attn_q", cfg.num_heads);
  qk("wk", "attn_k", cfg.num_kv_heads > 0 ? cfg.num_kv_heads : cfg.num_heads);
  p.add(dst + ".attn_v.weight", src + ".attn.wv.weight");
  p.add(dst + ".attn_output.weight", src + ".attn.wo.weight");
  if (arch == GgufArch::qwen3 || arch == GgufArch::qwen3moe) {
    p.add(dst + ".attn_q_norm.weight", src + ".attn.q_norm.weight");
    p.add(dst + ".attn_k_norm.weight", src + ".attn.k_norm.weight");
  }
}

void plan_ffn(Planner& p, GgufArch arch, const std::string& src, const std::string& dst) {
  if (arch == GgufArch::gpt2) {
    for (const char* part : {"weight", "bias"}) {
      p.add(fmt::format("{}.ffn_up.{}", dst, part), fmt::format("{}.mlp.fc.{}", src, part));
      p.add(fmt::format("{}.ffn_down.{}", dst, part), fmt::format("{}.mlp.proj.{}", src, part));
    }
    return;
  }
  if (p.find(src + ".moe.router.weight")) {
    p.add(dst + ".ffn_gate_inp.weight", src + ".moe.router.weight");
    p.add(dst + ".ffn_gate_exps.weight", src + ".moe.experts.gate.weight");
    p.add(dst + ".ffn_up_exps.weight", src + ".moe.experts.up.weight");
    p.add(dst + ".ffn_down_exps.weight", src + ".moe.experts.down.weight");
    return;
  }
  p.add(dst + ".ffn_gate.weight", src + ".mlp.gate.weight");
  p.add(dst + ".ffn_up.weight", src + ".mlp.up.weight");
  p.add(dst + ".ffn_down.weight", src + ".mlp.down.weight");
}

std::vector<Planned> plan_tensors(const ExportModel& m, GgufArch arch, const std::string& where) {
  const ModelConfig& cfg = m.recipe.model;
  Planner p(m, arch, where);
  const bool gpt2 = arch == GgufArch::gpt2;
  p.add("token_embd.weight", "embed.wte");
  if (gpt2) p.add("position_embd.weight", "embed.wpe");
  for (int l = 0; l < cfg.num_layers; ++l) {
    const std::string src = fmt::format("layers.{}", l), dst = fmt::format("blk.{}", l);
    p.add(dst + ".attn_norm.weight", src + ".ln1.weight");
    p.add(dst + ".ffn_norm.weight", src + ".ln2.weight");
    if (gpt2) {
      p.add(dst + ".attn_norm.bias", src + ".ln1.bias");
      p.add(dst + ".ffn_norm.bias", src + ".ln2.bias");
      plan_gpt2_attention(p, src, dst);
    } else {
      plan_llama_attention(p, cfg, arch, src, dst);
    }
    plan_ffn(p, arch, src, dst);
  }
  p.add("output_norm.weight", "final_norm.weight");
  if (gpt2) p.add("output_norm.bias", "final_norm.bias");
  p.add_optional("output.weight", "lm_head.weight");  // absent when tied: llama.cpp reuses
                                                      // token_embd
  p.check_all_used();
  return std::move(p.planned());
}

GgufValue u32v(int64_t v) { return GgufValue::u32(uint32_t(v)); }

void set_hparams(GgufBuilder& b, const ExportModel& m, GgufArch arch, GgufType type) {
  const ModelConfig& cfg = m.recipe.model;
  const std::string a = gguf_arch_name(arch);
  const std::string stem = std::filesystem::path(m.recipe.file).stem().string();
  b.set("general.architecture", GgufValue::string(a));
  b.set("general.name", GgufValue::string(stem.empty() ? "tessera" : stem));
  b.set("general.quantization_version", u32v(2));
  b.set("general.alignment", u32v(int64_t(kGgufDefaultAlignment)));
  b.set("general.file_type", u32v(file_type_code(type)));
  const int64_t Hkv = cfg.num_kv_heads > 0 ? cfg.num_kv_heads : cfg.num_heads;
  const int64_t D = cfg.resolved_head_dim();
  b.set(a + ".vocab_size", u32v(cfg.vocab_size));
  b.set(a + ".context_length", u32v(cfg.max_seq_len));
  b.set(a + ".embedding_length", u32v(cfg.hidden));
  b.set(a + ".block_count", u32v(cfg.num_layers));
  b.set(a + ".feed_forward_length", u32v(cfg.ffn_hidden));
  b.set(a + ".attention.head_count", u32v(cfg.num_heads));
  b.set(a + ".attention.head_count_kv", u32v(Hkv));
  b.set(a + ".attention.key_length", u32v(D));
  b.set(a + ".attention.value_length", u32v(D));
  if (arch == GgufArch::gpt2) {
    b.set(a + ".attention.layer_norm_epsilon", GgufValue::f32(cfg.norm_eps));
  } else {
    b.set(a + ".attention.layer_norm_rms_epsilon", GgufValue::f32(cfg.norm_eps));
    b.set(a + ".rope.freq_base", GgufValue::f32(cfg.rope_theta));
    b.set(a + ".rope.dimension_count", u32v(D));
  }
  if (cfg.moe.enabled()) {
    b.set(a + ".expert_count", u32v(cfg.moe.num_experts));
    b.set(a + ".expert_used_count", u32v(cfg.moe.topk));
    b.set(a + ".expert_feed_forward_length", u32v(cfg.moe.ffn_hidden));
  }
}

void set_tokenizer(GgufBuilder& b, const ExportModel& m, const std::string& where) {
  const Tokenizer tok = Tokenizer::from_hf_json(m.tokenizer_json, where + " (tokenizer)");
  TokenizerVocabulary v = tok.vocabulary();
  const int n_vocab = m.recipe.model.vocab_size;
  if (int(v.tokens.size()) > n_vocab)
    TS_USER_ERROR("{}: the tokenizer has {} ids, more than model.vocab_size = {}", where,
                  v.tokens.size(), n_vocab);
  // Rows the model has beyond the tokenizer's ids are unused tokens to llama.cpp.
  for (int id = int(v.tokens.size()); id < n_vocab; ++id) {
    v.tokens.push_back(fmt::format("[PAD{}]", id));
    v.kinds.push_back(TokenizerVocabulary::Kind::unused);
  }
  std::vector<int64_t> types(v.kinds.size());
  for (size_t i = 0; i < v.kinds.size(); ++i) {
    switch (v.kinds[i]) {  // llama_token_type (include/llama.h)
      case TokenizerVocabulary::Kind::normal: types[i] = 1; break;
      case TokenizerVocabulary::Kind::special: types[i] = 3; break;  // control
      case TokenizerVocabulary::Kind::added: types[i] = 4; break;    // user defined
      case TokenizerVocabulary::Kind::unused: types[i] = 5; break;
    }
  }
  b.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
  // llama.cpp's pre-tokenizer names for the two regexes (llama-vocab.cpp: "gpt-2" -> GPT2,
  // "qwen2" -> QWEN2).
  b.set("tokenizer.ggml.pre", GgufValue::string(v.pre == PreTokenizer::gpt2 ? "gpt-2" : "qwen2"));
  b.set("tokenizer.ggml.tokens", GgufValue::strings(std::move(v.tokens)));
  b.set("tokenizer.ggml.token_type", GgufValue::i32s(std::move(types)));
  b.set("tokenizer.ggml.merges", GgufValue::strings(std::move(v.merges)));
  // Tessera's only special token is the document separator: it begins, ends and pads.
  if (tok.eot_id() >= 0) {
    for (const char* k : {"bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id"})
      b.set(std::string("tokenizer.ggml.") + k, u32v(tok.eot_id()));
  }
  b.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(false));
  b.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
}

}  // namespace

GgufBuilder build_gguf(const ExportModel& m, GgufType type, const std::string& where) {
  const GgufArch arch = gguf_arch_for(m.recipe.model, where);
  GgufBuilder b;
  set_hparams(b, m, arch, type);
  set_tokenizer(b, m, where);
  for (Planned& t : plan_tensors(m, arch, where)) {
    const int64_t cols = t.shape.back();
    const int64_t rows = int64_t(t.values->size()) / cols;
    const GgmlType gt = gguf_storage_type(type, t.role, cols);
    GgufTensor g;
    g.name = t.name;
    g.dims.assign(t.shape.rbegin(), t.shape.rend());  // ggml's ne: innermost first
    g.type = gt;
    const bool quantized = gt == GgmlType::q8_0 || gt == GgmlType::q4_0;
    g.produce = [values = t.values, gt, rows, cols, quantized, &m] {
      if (!quantized) return pack_gguf_rows(gt, values->data(), rows, cols);
      std::vector<float> w = *values;  // a QAT checkpoint's codes come from the rounded weight
      round_as_qat_forward(m.recipe, w);
      return pack_gguf_rows(gt, w.data(), rows, cols);
    };
    b.add_tensor(std::move(g));
  }
  return b;
}

void write_gguf(const ExportModel& model, GgufType type, const std::string& out_path) {
  build_gguf(model, type, out_path).write(out_path);
}

}  // namespace tessera::exporting
