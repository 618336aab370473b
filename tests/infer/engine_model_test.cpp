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
#include "infer/engine_model.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera {
namespace {

using exporting::ExportModel;
using exporting::ReferenceModel;
using exporting::WeightQuant;
using testing::ScratchDir;

const char* kGpt2 =
    "  family: gpt2\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  max_seq_len: 48\n";
const char* kQwen3 =
    "  family: llama\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  num_kv_heads: 2\n"
    "  head_dim: 32\n  ffn_hidden: 96\n  max_seq_len: 48\n  qk_norm: true\n";
const char* kMoe = "moe:\n  num_experts: 4\n  topk: 2\n  ffn_hidden: 32\n  shared_experts: 1\n"
                   "  first_dense_layers: 1\n";

std::vector<int32_t> random_tokens(int n, uint64_t seed) {
  std::mt19937 gen{uint32_t(seed)};
  std::uniform_int_distribution<int32_t> id(0, 4095);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = id(gen);
  return t;
}

// The logits of every position of `tokens` from the engine, run as consecutive chunks of the
// given sizes over a cache of block_size blocks whose table is a shuffled set of blocks.
std::vector<float> engine_logits(EngineModel& m, const std::vector<int32_t>& tokens,
                                 const std::vector<int>& chunks, int block_size) {
  const int T = int(tokens.size());
  const int blocks = (T + block_size - 1) / block_size;
  KvCacheArena kv = m.make_kv_cache(blocks + 5, block_size);
  std::vector<int32_t> table(size_t(blocks + 5));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(3));
  table.resize(size_t(blocks));
  m.reserve(T, T, 1, blocks, T);
  std::vector<float> out;
  int start = 0;
  for (int n : chunks) {
    StepRows rows;
    rows.table_width = blocks;
    rows.block_tables = table;
    rows.max_context = T;
    for (int p = start; p < start + n; ++p) {
      rows.tokens.push_back(tokens[size_t(p)]);
      rows.positions.push_back(p);
      rows.slots.push_back(table[size_t(p / block_size)] * block_size + p % block_size);
      rows.seq.push_back(0);
      rows.logit_rows.push_back(p - start);
    }
    const std::vector<float>& l = m.forward(rows, kv);
    out.insert(out.end(), l.begin(), l.end());
    start += n;
  }
  EXPECT_EQ(start, T);
  return out;
}

// The reference's logits of positions 0..T-2 (those perplexity scores), (T-1, V).
std::vector<float> reference_logits(const ExportModel& m, WeightQuant q, int group,
                                    const std::vector<int32_t>& tokens) {
  const ReferenceModel ref(m, q, group, int(tokens.size()), "test");
  std::vector<float> logits;
  ref.perplexity(tokens, &logits);
  return logits;
}

// Max |a - b| over the first rows * V entries, relative to the largest |b|.
double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / std::max(scale, 1e-30);
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
  EXPECT_LE(max_rel_diff(engine_logits(*e, tokens, {7, 1, 13, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                                       3),
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
};

class EngineModelQuantized : public ::testing::TestWithParam<QuantCase> {};

// The engine running a quantized export equals the reference forward on the same weights
// dequantized: the integer codes and FP16 scales are used exactly.
TEST_P(EngineModelQuantized, LogitsEqualTheFakeQuantizedForward) {
  ScratchDir dir;
  const QuantCase q = GetParam();
  const Recipe r = testing::export_recipe(kQwen3, q.extra);
  const ExportModel m = exporting::load_export_model(
      testing::write_synthetic_checkpoint(dir / "run", r));
  exporting::ExportOptions o;
  o.format = exporting::ExportFormat::tessera;
  o.quant = q.quant;
  o.group_size = q.group;
  o.out = dir / "model.h5";
  exporting::export_model(m, o);
  const std::vector<int32_t> tokens = random_tokens(33, 5);
  const std::vector<float> want = reference_logits(m, q.ref, q.group, tokens);
  std::unique_ptr<EngineModel> e = EngineModel::load(o.out, {});
  EXPECT_EQ(e->weight_format(), std::string(q.name).substr(0, 4) == "int8" ? "int8" : "int4-g32");
  EXPECT_LE(max_rel_diff(engine_logits(*e, tokens, {20, 1, 1, 11}, 4), want, want.size()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Quants, EngineModelQuantized,
    ::testing::Values(
        QuantCase{"int8", exporting::ExportQuant::int8, WeightQuant::int8, 0, ""},
        QuantCase{"int4_g32", exporting::ExportQuant::int4, WeightQuant::int4, 32, ""},
        QuantCase{"int4_g32_moe", exporting::ExportQuant::int4, WeightQuant::int4, 32, kMoe}),
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
