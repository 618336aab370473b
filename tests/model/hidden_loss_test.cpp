// Distillation's hidden-state term (model/hidden_loss.h) in double precision:
//  * one pair's gradients w.r.t. the student state and the projection against central finite
//    differences, with and without a projection, an ignored row carrying nothing; parameter
//    gradients accumulate over backward calls;
//  * through the whole model: every parameter's gradient of CE + beta * hidden (pairs after the
//    first and after the last block, one projected, one not) against finite differences, so the
//    gradient joins the residual stream at the right block;
//  * beta 0 leaves the model's losses and gradients bit for bit as without pairs.
#include "model/hidden_loss.h"

#include <gtest/gtest.h>

#include <random>

#include "../common/testing.h"
#include "model/transformer.h"
#include "tests/common/tiny_models.h"

namespace tessera {
namespace {

using testing::HostTensor;

// f64 with h = 1e-5: truncation ~h^2 |L'''| and rounding ~1e-16 |L| / h are both far below the
// bound 1e-7 relative + 1e-10 absolute, which any wrong term exceeds by orders of magnitude.
void expect_close(double fd, double analytic, const std::string& what) {
  EXPECT_LE(std::fabs(fd - analytic), 1e-7 * std::max(std::fabs(fd), std::fabs(analytic)) + 1e-10)
      << what << ": fd " << fd << " analytic " << analytic;
}

class HiddenPairGrad : public ::testing::TestWithParam<bool> {};

TEST_P(HiddenPairGrad, StateAndProjectionMatchFiniteDifferences) {
  const bool projected = GetParam();
  const int64_t N = 6, C = 5, Ct = projected ? 7 : 5;
  std::mt19937_64 rng(3);
  HostTensor h_s = testing::randn(DType::f64, {N, C}, rng);
  HostTensor h_t = testing::randn(DType::f64, {N, Ct}, rng);
  HostTensor proj = projected ? testing::randn(DType::f64, {Ct, C}, rng, 0.5) : HostTensor();
  std::vector<int32_t> targets = {1, 4, -1, 0, 2, 3};  // row 2 is ignored
  const int64_t valid = 5;
  HostTensor diff(DType::f64, {N, Ct});
  const auto loss = [&] { return hidden_pair_forward(diff, h_s, h_t, proj, targets, valid); };

  // coef = 1 / (Ct n): the gradients of the loss itself.
  const double l0 = loss();
  EXPECT_GT(l0, 0.0);
  HostTensor dproj = projected ? HostTensor(DType::f64, {Ct, C}) : HostTensor();
  HostTensor d_state(DType::f64, {N, C});
  hidden_pair_backward(diff, dproj, h_s, proj, float(1.0 / double(Ct * valid)));
  hidden_pair_state_grad(d_state, diff, proj);
  // Accumulation: a second forward and backward double the parameter gradient.
  std::vector<double> once = dproj.f64;
  loss();
  HostTensor d_state2(DType::f64, {N, C});
  hidden_pair_backward(diff, dproj, h_s, proj, float(1.0 / double(Ct * valid)));
  hidden_pair_state_grad(d_state2, diff, proj);
  for (size_t i = 0; i < once.size(); ++i) EXPECT_DOUBLE_EQ(dproj.f64[i], 2 * once[i]) << i;
  EXPECT_EQ(d_state2.f64, d_state.f64);
  // The coefficient is a float: compare against its rounding of 1 / (Ct n).
  const double c = double(float(1.0 / double(Ct * valid))) * double(Ct * valid);
  const double h = 1e-5;
  for (int64_t i = 0; i < N * C; ++i) {
    const double x = h_s.f64[i];
    h_s.f64[i] = x + h;
    const double lp = loss();
    h_s.f64[i] = x - h;
    const double lm = loss();
    h_s.f64[i] = x;
    expect_close(c * (lp - lm) / (2 * h), d_state.f64[i], "dh_s[" + std::to_string(i) + "]");
    if (i / C == 2) {
      EXPECT_EQ(d_state.f64[i], 0.0) << "an ignored row got a gradient";
    }
  }
  for (int64_t i = 0; projected && i < Ct * C; ++i) {
    const double x = proj.f64[i];
    proj.f64[i] = x + h;
    const double lp = loss();
    proj.f64[i] = x - h;
    const double lm = loss();
    proj.f64[i] = x;
    expect_close(c * (lp - lm) / (2 * h), once[i], "dproj[" + std::to_string(i) + "]");
  }
  // Without valid targets the term is 0 (and the rows carry nothing).
  EXPECT_EQ(hidden_pair_forward(diff, h_s, h_t, proj, std::vector<int32_t>(N, -1), 0), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Projection, HiddenPairGrad, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "projected" : "same_width"; });

struct Inputs {
  HostTensor tokens, targets;
  std::vector<HostTensor> teachers;  // one (N, Ct) per pair
};

Inputs make_inputs(const ModelConfig& cfg, const std::vector<HiddenPair>& pairs, int B, int T) {
  std::mt19937_64 rng(17);
  Inputs in{testing::randint({B, T}, 0, cfg.vocab_size, rng),
            testing::randint({B, T}, 0, cfg.vocab_size, rng),
            {}};
  in.targets.set(3, -1);  // one ignored target
  for (const HiddenPair& p : pairs)
    in.teachers.push_back(testing::randn(DType::f64, {int64_t(B) * T, p.teacher_hidden}, rng));
  return in;
}

// CE + beta * hidden through the model's pieces, as the pipeline executor runs them.
double total_loss(Transformer& m, Activations& a, const Inputs& in, float beta) {
  m.forward_stage(a, in.tokens);
  double hidden = 0.0;
  if (m.hidden_loss().active()) {
    std::vector<Tensor> teachers(in.teachers.begin(), in.teachers.end());
    hidden = m.hidden_forward(a, in.targets.i32, teachers);
  }
  return m.loss_forward(a, in.targets).total + double(beta) * hidden;
}

TEST(HiddenLossModel, EveryParameterMatchesFiniteDifferences) {
  const ModelConfig cfg = testing::tiny_gpt2();  // 2 blocks, width 16
  ExecOptions exec;
  exec.hidden_pairs = {{1, 3, 8}, {2, 1, 16}};  // after block 1 (projected), after block 2 (not)
  // beta / (pairs Ct valid) = 0.5 / (2 * 8 * 8) and 0.5 / (2 * 16 * 8): the backward's float
  // coefficients are exact, so the f64 gradients carry only f64 rounding.
  const float beta = 0.5f;
  const int B = 3, T = 3;
  Transformer model(cfg, DType::f64, Device::cpu, nullptr, {}, 1, true, exec);
  model.init_weights(5);
  model.hidden_loss().set_weight(beta);
  ASSERT_EQ(model.hidden_loss().local().size(), 2u);
  const int proj = model.hidden_loss().local()[0].proj;
  ASSERT_GE(proj, 0);
  EXPECT_EQ(model.params()[proj].spec.name, "distill.hidden_proj.s1_t3");
  EXPECT_EQ(model.params()[proj].spec.shape, (Shape{8, 16}));
  EXPECT_EQ(model.hidden_loss().local()[1].proj, -1);
  EXPECT_EQ(model.params().num_elements(), cfg.num_params() + 8 * 16);
  Activations acts(model, B, T, true);
  const Inputs in = make_inputs(cfg, exec.hidden_pairs, B, T);
  model.params().zero_grad();
  total_loss(model, acts, in, beta);
  model.backward_stage(acts, in.tokens, in.targets, 1.0f);

  const double h = 1e-5;
  for (Param& p : model.params().all()) {
    const int64_t n = p.value.numel();
    double* w = p.value.ptr<double>();
    const double* g = p.grad.ptr<double>();
    const int64_t stride = std::max<int64_t>(1, n / 16);
    for (int64_t i = 0; i < n; i += stride) {
      const double w0 = w[i];
      w[i] = w0 + h;
      const double lp = total_loss(model, acts, in, beta);
      w[i] = w0 - h;
      const double lm = total_loss(model, acts, in, beta);
      w[i] = w0;
      // The bound of tests/model/model_grad_test.cpp.
      const double fd = (lp - lm) / (2 * h);
      EXPECT_LE(std::fabs(fd - g[i]), 1e-6 * std::max(std::fabs(fd), std::fabs(g[i])) + 1e-9)
          << p.spec.name << "[" << i << "] fd " << fd << " analytic " << g[i];
    }
  }
}

TEST(HiddenLossModel, BetaZeroIsBitForBitWithoutPairs) {
  const ModelConfig cfg = testing::tiny_gpt2();
  const int B = 2, T = 4;
  std::vector<std::vector<float>> grads[2];
  double losses[2];
  for (int r = 0; r < 2; ++r) {
    ExecOptions exec;
    if (r == 1) exec.hidden_pairs = {{1, 2, 24}};
    Transformer model(cfg, DType::f32, Device::cpu, nullptr, {}, 1, true, exec);
    model.init_weights(5);
    model.hidden_loss().set_weight(0.0f);
    EXPECT_FALSE(model.hidden_loss().active());
    Activations acts(model, B, T, true);
    const Inputs in = make_inputs(cfg, {}, B, T);
    model.params().zero_grad();
    losses[r] = total_loss(model, acts, in, 0.0f);
    model.backward_stage(acts, in.tokens, in.targets, 1.0f);
    for (const Param& p : model.params().all())
      grads[r].emplace_back(p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel());
  }
  EXPECT_EQ(losses[0], losses[1]);
  ASSERT_EQ(grads[1].size(), grads[0].size() + 1);  // the projection, declared last
  for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_EQ(grads[0][i], grads[1][i]) << "param " << i;
  for (float g : grads[1].back()) EXPECT_EQ(g, 0.0f);
}

}  // namespace
}  // namespace tessera
