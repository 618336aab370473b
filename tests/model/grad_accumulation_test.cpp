// FP32 gradients under 16-bit compute (ExecOptions::fp32_grads, precision.grad_reduce: fp32):
// 16 micro-batches of a bf16 model accumulate into an f32 gradient without rounding it, so the
// result equals the double-precision sum of each micro-batch's own gradient to float precision,
// while a bf16 gradient, rounded after every micro-batch, drifts from it by orders of magnitude
// more. The memory cost is 2 more bytes per parameter.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/transformer.h"
#include "tests/common/tiny_models.h"

namespace tessera {
namespace {

constexpr int kB = 2, kT = 8, kMicro = 16;

struct Tokens {
  std::vector<int32_t> inputs, targets;
  Tensor in() { return Tensor(inputs.data(), DType::i32, Device::cpu, {kB, kT}); }
  Tensor tg() { return Tensor(targets.data(), DType::i32, Device::cpu, {kB, kT}); }
};
Tokens micro_batch(const ModelConfig& cfg, int m) {
  std::mt19937 rng(m);
  Tokens t{std::vector<int32_t>(kB * kT), std::vector<int32_t>(kB * kT)};
  for (int i = 0; i < kB * kT; ++i) {
    t.inputs[i] = int32_t(rng() % cfg.vocab_size);
    t.targets[i] = int32_t(rng() % cfg.vocab_size);
  }
  return t;
}

std::vector<double> flat_grads(const Transformer& model) {
  const Tensor g = model.params().flat_grads();
  std::vector<float> f(g.numel());
  convert_buffer(g.data, g.dtype, f.data(), DType::f32, g.numel());
  return {f.begin(), f.end()};
}

// The bf16 model's accumulated gradient over kMicro micro-batches (loss scale 1/kMicro).
std::vector<double> accumulated(const ModelConfig& cfg, bool fp32_grads, DType* grad_dtype) {
  ExecOptions exec;
  exec.fp32_grads = fp32_grads;
  Transformer model(cfg, DType::bf16, Device::cpu, nullptr, {}, 1, true, exec);
  model.init_weights(5);
  *grad_dtype = model.params().grad_dtype();
  Activations acts(model, kB, kT, true);
  model.params().zero_grad();
  for (int m = 0; m < kMicro; ++m) {
    Tokens t = micro_batch(cfg, m);
    model.forward(acts, t.in(), t.tg());
    model.backward(acts, t.in(), t.tg(), 1.0f / kMicro);
  }
  return flat_grads(model);
}

// Each micro-batch's gradient on its own (f32, from zero), summed in double.
std::vector<double> summed_alone(const ModelConfig& cfg) {
  ExecOptions exec;
  exec.fp32_grads = true;
  Transformer model(cfg, DType::bf16, Device::cpu, nullptr, {}, 1, true, exec);
  model.init_weights(5);
  Activations acts(model, kB, kT, true);
  std::vector<double> sum(model.params().padded_num_elements(), 0.0);
  for (int m = 0; m < kMicro; ++m) {
    model.params().zero_grad();
    Tokens t = micro_batch(cfg, m);
    model.forward(acts, t.in(), t.tg());
    model.backward(acts, t.in(), t.tg(), 1.0f / kMicro);
    const std::vector<double> g = flat_grads(model);
    for (size_t i = 0; i < g.size(); ++i) sum[i] += g[i];
  }
  return sum;
}

double rel_error(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

class GradAccumulation : public ::testing::TestWithParam<const char*> {};

TEST_P(GradAccumulation, Fp32GradientsAccumulateWithoutRounding) {
  const ModelConfig cfg =
      std::string(GetParam()) == "gpt2" ? testing::tiny_gpt2() : testing::tiny_llama();
  const std::vector<double> ref = summed_alone(cfg);
  DType f32_dtype, b16_dtype;
  const double f32_err = rel_error(accumulated(cfg, true, &f32_dtype), ref);
  const double b16_err = rel_error(accumulated(cfg, false, &b16_dtype), ref);
  EXPECT_EQ(f32_dtype, DType::f32);
  EXPECT_EQ(b16_dtype, DType::bf16);
  // f32 sums of 16 terms: a few ulps; bf16 (8 significant bits) after every micro-batch: ~1e-3.
  EXPECT_LT(f32_err, 1e-6) << "bf16 gradients: " << b16_err;
  EXPECT_GT(b16_err, 100 * f32_err);
  std::printf("%s: relative error of the accumulated gradient, f32 %.2e, bf16 %.2e\n", GetParam(),
              f32_err, b16_err);
}

TEST(GradAccumulation, Fp32GradientsCostTwoBytesPerParameter) {
  const ModelConfig cfg = testing::tiny_gpt2();
  const ModelShard whole;
  const int64_t n = Transformer::local_num_params(cfg, whole);
  const size_t with = Transformer::param_bytes(cfg, whole, DType::bf16, 1, true, true);
  const size_t without = Transformer::param_bytes(cfg, whole, DType::bf16, 1, true, false);
  // Up to one alignment unit either way (each buffer is rounded up to Arena::kAlign bytes).
  EXPECT_LT(std::abs(double(with - without) - double(2 * n)), double(Arena::kAlign));
  // No change under f32 compute: the gradients are f32 already.
  EXPECT_EQ(Transformer::param_bytes(cfg, whole, DType::f32, 1, true, true),
            Transformer::param_bytes(cfg, whole, DType::f32, 1, true, false));
}

INSTANTIATE_TEST_SUITE_P(Families, GradAccumulation, ::testing::Values("gpt2", "llama"));

}  // namespace
}  // namespace tessera
