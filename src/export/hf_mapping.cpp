// Tessera -> Hugging Face transformers: architecture choice, config files and tensor names
// (hf_mapping.h).
#include "export/hf_mapping.h"

#include <fmt/format.h>

#include "core/error.h"
#include "data/tokenizer.h"

namespace tessera::exporting {
namespace {

// A model key the chosen HF class cannot express.
[[noreturn]] void mismatch(const ExportModel& m, const char* cls, const std::string& what) {
  TS_USER_ERROR("export: checkpoint {}: {} cannot be exported as {} (safetensors): {}",
                m.checkpoint_dir, to_string(m.recipe.model.family), cls, what);
}

void check_gpt2(const ExportModel& m) {
  const ModelConfig& c = m.recipe.model;
  const char* cls = "GPT2LMHeadModel";
  if (c.norm != NormKind::layernorm) mismatch(m, cls, "model.norm must be layernorm");
  if (c.position != PositionKind::learned) mismatch(m, cls, "model.position must be learned");
  if (c.activation != ActivationKind::gelu) mismatch(m, cls, "model.activation must be gelu");
  if (!c.bias) mismatch(m, cls, "model.bias must be true");
  if (!c.tied_embeddings) mismatch(m, cls, "model.tied_embeddings must be true");
  if (c.qk_norm) mismatch(m, cls, "model.qk_norm must be false");
  if (c.num_kv_heads != c.num_heads) mismatch(m, cls, "model.num_kv_heads must equal num_heads");
  if (c.resolved_head_dim() * c.num_heads != c.hidden)
    mismatch(m, cls, "model.head_dim must be hidden / num_heads");
  if (c.moe.enabled()) mismatch(m, cls, "MoE layers (moe.num_experts > 0)");
}

void check_llama(const ExportModel& m, const char* cls) {
  const ModelConfig& c = m.recipe.model;
  if (c.norm != NormKind::rmsnorm) mismatch(m, cls, "model.norm must be rmsnorm");
  if (c.position != PositionKind::rope) mismatch(m, cls, "model.position must be rope");
  if (c.activation != ActivationKind::swiglu) mismatch(m, cls, "model.activation must be swiglu");
  if (c.bias && c.qk_norm) mismatch(m, cls, "model.bias must be false (Qwen3 has no MLP biases)");
}

void check_qwen3_moe(const ExportModel& m) {
  const MoeConfig& e = m.recipe.model.moe;
  const char* cls = "Qwen3MoeForCausalLM";
  if (!m.recipe.model.qk_norm)
    mismatch(m, cls,
             "MoE safetensors export needs model.qk_norm = true (Qwen3-MoE); MoE without "
             "QK-norm is not built");
  if (e.shared_experts > 0) mismatch(m, cls, "moe.shared_experts must be 0 (Qwen3-MoE has none)");
  check_llama(m, cls);
}

std::string eot_text(const ExportModel& m, int* id) {
  const Tokenizer tok = Tokenizer::from_hf_json(m.tokenizer_json, m.checkpoint_dir + " tokenizer");
  *id = tok.eot_id();
  if (*id < 0) return "";
  const int32_t ids[1] = {*id};
  return tok.decode(ids);
}

// A float as the shortest decimal that reads back as it (0.02, not 0.019999999552965164).
double json_float(float x) { return std::stod(fmt::format("{}", x)); }

nlohmann::json id_or_null(int id) { return id < 0 ? nlohmann::json(nullptr) : nlohmann::json(id); }

// Appends (rows, cols) transposed: GPT-2's Conv1D stores (in, out).
void append_transposed(const ExportTensor& t, std::vector<float>& out, int64_t out_cols,
                       int64_t col0) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[size_t(c * out_cols + col0 + r)] = t.data[r * cols + c];
}

HfTensor transposed(const std::string& name, const ExportTensor& t) {
  HfTensor h{name, {t.shape[1], t.shape[0]}, std::vector<float>(t.data.size())};
  append_transposed(t, h.data, t.shape[0], 0);
  return h;
}

std::vector<HfTensor> gpt2_tensors(const ExportModel& m) {
  const ModelConfig& c = m.recipe.model;
  std::vector<HfTensor> out;
  const auto copy = [&](const std::string& hf, const std::string& ts) {
    const ExportTensor& t = m.at(ts);
    out.push_back({hf, t.shape, t.data});
  };
  copy("transformer.wte.weight", "embed.wte");
  copy("transformer.wpe.weight", "embed.wpe");
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string ts = fmt::format("layers.{}.", i), hf = fmt::format("transformer.h.{}.", i);
    copy(hf + "ln_1.weight", ts + "ln1.weight");
    copy(hf + "ln_1.bias", ts + "ln1.bias");
    // c_attn: (C, 3C), columns [q | k | v].
    const int64_t C = c.hidden;
    HfTensor qkv{hf + "attn.c_attn.weight", {C, 3 * C}, std::vector<float>(size_t(3 * C * C))};
    HfTensor qkv_b{hf + "attn.c_attn.bias", {3 * C}, {}};
    int64_t col = 0;
    for (const char* p : {"wq", "wk", "wv"}) {
      append_transposed(m.at(ts + "attn." + p + ".weight"), qkv.data, 3 * C, col);
      col += C;
      const ExportTensor& b = m.at(ts + "attn." + p + ".bias");
      qkv_b.data.insert(qkv_b.data.end(), b.data.begin(), b.data.end());
    }
    out.push_back(std::move(qkv));
    out.push_back(std::move(qkv_b));
    out.push_back(transposed(hf + "attn.c_proj.weight", m.at(ts + "attn.wo.weight")));
    copy(hf + "attn.c_proj.bias", ts + "attn.wo.bias");
    copy(hf + "ln_2.weight", ts + "ln2.weight");
    copy(hf + "ln_2.bias", ts + "ln2.bias");
    out.push_back(transposed(hf + "mlp.c_fc.weight", m.at(ts + "mlp.fc.weight")));
    copy(hf + "mlp.c_fc.bias", ts + "mlp.fc.bias");
    out.push_back(transposed(hf + "mlp.c_proj.weight", m.at(ts + "mlp.proj.weight")));
    copy(hf + "mlp.c_proj.bias", ts + "mlp.proj.bias");
  }
  copy("transformer.ln_f.weight", "final_norm.weight");
  copy("transformer.ln_f.bias", "final_norm.bias");
  return out;
}

std::vector<HfTensor> llama_tensors(const ExportModel& m) {
  const ModelConfig& c = m.recipe.model;
  std::vector<HfTensor> out;
  const auto copy = [&](const std::string& hf, const std::string& ts) {
    const ExportTensor& t = m.at(ts);
    out.push_back({hf, t.shape, t.data});
  };
  const auto linear = [&](const std::string& hf, const std::string& ts) {
    copy(hf + ".weight", ts + ".weight");
    if (c.bias) copy(hf + ".bias", ts + ".bias");
  };
  copy("model.embed_tokens.weight", "embed.wte");
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string ts = fmt::format("layers.{}.", i), hf = fmt::format("model.layers.{}.", i);
    copy(hf + "input_layernorm.weight", ts + "ln1.weight");
    for (const auto& [t, h] :
         {std::pair{"wq", "q_proj"}, {"wk", "k_proj"}, {"wv", "v_proj"}, {"wo", "o_proj"}})
      linear(hf + "self_attn." + h, ts + "attn." + t);
    if (c.qk_norm) {
      copy(hf + "self_attn.q_norm.weight", ts + "attn.q_norm.weight");
      copy(hf + "self_attn.k_norm.weight", ts + "attn.k_norm.weight");
    }
    copy(hf + "post_attention_layernorm.weight", ts + "ln2.weight");
    if (!c.moe.is_moe_layer(i)) {
      for (const char* p : {"gate", "up", "down"})
        linear(hf + "mlp." + p + "_proj", ts + "mlp." + p);
      continue;
    }
    copy(hf + "mlp.gate.weight", ts + "moe.router.weight");
    for (const char* p : {"gate", "up", "down"}) {
      const ExportTensor& t = m.at(ts + "moe.experts." + p + ".weight");  // (E, out, in)
      const int64_t per = t.shape[1] * t.shape[2];
      for (int64_t e = 0; e < t.shape[0]; ++e)
        out.push_back(
            {fmt::format("{}mlp.experts.{}.{}_proj.weight", hf, e, p),
             {t.shape[1], t.shape[2]},
             std::vector<float>(t.data.begin() + e * per, t.data.begin() + (e + 1) * per)});
    }
  }
  copy("model.norm.weight", "final_norm.weight");
  if (!c.tied_embeddings) copy("lm_head.weight", "lm_head.weight");
  return out;
}

}  // namespace

const char* hf_class_name(HfArch a) {
  switch (a) {
    case HfArch::gpt2: return "GPT2LMHeadModel";
    case HfArch::llama: return "LlamaForCausalLM";
    case HfArch::qwen3: return "Qwen3ForCausalLM";
    case HfArch::qwen3_moe: return "Qwen3MoeForCausalLM";
  }
  TS_BUG("HF architecture {}", int(a));
}

HfArch hf_arch_for(const ExportModel& m) {
  const ModelConfig& c = m.recipe.model;
  if (c.family == ModelFamily::gpt2) {
    check_gpt2(m);
    return HfArch::gpt2;
  }
  if (c.moe.enabled()) {
    check_qwen3_moe(m);
    return HfArch::qwen3_moe;
  }
  const HfArch a = c.qk_norm ? HfArch::qwen3 : HfArch::llama;
  check_llama(m, hf_class_name(a));
  return a;
}

nlohmann::json hf_config(const ExportModel& m, HfArch a, const std::string& torch_dtype) {
  const ModelConfig& c = m.recipe.model;
  int eot = -1;
  eot_text(m, &eot);
  nlohmann::json j;
  j["architectures"] = {hf_class_name(a)};
  j["vocab_size"] = c.vocab_size;
  j["torch_dtype"] = torch_dtype;
  j["tie_word_embeddings"] = c.tied_embeddings;
  j["bos_token_id"] = id_or_null(eot);
  j["eos_token_id"] = id_or_null(eot);
  j["initializer_range"] = json_float(c.init_std);
  j["use_cache"] = true;
  if (a == HfArch::gpt2) {
    j["model_type"] = "gpt2";
    j["n_positions"] = c.max_seq_len;
    j["n_embd"] = c.hidden;
    j["n_layer"] = c.num_layers;
    j["n_head"] = c.num_heads;
    j["n_inner"] = c.ffn_hidden;
    j["activation_function"] = "gelu_new";  // the tanh approximation Tessera computes
    j["layer_norm_epsilon"] = json_float(c.norm_eps);
    j["resid_pdrop"] = j["embd_pdrop"] = j["attn_pdrop"] = 0.0;
    j["scale_attn_weights"] = true;
    return j;
  }
  j["model_type"] = a == HfArch::llama ? "llama" : a == HfArch::qwen3 ? "qwen3" : "qwen3_moe";
  j["hidden_size"] = c.hidden;
  j["intermediate_size"] = c.ffn_hidden;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.resolved_head_dim();
  j["max_position_embeddings"] = c.max_seq_len;
  j["rms_norm_eps"] = json_float(c.norm_eps);
  j["rope_theta"] = json_float(c.rope_theta);
  j["rope_scaling"] = nullptr;
  j["hidden_act"] = "silu";
  j["attention_bias"] = c.bias;
  j["attention_dropout"] = 0.0;
  if (a == HfArch::llama) j["mlp_bias"] = c.bias;
  if (a != HfArch::llama) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = c.num_layers;
  }
  if (a == HfArch::qwen3_moe) {
    const MoeConfig& e = c.moe;
    j["num_experts"] = e.num_experts;
    j["num_experts_per_tok"] = e.topk;
    j["moe_intermediate_size"] = e.ffn_hidden;
    j["norm_topk_prob"] = e.norm_topk_prob;
    j["decoder_sparse_step"] = 1;
    std::vector<int> dense;
    for (int i = 0; i < c.num_layers; ++i)
      if (!e.is_moe_layer(i)) dense.push_back(i);
    j["mlp_only_layers"] = dense;
    j["router_aux_loss_coef"] = json_float(e.aux_loss_coef);
    j["output_router_logits"] = false;
  }
  return j;
}

nlohmann::json hf_generation_config(const ExportModel& m) {
  int eot = -1;
  eot_text(m, &eot);
  return {{"bos_token_id", id_or_null(eot)},
          {"eos_token_id", id_or_null(eot)},
          {"_from_model_config", false}};
}

nlohmann::json hf_tokenizer_config(const ExportModel& m) {
  int eot = -1;
  const std::string text = eot_text(m, &eot);
  nlohmann::json j{{"tokenizer_class", "PreTrainedTokenizerFast"},
                   {"model_max_length", m.recipe.model.max_seq_len},
                   {"clean_up_tokenization_spaces", false}};
  if (eot >= 0) j["bos_token"] = j["eos_token"] = text;
  return j;
}

std::vector<HfTensor> hf_tensors(const ExportModel& m, HfArch a) {
  return a == HfArch::gpt2 ? gpt2_tensors(m) : llama_tensors(m);
}

}  // namespace tessera::exporting
