// The GGUF writer on in-memory models: llama.cpp's tensor names and dims for gpt2 (fused QKV, tied
// head absent), llama (Q/K rows permuted for interleaved RoPE, GQA), qwen3 (QK-norm, no
// permutation) and qwen3moe (3-D expert tensors); the metadata keys and values; each tensor's
// type in Q8_0/Q4_0 files (block linears quantized, embeddings F16, vectors and routers F32, a
// width not divisible by 32 F16); the weights `tessera perplexity --quant` evaluates are exactly
// those the file holds; models no llama.cpp architecture expresses are user errors.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/rng.h"
#include "data/bpe_trainer.h"
#include "export/gguf_blocks.h"
#include "export/gguf_writer.h"
#include "export/reference_eval.h"
#include "model/transformer.h"
#include "tests/common/cli.h"
#include "tests/common/errors.h"
#include "tests/export/gguf_reader.h"

namespace tessera::exporting {
namespace {

const Tokenizer& tiny_tokenizer(PreTokenizer pre) {
  static const Tokenizer gpt2 = [] {
    BpeTrainOptions o;
    o.vocab_size = 300;
    return train_bpe({"the cat sat on the mat; the cat ate the rat. " + std::string(40, 'a')}, o);
  }();
  static const Tokenizer qwen = [] {
    BpeTrainOptions o;
    o.vocab_size = 300;
    o.pre = PreTokenizer::qwen2;
    return train_bpe({"the cat sat on the mat; the cat ate the rat. 1234"}, o);
  }();
  return pre == PreTokenizer::gpt2 ? gpt2 : qwen;
}

ModelConfig gpt2_config() {
  ModelConfig c = model_defaults_for_family(ModelFamily::gpt2);
  c.num_layers = 2;
  c.hidden = 64;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.ffn_hidden = 96;  // a multiple of 32: ffn_down quantizes; hidden 64 likewise
  c.max_seq_len = 16;
  return c;
}

ModelConfig llama_config(bool qk_norm) {
  ModelConfig c = model_defaults_for_family(ModelFamily::llama);
  c.num_layers = 2;
  c.hidden = 64;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_hidden = 80;  // not a multiple of 32: ffn_down stays F16 in Q8_0/Q4_0 files
  c.max_seq_len = 16;
  c.qk_norm = qk_norm;
  c.tied_embeddings = false;
  return c;
}

// A model with every parameter of `cfg` (random values) and the tiny tokenizer.
ExportModel make_model(ModelConfig cfg, PreTokenizer pre = PreTokenizer::gpt2) {
  const Tokenizer& tok = tiny_tokenizer(pre);
  cfg.vocab_size = tok.vocab_size() + 3;  // 3 rows beyond the tokenizer: unused tokens
  cfg.padded_vocab_size = cfg.vocab_size;
  ExportModel m;
  m.recipe.model = cfg;
  m.recipe.file = "recipes/tiny-test.yaml";
  m.tokenizer_json = tok.to_hf_json();
  const ParamStore ps = Transformer::declared_params(cfg, ModelShard{});
  const CounterRng rng(7, "export");
  uint64_t k = 0;
  for (const Param& p : ps.all()) {
    ExportTensor t;
    for (int d = 0; d < p.spec.shape.ndim; ++d) t.shape.push_back(p.spec.shape.dims[d]);
    t.data.resize(size_t(p.spec.shape.numel()));
    rng.fill_normal(t.data.data(), k, t.data.size(), 0.5f);
    k += t.data.size();
    m.tensors.emplace(p.spec.name, std::move(t));
  }
  return m;
}

testing::GgufParsed write_and_parse(const ExportModel& m, GgufType type, const std::string& name) {
  const std::string path = testing::fresh_dir_for_this_test("gguf-writer") + "/" + name + ".gguf";
  write_gguf(m, type, path);
  return testing::parse_gguf_file(path);
}

std::vector<float> file_values(const testing::GgufParsed& g, const std::string& name) {
  const auto& t = g.tensor(name);
  int64_t rows = 1;
  for (size_t d = 1; d < t.dims.size(); ++d) rows *= int64_t(t.dims[d]);
  return unpack_gguf_rows(GgmlType(t.type), g.data(t), rows, int64_t(t.dims[0]));
}

TEST(GgufWriter, Gpt2NamesDimsAndMetadata) {
  const ExportModel m = make_model(gpt2_config());
  const auto g = write_and_parse(m, GgufType::f32, "gpt2");
  EXPECT_EQ(g.version, 3u);
  EXPECT_EQ(g.kv.at("general.architecture").s(), "gpt2");
  EXPECT_EQ(g.kv.at("general.name").s(), "tiny-test");
  EXPECT_EQ(g.kv.at("general.quantization_version").u(), 2u);
  EXPECT_EQ(g.kv.at("general.file_type").u(), 0u);
  EXPECT_EQ(g.kv.at("gpt2.context_length").u(), 16u);
  EXPECT_EQ(g.kv.at("gpt2.embedding_length").u(), 64u);
  EXPECT_EQ(g.kv.at("gpt2.block_count").u(), 2u);
  EXPECT_EQ(g.kv.at("gpt2.feed_forward_length").u(), 96u);
  EXPECT_EQ(g.kv.at("gpt2.attention.head_count").u(), 4u);
  EXPECT_EQ(g.kv.at("gpt2.attention.head_count_kv").u(), 4u);
  EXPECT_FLOAT_EQ(float(g.kv.at("gpt2.attention.layer_norm_epsilon").f()), 1e-5f);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.model").s(), "gpt2");
  EXPECT_EQ(g.kv.at("tokenizer.ggml.pre").s(), "gpt-2");
  const auto& tokens = g.kv.at("tokenizer.ggml.tokens").strings();
  ASSERT_EQ(int(tokens.size()), m.recipe.model.vocab_size);
  const TokenizerVocabulary v = tiny_tokenizer(PreTokenizer::gpt2).vocabulary();
  EXPECT_EQ(std::vector<std::string>(tokens.begin(), tokens.begin() + v.tokens.size()), v.tokens);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.merges").strings(), v.merges);
  const auto& types = g.kv.at("tokenizer.ggml.token_type").numbers();
  const int eot = tiny_tokenizer(PreTokenizer::gpt2).eot_id();
  EXPECT_EQ(types[eot], 3.0);                   // control
  EXPECT_EQ(types[int(v.tokens.size())], 5.0);  // a row beyond the tokenizer: unused
  EXPECT_EQ(types[0], 1.0);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.eos_token_id").u(), uint64_t(eot));
  EXPECT_EQ(g.kv.at("tokenizer.ggml.bos_token_id").u(), uint64_t(eot));

  const auto& qkv = g.tensor("blk.1.attn_qkv.weight");
  EXPECT_EQ(qkv.dims, (std::vector<uint64_t>{64, 192}));  // (in, q + k + v rows)
  EXPECT_EQ(g.tensor("blk.1.attn_qkv.bias").dims, std::vector<uint64_t>{192});
  EXPECT_EQ(g.tensor("token_embd.weight").dims,
            (std::vector<uint64_t>{64, uint64_t(m.recipe.model.vocab_size)}));
  EXPECT_EQ(g.tensor("position_embd.weight").dims, (std::vector<uint64_t>{64, 16}));
  EXPECT_EQ(g.tensor("blk.0.ffn_up.weight").dims, (std::vector<uint64_t>{64, 96}));
  EXPECT_EQ(g.tensor("blk.0.ffn_down.weight").dims, (std::vector<uint64_t>{96, 64}));
  EXPECT_TRUE(g.has_tensor("output_norm.bias"));
  EXPECT_FALSE(g.has_tensor("output.weight")) << "tied: llama.cpp reuses token_embd";
  // The fused QKV holds q's rows, then k's, then v's.
  const auto fused = file_values(g, "blk.1.attn_qkv.weight");
  std::vector<float> expect = m.at("layers.1.attn.wq.weight").data;
  for (const char* w : {"wk", "wv"}) {
    const auto& d = m.at(fmt::format("layers.1.attn.{}.weight", w)).data;
    expect.insert(expect.end(), d.begin(), d.end());
  }
  EXPECT_EQ(fused, expect);
  // 4 + 2 per block (norms) + qkv, qkv bias, out, out bias, up, up bias, down, down bias...
  EXPECT_EQ(g.tensors.size(), 2 + 2 * (4 + 8) + 2u);
}

TEST(GgufWriter, LlamaPermutesQueryAndKeyRowsForInterleavedRope) {
  const ExportModel m = make_model(llama_config(false));
  const auto g = write_and_parse(m, GgufType::f32, "llama");
  EXPECT_EQ(g.kv.at("general.architecture").s(), "llama");
  EXPECT_EQ(g.kv.at("llama.rope.dimension_count").u(), 8u);
  EXPECT_EQ(g.kv.at("llama.attention.key_length").u(), 8u);
  EXPECT_EQ(g.kv.at("llama.attention.head_count_kv").u(), 2u);
  EXPECT_FLOAT_EQ(float(g.kv.at("llama.rope.freq_base").f()), 10000.0f);
  EXPECT_FLOAT_EQ(float(g.kv.at("llama.attention.layer_norm_rms_epsilon").f()), 1e-6f);
  EXPECT_TRUE(g.has_tensor("output.weight"));
  EXPECT_FALSE(g.has_tensor("blk.0.attn_q_norm.weight"));
  const int64_t C = 64, D = 8;
  for (const auto& [name, src, heads] :
       {std::tuple{"blk.0.attn_q.weight", "layers.0.attn.wq.weight", 4},
        std::tuple{"blk.0.attn_k.weight", "layers.0.attn.wk.weight", 2}}) {
    SCOPED_TRACE(name);
    const auto out = file_values(g, name);
    const auto& in = m.at(src).data;
    ASSERT_EQ(out.size(), in.size());
    // new row h*D + 2j + s = old row h*D + s*D/2 + j: each interleaved pair (2j, 2j+1) holds the
    // rotate_half pair (j, j + D/2).
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < D / 2; ++j)
        for (int64_t s = 0; s < 2; ++s)
          for (int64_t c = 0; c < C; ++c)
            ASSERT_EQ(out[(h * D + 2 * j + s) * C + c], in[(h * D + s * D / 2 + j) * C + c]);
  }
  EXPECT_EQ(file_values(g, "blk.0.attn_v.weight"), m.at("layers.0.attn.wv.weight").data);
  EXPECT_EQ(g.tensor("blk.1.ffn_gate.weight").dims, (std::vector<uint64_t>{64, 80}));
}

TEST(GgufWriter, Qwen3KeepsRowsAndWritesQkNorms) {
  const ExportModel m = make_model(llama_config(true), PreTokenizer::qwen2);
  const auto g = write_and_parse(m, GgufType::f16, "qwen3");
  EXPECT_EQ(g.kv.at("general.architecture").s(), "qwen3");
  EXPECT_EQ(g.kv.at("general.file_type").u(), 1u);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.pre").s(), "qwen2");
  EXPECT_EQ(g.tensor("blk.0.attn_q_norm.weight").dims, std::vector<uint64_t>{8});
  EXPECT_EQ(g.tensor("blk.0.attn_q_norm.weight").type, uint32_t(GgmlType::f32));
  EXPECT_EQ(g.tensor("blk.0.attn_q.weight").type, uint32_t(GgmlType::f16));
  std::vector<float> want = m.at("layers.0.attn.wq.weight").data;
  for (float& x : want) x = round_f16(x);
  EXPECT_EQ(file_values(g, "blk.0.attn_q.weight"), want);  // NEOX RoPE: no permutation
}

TEST(GgufWriter, QuantizedFilesQuantizeBlockLinearsOnly) {
  const ExportModel m = make_model(llama_config(false));
  for (GgufType type : {GgufType::q8_0, GgufType::q4_0}) {
    SCOPED_TRACE(gguf_type_name(type));
    const auto g = write_and_parse(m, type, gguf_type_name(type));
    const GgmlType q = type == GgufType::q8_0 ? GgmlType::q8_0 : GgmlType::q4_0;
    EXPECT_EQ(g.kv.at("general.file_type").u(), type == GgufType::q8_0 ? 7u : 2u);
    EXPECT_EQ(g.tensor("blk.0.attn_q.weight").type, uint32_t(q));
    EXPECT_EQ(g.tensor("blk.0.ffn_gate.weight").type, uint32_t(q));
    EXPECT_EQ(g.tensor("blk.0.ffn_down.weight").type, uint32_t(GgmlType::f16)) << "K = 80";
    EXPECT_EQ(g.tensor("token_embd.weight").type, uint32_t(GgmlType::f16));
    EXPECT_EQ(g.tensor("output.weight").type, uint32_t(GgmlType::f16));
    EXPECT_EQ(g.tensor("blk.0.attn_norm.weight").type, uint32_t(GgmlType::f32));
    // What `tessera perplexity --quant` evaluates is what the file holds (the Q/K permutation
    // moves whole rows, so it commutes with row-wise quantization).
    const auto ref = reference_weights(
        m, type == GgufType::q8_0 ? WeightQuant::q8_0 : WeightQuant::q4_0, 0, "test");
    EXPECT_EQ(file_values(g, "blk.1.ffn_up.weight"), ref.at("layers.1.mlp.up.weight").data);
    EXPECT_EQ(file_values(g, "blk.1.ffn_down.weight"), ref.at("layers.1.mlp.down.weight").data);
    EXPECT_EQ(file_values(g, "token_embd.weight"), ref.at("embed.wte").data);
    EXPECT_EQ(file_values(g, "blk.1.attn_v.weight"), ref.at("layers.1.attn.wv.weight").data);
    EXPECT_NE(ref.at("layers.1.mlp.up.weight").data, m.at("layers.1.mlp.up.weight").data);
  }
}

TEST(GgufWriter, Qwen3MoeExpertTensors) {
  ModelConfig c = llama_config(true);
  c.moe.num_experts = 4;
  c.moe.topk = 2;
  c.moe.ffn_hidden = 32;
  c.moe.shared_ffn_hidden = 32;
  const ExportModel m = make_model(c);
  const auto g = write_and_parse(m, GgufType::q8_0, "qwen3moe");
  EXPECT_EQ(g.kv.at("general.architecture").s(), "qwen3moe");
  EXPECT_EQ(g.kv.at("qwen3moe.expert_count").u(), 4u);
  EXPECT_EQ(g.kv.at("qwen3moe.expert_used_count").u(), 2u);
  EXPECT_EQ(g.kv.at("qwen3moe.expert_feed_forward_length").u(), 32u);
  EXPECT_EQ(g.tensor("blk.0.ffn_gate_inp.weight").dims, (std::vector<uint64_t>{64, 4}));
  EXPECT_EQ(g.tensor("blk.0.ffn_gate_inp.weight").type, uint32_t(GgmlType::f32));
  EXPECT_EQ(g.tensor("blk.0.ffn_gate_exps.weight").dims, (std::vector<uint64_t>{64, 32, 4}));
  EXPECT_EQ(g.tensor("blk.0.ffn_down_exps.weight").dims, (std::vector<uint64_t>{32, 64, 4}));
  EXPECT_EQ(g.tensor("blk.0.ffn_up_exps.weight").type, uint32_t(GgmlType::q8_0));
  EXPECT_FALSE(g.has_tensor("blk.0.ffn_gate.weight"));
}

TEST(GgufWriter, ModelsNoArchitectureExpressesAreUserErrors) {
  const std::string out = testing::fresh_dir_for_this_test("gguf-writer-errors") + "/x.gguf";
  ModelConfig rope_gpt2 = gpt2_config();
  rope_gpt2.position = PositionKind::rope;
  testing::expect_user_error([&] { write_gguf(make_model(rope_gpt2), GgufType::f16, out); },
                             {out, "model.position = rope", "gpt2"});
  ModelConfig biased = llama_config(false);
  biased.bias = true;
  testing::expect_user_error([&] { write_gguf(make_model(biased), GgufType::f16, out); },
                             {"model.bias = true", "llama"});
  ModelConfig shared = llama_config(true);
  shared.moe.num_experts = 4;
  shared.moe.ffn_hidden = 32;
  shared.moe.shared_experts = 1;
  shared.moe.shared_ffn_hidden = 32;
  testing::expect_user_error([&] { write_gguf(make_model(shared), GgufType::f16, out); },
                             {"moe.shared_experts = 1"});
  ExportModel extra = make_model(gpt2_config());
  extra.tensors["layers.0.mystery.weight"] = ExportTensor{{2, 2}, {1, 2, 3, 4}};
  testing::expect_user_error([&] { write_gguf(extra, GgufType::f16, out); },
                             {"layers.0.mystery.weight", "no place"});
  ExportModel small = make_model(gpt2_config());
  small.recipe.model.vocab_size = 10;
  testing::expect_user_error([&] { write_gguf(small, GgufType::f16, out); },
                             {"model.vocab_size = 10"});
  EXPECT_FALSE(std::filesystem::exists(out)) << "a failed export leaves no file";
}

}  // namespace
}  // namespace tessera::exporting
