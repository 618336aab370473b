// Whole-model gradient checks in double precision for a tiny model of each family, dense and MoE:
// every parameter's analytic gradient against central finite differences of the mean loss (plus
// the MoE layers' aux and z losses); activation recomputation gives bitwise-identical gradients;
// gradients accumulate across backward calls.
#include <gtest/gtest.h>

#include <random>

#include "../common/testing.h"
#include "model/transformer.h"
#include "tests/common/tiny_models.h"

namespace tessera {
namespace {

using testing::HostTensor;

struct Batch {
  HostTensor tokens, targets;
};

Batch make_batch(const ModelConfig& c, int B, int T, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Batch b{testing::randint({B, T}, 0, c.vocab_size, rng),
          testing::randint({B, T}, 0, c.vocab_size, rng)};
  b.targets.set(1, -1);  // one ignored target
  return b;
}

class ModelGrad : public ::testing::TestWithParam<const char*> {
 protected:
  ModelConfig config() const {
    const std::string name = GetParam();
    if (name == "gpt2_moe") return testing::tiny_gpt2_moe();
    if (name == "llama_moe") return testing::tiny_llama_moe();
    return name == "gpt2" ? testing::tiny_gpt2() : testing::tiny_llama();
  }
};

TEST_P(ModelGrad, EveryParameterMatchesFiniteDifferences) {
  const ModelConfig cfg = config();
  const int B = 2, T = 5;
  Transformer model(cfg, DType::f64, Device::cpu);
  model.init_weights(7);
  Activations acts(model, B, T, true);
  Batch batch = make_batch(cfg, B, T, 11);
  model.params().zero_grad();
  model.forward(acts, batch.tokens, batch.targets);
  model.backward(acts, batch.tokens, batch.targets, 1.0f);

  // f64 arithmetic with h = 1e-5: the FD truncation error is ~h^2 |L'(3)| ~ 1e-10 and the rounding
  // error ~1e-16 |L| / h ~ 3e-11, both absolute. So we allow 1e-6 relative plus 1e-9 absolute:
  // any wrong term in a backward moves a gradient by far more, while round-off never does.
  for (Param& p : model.params().all()) {
    const int64_t n = p.value.numel();
    double* w = p.value.ptr<double>();
    const double* g = p.grad.ptr<double>();
    const int64_t stride = std::max<int64_t>(1, n / 24);
    for (int64_t i = 0; i < n; i += stride) {
      const double w0 = w[i], h = 1e-5;
      w[i] = w0 + h;
      const double lp = model.forward(acts, batch.tokens, batch.targets) + model.moe_losses(acts);
      w[i] = w0 - h;
      const double lm = model.forward(acts, batch.tokens, batch.targets) + model.moe_losses(acts);
      w[i] = w0;
      const double fd = (lp - lm) / (2 * h);
      const double bound = 1e-6 * std::max(std::fabs(fd), std::fabs(g[i])) + 1e-9;
      EXPECT_LE(std::fabs(fd - g[i]), bound)
          << p.spec.name << "[" << i << "] fd=" << fd << " analytic=" << g[i];
    }
  }
}

TEST_P(ModelGrad, RecomputationIsBitwiseIdentical) {
  ModelConfig cfg = config();
  const int B = 2, T = 6;
  Batch batch = make_batch(cfg, B, T, 3);
  std::vector<std::vector<float>> grads[2];
  double losses[2];
  for (int r = 0; r < 2; ++r) {
    ExecOptions exec;
    exec.recompute = r == 1;
    Transformer model(cfg, DType::f32, Device::cpu, nullptr, {}, 1, true, exec);
    model.init_weights(5);
    Activations acts(model, B, T, true);
    model.params().zero_grad();
    losses[r] = model.forward(acts, batch.tokens.t, batch.targets.t);
    model.backward(acts, batch.tokens, batch.targets, 1.0f);
    for (const Param& p : model.params().all())
      grads[r].emplace_back(p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel());
  }
  EXPECT_EQ(losses[0], losses[1]);
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_EQ(grads[0][i], grads[1][i]) << "param " << i;
}

TEST_P(ModelGrad, ParameterGradientsAccumulate) {
  const ModelConfig cfg = config();
  const int B = 1, T = 4;
  Transformer model(cfg, DType::f64, Device::cpu);
  model.init_weights(9);
  Activations acts(model, B, T, true);
  Batch batch = make_batch(cfg, B, T, 5);
  model.params().zero_grad();
  model.forward(acts, batch.tokens, batch.targets);
  model.backward(acts, batch.tokens, batch.targets, 1.0f);
  const Tensor g = model.params().flat_grads();
  std::vector<double> once(g.ptr<double>(), g.ptr<double>() + g.numel());
  model.forward(acts, batch.tokens, batch.targets);
  model.backward(acts, batch.tokens, batch.targets, 1.0f);
  for (int64_t i = 0; i < g.numel(); ++i) EXPECT_DOUBLE_EQ(g.ptr<double>()[i], 2 * once[i]) << i;
}

TEST_P(ModelGrad, ParameterCountMatchesConfig) {
  const ModelConfig cfg = config();
  Transformer model(cfg, DType::f32, Device::cpu);
  EXPECT_EQ(model.params().num_elements(), cfg.num_params());
}

INSTANTIATE_TEST_SUITE_P(Families, ModelGrad,
                         ::testing::Values("gpt2", "llama", "gpt2_moe", "llama_moe"));

}  // namespace
}  // namespace tessera
