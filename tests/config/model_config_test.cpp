// ModelConfig: family defaults and num_params, checked against published parameter counts and
// against a per-tensor enumeration written out separately for every combination of switches.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config/model_config.h"
#include "core/error.h"

namespace tessera {
namespace {

ModelConfig gpt2_small(int padded_vocab) {
  ModelConfig c = model_defaults_for_family(ModelFamily::gpt2);
  c.vocab_size = 50257;
  c.padded_vocab_size = padded_vocab;
  c.num_layers = 12;
  c.hidden = 768;
  c.num_heads = 12;
  c.num_kv_heads = 12;
  c.ffn_hidden = 3072;
  c.max_seq_len = 1024;
  return c;
}

// GPT-2 small, C = 768, L = 12, F = 3072, Tmax = 1024, tied, with biases and LayerNorm:
//   wte 50304*768 = 38,633,472; wpe 1024*768 = 786,432
//   per layer: ln_1 + ln_2 2*(768+768) = 3,072; qkv 768*2304 + 2304 = 1,771,776;
//              attn proj 768*768 + 768 = 590,592; fc 768*3072 + 3072 = 2,362,368;
//              mlp proj 3072*768 + 768 = 2,360,064; sum 7,087,872; x12 = 85,054,464
//   ln_f 1,536
//   total 38,633,472 + 786,432 + 85,054,464 + 1,536 = 124,475,904
// With the unpadded 50257 rows it is 124,439,808, the count published for GPT-2 small.
TEST(ModelConfig, Gpt2SmallParameterCount) {
  EXPECT_EQ(gpt2_small(50304).num_params(), 124'475'904);
  EXPECT_EQ(gpt2_small(50257).num_params(), 124'439'808);
}

// Llama-3.2-1B: V = 128256, C = 2048, L = 16, Hq = 32, Hkv = 8, D = 64, F = 8192, tied:
//   embedding 128256*2048 = 262,668,288
//   per layer: norms 2*2048 = 4,096; q, o 2*2048*2048 = 8,388,608; k, v 2*2048*512 = 2,097,152;
//              gate, up, down 3*2048*8192 = 50,331,648; sum 60,821,504; x16 = 973,144,064
//   final norm 2,048; total 1,235,814,400 (the published count)
TEST(ModelConfig, Llama32_1bParameterCount) {
  ModelConfig c = model_defaults_for_family(ModelFamily::llama);
  c.vocab_size = c.padded_vocab_size = 128256;
  c.num_layers = 16;
  c.hidden = 2048;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 64;
  c.ffn_hidden = 8192;
  c.max_seq_len = 2048;
  c.tied_embeddings = true;
  EXPECT_EQ(c.num_params(), 1'235'814'400);
}

// Qwen3-14B: V = 151936, C = 5120, L = 40, Hq = 40, Hkv = 8, D = 128, F = 17408, untied, QK-norm:
//   embedding and LM head 2*151936*5120 = 1,555,824,640
//   per layer: norms 2*5120 = 10,240; q, o 2*5120*5120 = 52,428,800; k, v 2*5120*1024 =
//              10,485,760; q/k norms 2*128 = 256; MLP 3*5120*17408 = 267,386,880;
//              sum 330,311,936; x40 = 13,212,477,440
//   final norm 5,120; total 14,768,307,200 (published: 14.8B, 13.2B without embeddings)
TEST(ModelConfig, Qwen3_14bParameterCount) {
  ModelConfig c = model_defaults_for_family(ModelFamily::llama);
  c.vocab_size = 151669;
  c.padded_vocab_size = 151936;
  c.num_layers = 40;
  c.hidden = 5120;
  c.num_heads = 40;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.ffn_hidden = 17408;
  c.max_seq_len = 40960;
  c.qk_norm = true;
  EXPECT_EQ(c.num_params(), 14'768'307'200);
}

// The parameter list of a model, tensor by tensor, written independently of num_params.
int64_t enumerate_params(const ModelConfig& c) {
  const int64_t V = c.padded_vocab_size, C = c.hidden, F = c.ffn_hidden, L = c.num_layers;
  const int64_t D = c.resolved_head_dim(), Hq = c.num_heads, Hkv = c.num_kv_heads;
  std::vector<int64_t> sizes;
  auto norm = [&](int64_t n) {
    sizes.push_back(n);                                               // weight
    if (c.norm == NormKind::layernorm && c.bias) sizes.push_back(n);  // bias
  };
  auto linear = [&](int64_t in, int64_t out) {
    sizes.push_back(in * out);
    if (c.bias) sizes.push_back(out);
  };
  sizes.push_back(V * C);
  if (c.position == PositionKind::learned) sizes.push_back(int64_t(c.max_seq_len) * C);
  for (int64_t l = 0; l < L; ++l) {
    norm(C);
    linear(C, Hq * D);
    linear(C, Hkv * D);
    linear(C, Hkv * D);
    if (c.qk_norm) {
      sizes.push_back(D);
      sizes.push_back(D);
    }
    linear(Hq * D, C);
    norm(C);
    if (c.activation == ActivationKind::swiglu) linear(C, F);  // gate
    linear(C, F);
    linear(F, C);
  }
  norm(C);
  if (!c.tied_embeddings) sizes.push_back(C * V);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  return total;
}

TEST(ModelConfig, CountMatchesEnumerationForEverySwitch) {
  for (int bits = 0; bits < 64; ++bits) {
    ModelConfig c = model_defaults_for_family(bits & 32 ? ModelFamily::llama : ModelFamily::gpt2);
    c.norm = bits & 1 ? NormKind::rmsnorm : NormKind::layernorm;
    c.position = bits & 2 ? PositionKind::rope : PositionKind::learned;
    c.activation = bits & 4 ? ActivationKind::swiglu : ActivationKind::gelu;
    c.bias = bits & 8;
    c.tied_embeddings = bits & 16;
    c.qk_norm = bits & 32;
    c.vocab_size = 97;
    c.padded_vocab_size = 128;
    c.num_layers = 3;
    c.hidden = 48;
    c.num_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = bits & 1 ? 10 : 0;  // explicit head_dim not dividing hidden, or hidden / heads
    c.ffn_hidden = 100;
    c.max_seq_len = 33;
    EXPECT_EQ(c.num_params(), enumerate_params(c)) << "switch bits " << bits;
  }
}

TEST(ModelConfig, FamilyDefaults) {
  const ModelConfig g = model_defaults_for_family(ModelFamily::gpt2);
  EXPECT_EQ(g.norm, NormKind::layernorm);
  EXPECT_EQ(g.position, PositionKind::learned);
  EXPECT_EQ(g.activation, ActivationKind::gelu);
  EXPECT_TRUE(g.bias && g.tied_embeddings && !g.qk_norm);
  EXPECT_FLOAT_EQ(g.norm_eps, 1e-5f);
  const ModelConfig l = model_defaults_for_family(ModelFamily::llama);
  EXPECT_EQ(l.family, ModelFamily::llama);
  EXPECT_EQ(l.norm, NormKind::rmsnorm);
  EXPECT_EQ(l.position, PositionKind::rope);
  EXPECT_EQ(l.activation, ActivationKind::swiglu);
  EXPECT_TRUE(!l.bias && !l.tied_embeddings && !l.qk_norm);
  EXPECT_FLOAT_EQ(l.norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(l.rope_theta, 10000.0f);
  // An unknown family is the parser's user error (recipe_errors_test: model.family 'gpt3').
  EXPECT_EQ(enum_from_name<ModelFamily>("mamba"), std::nullopt);
}

TEST(ModelConfig, CountNeedsAResolvedVocabulary) {
  ModelConfig c = gpt2_small(0);
  EXPECT_THROW(c.num_params(), Error);
}

}  // namespace
}  // namespace tessera
