// Safetensors export: the file parses by the format's rules (8-byte little-endian header length,
// JSON header, 8-byte aligned data, offsets back to back), every tensor holds the checkpoint's
// values under its Hugging Face name and layout (GPT-2's transposed Conv1D and fused c_attn,
// Llama/Qwen3 names, Qwen3-MoE experts one by one), config.json describes the model, and models no
// HF class matches are user errors naming the key.
#include "export/safetensors_writer.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "tests/common/errors.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera::exporting {
namespace {

using testing::ScratchDir;

// A safetensors file parsed independently of the writer: tensors as f32 values.
struct Parsed {
  nlohmann::json header;
  std::map<std::string, std::vector<float>> values;
  std::map<std::string, std::vector<int64_t>> shapes;
};

Parsed parse_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  Parsed p;
  EXPECT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  EXPECT_EQ(n % 8, 0u) << "the data must start 8-byte aligned";
  p.header = nlohmann::json::parse(bytes.substr(8, n));
  const size_t data0 = 8 + n;
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const auto& [name, e] : p.header.items()) {
    if (name == "__metadata__") continue;
    const std::string dt = e["dtype"];
    const int64_t b = e["data_offsets"][0], end = e["data_offsets"][1];
    spans.push_back({b, end});
    const auto shape = e["shape"].get<std::vector<int64_t>>();
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    const int64_t elem = dt == "F32" ? 4 : 2;
    EXPECT_EQ(end - b, count * elem) << name;
    std::vector<float> v(static_cast<size_t>(count));
    const char* src = bytes.data() + data0 + b;
    for (int64_t i = 0; i < count; ++i) {
      if (dt == "F32") {
        std::memcpy(&v[size_t(i)], src + 4 * i, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        v[size_t(i)] = dt == "F16" ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
      }
    }
    p.values[name] = std::move(v);
    p.shapes[name] = shape;
  }
  std::sort(spans.begin(), spans.end());
  int64_t at = 0;
  for (const auto& [b, e] : spans) {
    EXPECT_EQ(b, at) << "tensors lie back to back";
    at = e;
  }
  EXPECT_EQ(size_t(at), bytes.size() - data0) << "nothing after the last tensor";
  return p;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

ExportOptions st_options(ExportQuant q, const std::string& out) {
  ExportOptions o;
  o.format = ExportFormat::safetensors;
  o.quant = q;
  o.out = out;
  return o;
}

std::vector<float> transposed(const ExportTensor& t) {
  const int64_t R = t.shape[0], K = t.shape[1];
  std::vector<float> out(t.data.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) out[size_t(k * R + r)] = t.data[size_t(r * K + k)];
  return out;
}

TEST(Safetensors, Gpt2IsGPT2LMHeadModelWithConv1DLayouts) {
  ScratchDir dir;
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(
      dir / "run", testing::export_recipe(testing::kGpt2Model)));
  export_model(m, st_options(ExportQuant::f32, dir / "hf"));
  const Parsed p = parse_safetensors(dir / "hf/model.safetensors");
  EXPECT_EQ(p.header["__metadata__"]["format"], "pt");
  EXPECT_EQ(p.values.size(), 2u + 2 * 12 + 2u);  // wte, wpe; 12 per block; ln_f
  EXPECT_EQ(p.values.count("lm_head.weight"), 0u) << "tied: transformers ties it";
  EXPECT_EQ(p.values.at("transformer.wte.weight"), m.at("embed.wte").data);
  EXPECT_EQ(p.shapes.at("transformer.wte.weight"), (std::vector<int64_t>{4096, 64}));
  // c_attn (C, 3C): column j < C is q's output j, then k's, then v's.
  const std::vector<float>& c_attn = p.values.at("transformer.h.1.attn.c_attn.weight");
  EXPECT_EQ(p.shapes.at("transformer.h.1.attn.c_attn.weight"), (std::vector<int64_t>{64, 192}));
  const char* parts[] = {"wq", "wk", "wv"};
  for (int part = 0; part < 3; ++part) {
    const ExportTensor& w = m.at(std::string("layers.1.attn.") + parts[part] + ".weight");
    for (int64_t out = 0; out < 64; ++out)
      for (int64_t in = 0; in < 64; ++in)
        ASSERT_EQ(c_attn[size_t(in * 192 + part * 64 + out)], w.data[size_t(out * 64 + in)]);
    const ExportTensor& b = m.at(std::string("layers.1.attn.") + parts[part] + ".bias");
    const std::vector<float>& cb = p.values.at("transformer.h.1.attn.c_attn.bias");
    EXPECT_TRUE(std::equal(b.data.begin(), b.data.end(), cb.begin() + part * 64));
  }
  EXPECT_EQ(p.values.at("transformer.h.0.mlp.c_fc.weight"),
            transposed(m.at("layers.0.mlp.fc.weight")));
  EXPECT_EQ(p.shapes.at("transformer.h.0.mlp.c_fc.weight"), (std::vector<int64_t>{64, 256}));
  EXPECT_EQ(p.values.at("transformer.h.0.mlp.c_proj.weight"),
            transposed(m.at("layers.0.mlp.proj.weight")));
  EXPECT_EQ(p.values.at("transformer.h.0.attn.c_proj.weight"),
            transposed(m.at("layers.0.attn.wo.weight")));
  EXPECT_EQ(p.values.at("transformer.ln_f.bias"), m.at("final_norm.bias").data);
  const nlohmann::json c = read_json(dir / "hf/config.json");
  EXPECT_EQ(c["architectures"][0], "GPT2LMHeadModel");
  EXPECT_EQ(c["n_embd"], 64);
  EXPECT_EQ(c["n_inner"], 256);
  EXPECT_EQ(c["n_positions"], 16);
  EXPECT_EQ(c["vocab_size"], 4096);
  EXPECT_EQ(c["activation_function"], "gelu_new");
  EXPECT_EQ(c["torch_dtype"], "float32");
  EXPECT_EQ(c["eos_token_id"], 4095);
  EXPECT_EQ(read_json(dir / "hf/generation_config.json")["eos_token_id"], 4095);
  EXPECT_EQ(testing::read_all(dir / "hf/tokenizer.json"), m.tokenizer_json);
}

TEST(Safetensors, LlamaWithQkNormIsQwen3AndValuesRoundToTheDtype) {
  ScratchDir dir;
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(
      dir / "run", testing::export_recipe(testing::kLlamaModel)));
  export_model(m, st_options(ExportQuant::bf16, dir / "hf"));
  const Parsed p = parse_safetensors(dir / "hf/model.safetensors");
  EXPECT_EQ(p.header["model.layers.0.self_attn.k_proj.weight"]["dtype"], "BF16");
  const std::pair<const char*, const char*> names[] = {
      {"model.embed_tokens.weight", "embed.wte"},
      {"lm_head.weight", "lm_head.weight"},
      {"model.norm.weight", "final_norm.weight"},
      {"model.layers.1.input_layernorm.weight", "layers.1.ln1.weight"},
      {"model.layers.1.post_attention_layernorm.weight", "layers.1.ln2.weight"},
      {"model.layers.1.self_attn.q_proj.weight", "layers.1.attn.wq.weight"},
      {"model.layers.1.self_attn.k_proj.weight", "layers.1.attn.wk.weight"},
      {"model.layers.1.self_attn.v_proj.weight", "layers.1.attn.wv.weight"},
      {"model.layers.1.self_attn.o_proj.weight", "layers.1.attn.wo.weight"},
      {"model.layers.1.self_attn.q_norm.weight", "layers.1.attn.q_norm.weight"},
      {"model.layers.1.self_attn.k_norm.weight", "layers.1.attn.k_norm.weight"},
      {"model.layers.1.mlp.gate_proj.weight", "layers.1.mlp.gate.weight"},
      {"model.layers.1.mlp.up_proj.weight", "layers.1.mlp.up.weight"},
      {"model.layers.1.mlp.down_proj.weight", "layers.1.mlp.down.weight"}};
  for (const auto& [hf, ts] : names) {
    const ExportTensor& t = m.at(ts);
    ASSERT_TRUE(p.values.count(hf)) << hf;
    EXPECT_EQ(p.shapes.at(hf), t.shape) << hf;
    for (size_t i = 0; i < t.data.size(); ++i)
      ASSERT_EQ(p.values.at(hf)[i], round_bf16(t.data[i])) << hf << "[" << i << "]";
  }
  EXPECT_EQ(p.values.size(), 3u + 2 * 11);
  const nlohmann::json c = read_json(dir / "hf/config.json");
  EXPECT_EQ(c["architectures"][0], "Qwen3ForCausalLM");
  EXPECT_EQ(c["head_dim"], 32);
  EXPECT_EQ(c["num_key_value_heads"], 2);
  EXPECT_EQ(c["intermediate_size"], 96);
  EXPECT_EQ(c["rope_theta"], 10000.0);
  EXPECT_EQ(c["rms_norm_eps"], 1e-6);
  EXPECT_EQ(c["tie_word_embeddings"], false);
  EXPECT_EQ(c["torch_dtype"], "bfloat16");
}

TEST(Safetensors, LlamaWithoutQkNormIsLlamaForCausalLM) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(std::string(testing::kLlamaModel) +
                                          "  tied_embeddings: true\n  rope_theta: 500000\n");
  Recipe no_qk = r;
  no_qk.model.qk_norm = false;
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(dir / "run", no_qk));
  export_model(m, st_options(ExportQuant::f16, dir / "hf"));
  const nlohmann::json c = read_json(dir / "hf/config.json");
  EXPECT_EQ(c["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(c["rope_theta"], 500000.0);
  EXPECT_EQ(c["tie_word_embeddings"], true);
  const Parsed p = parse_safetensors(dir / "hf/model.safetensors");
  EXPECT_EQ(p.values.count("lm_head.weight"), 0u);
  EXPECT_EQ(p.values.count("model.layers.0.self_attn.q_norm.weight"), 0u);
  EXPECT_EQ(p.values.at("model.layers.0.mlp.up_proj.weight")[7],
            round_f16(m.at("layers.0.mlp.up.weight").data[7]));
}

TEST(Safetensors, MoeIsQwen3MoeWithOneTensorPerExpert) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(
      testing::kLlamaModel,
      "moe:\n  num_experts: 4\n  topk: 2\n  ffn_hidden: 32\n  first_dense_layers: 1\n");
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(dir / "run", r));
  export_model(m, st_options(ExportQuant::f32, dir / "hf"));
  const Parsed p = parse_safetensors(dir / "hf/model.safetensors");
  const ExportTensor& down = m.at("layers.1.moe.experts.down.weight");  // (E, C, Fe)
  const std::vector<float>& e2 = p.values.at("model.layers.1.mlp.experts.2.down_proj.weight");
  EXPECT_EQ(p.shapes.at("model.layers.1.mlp.experts.2.down_proj.weight"),
            (std::vector<int64_t>{64, 32}));
  EXPECT_TRUE(std::equal(e2.begin(), e2.end(), down.data.begin() + 2 * 64 * 32));
  EXPECT_EQ(p.values.at("model.layers.1.mlp.gate.weight"), m.at("layers.1.moe.router.weight").data);
  EXPECT_TRUE(p.values.count("model.layers.0.mlp.gate_proj.weight"));  // the dense first block
  const nlohmann::json c = read_json(dir / "hf/config.json");
  EXPECT_EQ(c["architectures"][0], "Qwen3MoeForCausalLM");
  EXPECT_EQ(c["num_experts"], 4);
  EXPECT_EQ(c["num_experts_per_tok"], 2);
  EXPECT_EQ(c["moe_intermediate_size"], 32);
  EXPECT_EQ(c["mlp_only_layers"], nlohmann::json::array({0}));
  EXPECT_EQ(c["norm_topk_prob"], true);
}

TEST(Safetensors, ModelsNoClassMatchesAreUserErrorsNamingTheKey) {
  ScratchDir dir;
  const auto fails = [&](Recipe r, const std::string& key) {
    SCOPED_TRACE(key);
    std::filesystem::remove_all(dir / "run");
    const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(dir / "run", r));
    testing::expect_user_error([&] { export_model(m, st_options(ExportQuant::f32, dir / "hf")); },
                               {key, m.checkpoint_dir});
    EXPECT_FALSE(std::filesystem::exists(dir / "hf"));
  };
  Recipe learned = testing::export_recipe(testing::kLlamaModel);
  learned.model.position = PositionKind::learned;
  fails(learned, "model.position");
  Recipe untied = testing::export_recipe(testing::kGpt2Model);
  untied.model.tied_embeddings = false;
  fails(untied, "model.tied_embeddings");
  fails(testing::export_recipe(testing::kLlamaModel,
                               "moe:\n  num_experts: 4\n  topk: 2\n  shared_experts: 1\n"),
        "moe.shared_experts");
}

}  // namespace
}  // namespace tessera::exporting
