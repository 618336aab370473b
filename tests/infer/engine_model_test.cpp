// Tests of the engine's model (src/infer/engine_model.cpp, engine_weights.cpp) on the CPU: its
// logits equal the training model's forward (export/reference_eval.h's Transformer, f32) for
// gpt2, llama/qwen3 (GQA, QK-norm) and MoE checkpoints, whether a prompt runs in one step or in
// chunks over a shuffled block table; a quantized export's logits equal the fake-quantized
// forward (int8 per channel, int4 g32, MoE experts); loading errors name the path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "export/export.h"
#include "export/reference_eval.h"
#include "export/weight_quant.h"
#include "infer/engine_model.h"
#include "tests/common/errors.h"
#include "tests/infer/engine_test_util.h"

namespace tessera {
namespace {

using exporting::ExportModel;
using exporting::ReferenceModel;
using exporting::WeightQuant;
using testing::engine_logits;
using testing::max_rel_diff;
using testing::random_tokens;
using testing::ScratchDir;

const char* kGpt2 =
    "  family: gpt2\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  max_seq_len: 48\n";
const char* kQwen3 =
    "  family: llama\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  num_kv_heads: 2\n"
    "  head_dim: 32\n  ffn_hidden: 96\n  max_seq_len: 48\n  qk_norm: true\n";
const char* kMoe =
    "moe:\n  num_experts: 4\n  topk: 2\n  ffn_hidden: 32\n  shared_experts: 1\n"
    "  first_dense_layers: 1\n";

// The reference's logits of positions 0..T-2 (those perplexity scores), (T-1, V).
std::vector<float> reference_logits(const ExportModel& m, WeightQuant q, int group,
                                    const std::vector<int32_t>& tokens) {
  const ReferenceModel ref(m, q, group, int(tokens.size()), "test");
  std::vector<float> logits;
  ref.perplexity(tokens, &logits);
  return logits;
}

struct Family {
  const char* name;
  const char* model;
  const char* extra;
};

class EngineModelParity : public ::testing::TestWithParam<Family> {};

TEST_P(EngineModelParity, LogitsEqualTheTrainingForwardInOneStepAndInChunks) {
  ScratchDir dir;
  const Family f = GetParam();
  const Recipe r = testing::export_recipe(f.model, f.extra);
  const std::string ckpt = testing::write_synthetic_checkpoint(dir / "run", r);
  const ExportModel m = exporting::load_export_model(ckpt);
  const std::vector<int32_t> tokens = random_tokens(40, 11);
  const std::vector<float> want = reference_logits(m, WeightQuant::f32, 0, tokens);
  const size_t n = want.size();
  std::unique_ptr<EngineModel> e = EngineModel::load(ckpt, {});
  ASSERT_EQ(e->vocab_size(), 4096);
  EXPECT_LE(max_rel_diff(engine_logits(*e, tokens, {40}, 16), want, n), 1e-5);
  // Prefill in uneven chunks, then one-token decodes, over blocks of 3 tokens.
  EXPECT_LE(max_rel_diff(engine_logits(*e, tokens, {7, 1, 13, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 3),
                         want, n),
            1e-5);
}

INSTANTIATE_TEST_SUITE_P(Families, EngineModelParity,
                         ::testing::Values(Family{"gpt2", kGpt2, ""}, Family{"qwen3", kQwen3, ""},
                                           Family{"gpt2_moe", kGpt2, kMoe},
                                           Family{"qwen3_moe", kQwen3, kMoe}),
                         [](const auto& info) { return std::string(info.param.name); });

struct QuantCase {
  const char* name;
  exporting::ExportQuant quant;
  WeightQuant ref;
  int group;
  const char* extra;
  const char* compute = "fp32";  // the recipe's: a QAT run in bf16 rounds its masters first
};

class EngineModelQuantized : public ::testing::TestWithParam<QuantCase> {};

// The engine running a quantized export equals the reference forward on the same weights
// dequantized: the integer codes and FP16 scales are used exactly. For a QAT checkpoint (trained
// in bf16) that reference is the fake-quantized forward QAT trained with.
TEST_P(EngineModelQuantized, LogitsEqualTheFakeQuantizedForward) {
  ScratchDir dir;
  const QuantCase q = GetParam();
  const Recipe r = testing::export_recipe(kQwen3, q.extra, q.compute);
  const ExportModel m =
      exporting::load_export_model(testing::write_synthetic_checkpoint(dir / "run", r));
  exporting::ExportOptions o;
  o.format = exporting::ExportFormat::tessera;
  o.quant = q.quant;
  o.group_size = q.group;
  o.out = dir / "model.h5";
  exporting::export_model(m, o);
  // The export keeps the float tensors (embeddings, norms, router) in the trained compute dtype:
  // the reference takes them so rounded too.
  ExportModel ref = m;
  if (std::string(q.compute) == "bf16")
    for (auto& [name, t] : ref.tensors)
      if (!exporting::is_quantized_weight(m, name))
        for (float& x : t.data) x = round_bf16(x);
  const std::vector<int32_t> tokens = random_tokens(33, 5);
  const std::vector<float> want = reference_logits(ref, q.ref, q.group, tokens);
  std::unique_ptr<EngineModel> e = EngineModel::load(o.out, {});
  EXPECT_EQ(e->weight_format(), std::string(q.name).substr(0, 4) == "int8" ? "int8" : "int4-g32");
  EXPECT_LE(max_rel_diff(engine_logits(*e, tokens, {20, 1, 1, 11}, 4), want, want.size()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Quants, EngineModelQuantized,
    ::testing::Values(
        QuantCase{"int8", exporting::ExportQuant::int8, WeightQuant::int8, 0, ""},
        QuantCase{"int4_g32", exporting::ExportQuant::int4, WeightQuant::int4, 32, ""},
        QuantCase{"int4_g32_moe", exporting::ExportQuant::int4, WeightQuant::int4, 32, kMoe},
        QuantCase{"int4_g32_qat_bf16", exporting::ExportQuant::int4, WeightQuant::int4, 32,
                  "qat:\n  weights: int4\n  group_size: 32\n", "bf16"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(EngineModelLoad, MissingPathIsAUserErrorNamingIt) {
  testing::expect_user_error([] { EngineModel::load("/nonexistent/model.h5", {}); },
                             {"no such model", "/nonexistent/model.h5"});
}

TEST(EngineModelLoad, TheCpuEngineComputesInFp32) {
  EngineModelOptions o;
  o.dtype = DType::bf16;
  testing::expect_user_error([&] { EngineModel::load("/nonexistent", o); }, {"fp32"});
}

}  // namespace
}  // namespace tessera
