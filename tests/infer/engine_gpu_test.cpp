// The engine on the GPU (built only with CUDA; skips without a GPU): its logits against the CPU
// engine's (FP32 on both: tightly; BF16 on the GPU: within what 16-bit weights, activations and KV
// cache explain) for gpt2, qwen3, MoE and an INT4 export; a request's tokens alone and in a batch
// of 32 are identical on the GPU too (the engine's CUDA linear and attention are batch-invariant).
#include <gtest/gtest.h>

#include "export/export.h"
#include "tests/common/gpu.h"
#include "tests/infer/engine_test_util.h"

namespace tessera {
namespace {

using testing::ScratchDir;

struct GpuFamily {
  const char* name;
  const char* model;
  const char* extra;
};

class EngineModelGpu : public testing::GpuCaseP<GpuFamily> {};

// FP32 on the GPU within 1e-4 of the largest logit (different summation orders only); BF16 within
// 5e-2 (weights and every activation rounded to 8 bits of mantissa through two layers).
TEST_P(EngineModelGpu, LogitsMatchTheCpuEngine) {
  ScratchDir dir;
  const GpuFamily f = GetParam();
  const Recipe r = testing::export_recipe(f.model, f.extra);
  const std::string ckpt = testing::write_synthetic_checkpoint(dir / "run", r);
  const std::vector<int32_t> tokens = testing::random_tokens(40, 11);
  const std::vector<int> chunks = {17, 1, 9, 1, 1, 11};
  std::unique_ptr<EngineModel> cpu = EngineModel::load(ckpt, {});
  const std::vector<float> want = testing::engine_logits(*cpu, tokens, chunks, 4);
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    std::unique_ptr<EngineModel> gpu = EngineModel::load(ckpt, {Device::cuda, dt});
    const std::vector<float> got = testing::engine_logits(*gpu, tokens, chunks, 4);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LE(testing::max_rel_diff(got, want, want.size()), dt == DType::f32 ? 1e-4 : 5e-2);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, EngineModelGpu,
                         ::testing::Values(GpuFamily{"gpt2", testing::kEngineGpt2, ""},
                                           GpuFamily{"qwen3", testing::kEngineQwen3, ""},
                                           GpuFamily{"qwen3_moe", testing::kEngineQwen3,
                                                     testing::kEngineMoe}),
                         [](const auto& info) { return std::string(info.param.name); });

TS_GPU_TEST(EngineQuantized, Int4ExportMatchesTheCpuEngine) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(testing::kEngineQwen3, testing::kEngineMoe);
  exporting::ExportOptions o;
  o.quant = exporting::ExportQuant::int4;
  o.group_size = 32;
  o.out = dir / "m.h5";
  exporting::export_model(
      exporting::load_export_model(testing::write_synthetic_checkpoint(dir / "run", r)), o);
  const std::vector<int32_t> tokens = testing::random_tokens(33, 5);
  std::unique_ptr<EngineModel> cpu = EngineModel::load(o.out, {});
  std::unique_ptr<EngineModel> gpu = EngineModel::load(o.out, {Device::cuda, DType::f32});
  const std::vector<float> want = testing::engine_logits(*cpu, tokens, {20, 1, 12}, 8);
  EXPECT_LE(testing::max_rel_diff(testing::engine_logits(*gpu, tokens, {20, 1, 12}, 8), want,
                                  want.size()),
            1e-4);
}

// As EngineBatch.ARequestGivesTheSameTokensAloneAndInABatchOf32 (engine_test.cpp), in BF16 on the
// GPU, where a batch-dependent summation order would show at once.
TS_GPU_TEST(EngineBatch, ARequestGivesTheSameTokensAloneAndInABatchOf32) {
  ScratchDir dir;
  const auto m =
      testing::synthetic_model(dir, testing::kEngineQwen3, "", {Device::cuda, DType::bf16});
  std::mt19937 gen(17);
  const std::vector<int32_t> prompt = testing::random_tokens(37, gen);
  const SamplingParams greedy = testing::greedy(24), sampled = testing::sampled(24, 99);
  const std::vector<int32_t> want_g = testing::alone(m, prompt, greedy);
  const std::vector<int32_t> want_s = testing::alone(m, prompt, sampled);
  Engine e(m, testing::small_options(4, 200, 48));
  RequestId id_g = -1, id_s = -1;
  for (int i = 0; i < 32; ++i) {
    if (i == 5) id_g = e.add_request(prompt, greedy);
    if (i == 20) id_s = e.add_request(prompt, sampled);
    if (i == 5 || i == 20) continue;
    const int len = 1 + int(gen() % 40), n = 1 + int(gen() % 30);
    e.add_request(testing::random_tokens(len, gen),
                  i % 2 ? testing::greedy(n) : testing::sampled(n, uint64_t(i)));
  }
  const auto out = testing::run_all(e);
  EXPECT_EQ(out.at(id_g).tokens, want_g);
  EXPECT_EQ(out.at(id_s).tokens, want_s);
}

}  // namespace
}  // namespace tessera
