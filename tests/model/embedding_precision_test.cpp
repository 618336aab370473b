// precision.high_precision: [embedding] (ModelConfig::fp32_embedding) under BF16 compute: the
// lookup reads the FP32 master tables and rounds the sum once; without it the BF16 values are
// summed. Both checked element by element against a host reference, for both model families.
// With learned positions (GPT-2) the two differ; without them (Llama) the one rounding of the
// master row is the BF16 value, so the residual stream is the same bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "../common/testing.h"
#include "core/dtype.h"
#include "model/transformer.h"
#include "tests/common/tiny_models.h"

namespace tessera {
namespace {

std::vector<float> as_f32(const Tensor& t) {
  std::vector<float> out(t.numel());
  convert_buffer(t.data, t.dtype, out.data(), DType::f32, t.numel());
  return out;
}

// resid[0] of a bf16 model, and the tables the lookup should have read: the FP32 masters with
// fp32_embedding, the BF16 values without.
struct Lookup {
  std::vector<float> embedded, wte, wpe;  // (B*T, C), (V, C), (maxT, C) or empty
};

Lookup run(ModelConfig cfg, bool fp32_embedding, const testing::HostTensor& tokens, int B, int T) {
  ExecOptions exec;
  exec.fp32_embedding = fp32_embedding;
  Transformer model(cfg, DType::bf16, Device::cpu, nullptr, {}, 1, true, exec);
  model.init_weights(5);
  EXPECT_EQ(model.fp32_embedding(), fp32_embedding);
  Activations acts(model, B, T, false);
  model.forward_stage(acts, tokens);
  Lookup l;
  l.embedded = as_f32(acts.stage_input());
  const Param& wte = model.params().find("embed.wte");
  l.wte = as_f32(fp32_embedding ? wte.master : wte.value);
  if (cfg.position == PositionKind::learned) {
    const Param& wpe = model.params().find("embed.wpe");
    l.wpe = as_f32(fp32_embedding ? wpe.master : wpe.value);
  }
  return l;
}

class EmbeddingPrecision : public ::testing::TestWithParam<const char*> {};

TEST_P(EmbeddingPrecision, Fp32TableRoundsTheSumOnce) {
  const ModelConfig cfg =
      std::string(GetParam()) == "gpt2" ? testing::tiny_gpt2() : testing::tiny_llama();
  const int B = 2, T = 6, C = cfg.hidden;
  std::mt19937_64 rng(3);
  const testing::HostTensor tokens = testing::randint({B, T}, 0, cfg.vocab_size, rng);
  int64_t differ = 0;
  std::vector<float> plain_embedded;
  for (bool fp32 : {false, true}) {
    SCOPED_TRACE(fp32 ? "fp32 embedding" : "bf16 embedding");
    const Lookup l = run(cfg, fp32, tokens, B, T);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < C; ++c) {
          const int64_t row = int64_t(tokens.get(b * T + t));
          float want = l.wte[row * C + c];
          if (!l.wpe.empty()) want += l.wpe[t * C + c];  // one f32 sum, then one rounding
          const float got = l.embedded[(b * T + t) * C + c];
          ASSERT_EQ(got, round_bf16(want)) << "b " << b << " t " << t << " c " << c;
        }
    if (!fp32)
      plain_embedded = l.embedded;
    else
      for (size_t i = 0; i < l.embedded.size(); ++i) differ += l.embedded[i] != plain_embedded[i];
  }
  if (cfg.position == PositionKind::learned)
    EXPECT_GT(differ, 0) << "the masters carry bits BF16 drops: some sums must round differently";
  else
    EXPECT_EQ(differ, 0) << "a lone row rounded once is its BF16 value";
}

INSTANTIATE_TEST_SUITE_P(Families, EmbeddingPrecision, ::testing::Values("gpt2", "llama"));

}  // namespace
}  // namespace tessera
