// adamw_update: one and ten steps against the contract's formula evaluated by hand in double,
// f32 against that formula, the sign-like first step, decoupled weight decay alone, grad_scale,
// NaN confinement and precondition checks.
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

struct AdamState {
  HostTensor param, m, v;
};

// The formula of kernels/ops.h in double, written the textbook way (not torch's operation order):
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (mhat / (sqrt(vhat) + eps) + wd p).
void reference_step(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v,
                    const HostTensor& grad, const ops::AdamWStep& s) {
  const double b1 = s.beta1, b2 = s.beta2, lr = s.lr, wd = s.weight_decay, eps = s.eps;
  for (size_t i = 0; i < p.size(); ++i) {
    const double g = grad.get(int64_t(i)) * double(s.grad_scale);
    m[i] = b1 * m[i] + (1 - b1) * g;
    v[i] = b2 * v[i] + (1 - b2) * g * g;
    const double mhat = m[i] / (1 - std::pow(b1, s.step));
    const double vhat = v[i] / (1 - std::pow(b2, s.step));
    p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p[i]);
  }
}

std::vector<double> values(const HostTensor& h) {
  std::vector<double> out(h.size());
  for (int64_t i = 0; i < h.size(); ++i) out[i] = h.get(i);
  return out;
}

void expect_matches(const HostTensor& h, const std::vector<double>& ref, double rtol, double atol,
                    const char* what) {
  HostTensor r(DType::f64, h.t.shape);
  for (int64_t i = 0; i < r.size(); ++i) r.set(i, ref[i]);
  expect_close(h, r, rtol, atol, what);
}

// Runs num_steps updates with fresh random gradients on `state` and on the double reference that
// starts from the same values, then compares param, m and v.
void run_against_reference(DType dtype, int num_steps, float weight_decay, float grad_scale,
                           double rtol, double atol) {
  std::mt19937_64 rng(71);
  const Shape shape{3, 41};
  AdamState st{randn(dtype, shape, rng), HostTensor(dtype, shape), HostTensor(dtype, shape)};
  std::vector<double> p = values(st.param), m(p.size(), 0.0), v(p.size(), 0.0);
  ops::AdamWStep s;
  s.lr = 0.01f;
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = weight_decay;
  s.grad_scale = grad_scale;
  for (int step = 1; step <= num_steps; ++step) {
    s.step = step;
    const HostTensor grad = randn(dtype, shape, rng, 0.1);
    cpu::adamw_update(st.param, grad, st.m, st.v, s);
    reference_step(p, m, v, grad, s);
  }
  expect_matches(st.param, p, rtol, atol, "param");
  expect_matches(st.m, m, rtol, atol, "m");
  expect_matches(st.v, v, rtol, atol * atol, "v");
}

// f64: the kernel follows torch's operation order, the reference the textbook one; they are equal
// in exact arithmetic, so only rounding separates them (~1e-16 per operation, a few dozen
// operations per step, ten steps): 1e-12 relative is a generous yet meaningful bound.
TEST(AdamW, F64OneStepMatchesFormula) {
  run_against_reference(DType::f64, 1, 0.0f, 1.0f, 1e-12, 1e-15);
  run_against_reference(DType::f64, 1, 0.1f, 1.0f, 1e-12, 1e-15);
}

TEST(AdamW, F64TenStepsMatchFormula) {
  run_against_reference(DType::f64, 10, 0.0f, 1.0f, 1e-12, 1e-15);
  run_against_reference(DType::f64, 10, 0.05f, 0.5f, 1e-12, 1e-15);
}

// f32: each step rounds p, m, v a few times (2^-24 relative each); after ten steps p (O(1)) is
// within ~20 f32 ulps, and m, v within a few ulps of their own size.
TEST(AdamW, F32TenStepsMatchFormula) {
  run_against_reference(DType::f32, 10, 0.05f, 0.5f, 2e-6, 1e-6);
}

TEST(AdamW, FirstStepMovesByLearningRateTimesSign) {
  // With m = v = 0, mhat = g and vhat = g^2, so the step is lr g / (|g| + eps) ~ lr sign(g).
  HostTensor param = filled(DType::f64, {4}, 1.0), m(DType::f64, {4}), v(DType::f64, {4});
  HostTensor grad(DType::f64, {4});
  const double gs[] = {0.3, -2.0, 1e-3, -5e-4};
  for (int i = 0; i < 4; ++i) grad.set(i, gs[i]);
  ops::AdamWStep s;
  s.lr = 0.125f;
  cpu::adamw_update(param, grad, m, v, s);
  const double eps = s.eps;
  for (int i = 0; i < 4; ++i) {
    const double sign = gs[i] > 0 ? 1.0 : -1.0;
    EXPECT_NEAR(param.get(i), 1.0 - 0.125 * gs[i] / (std::fabs(gs[i]) + eps), 1e-15);
    EXPECT_NEAR(param.get(i), 1.0 - 0.125 * sign, 1e-4 * 0.125) << "element " << i;
  }
}

TEST(AdamW, WeightDecayAloneScalesParameters) {
  // Zero gradient and state: the Adam part is exactly 0, leaving p (1 - lr wd), in f32 math.
  std::mt19937_64 rng(72);
  for (float wd : {0.0f, 0.1f}) {
    HostTensor param = randn(DType::f32, {50}, rng), m(DType::f32, {50}), v(DType::f32, {50});
    const HostTensor before = param, grad(DType::f32, {50});
    ops::AdamWStep s;
    s.lr = 0.01f;
    s.weight_decay = wd;
    s.step = 3;
    cpu::adamw_update(param, grad, m, v, s);
    const float factor = float(1.0 - double(s.lr) * double(wd));
    for (int64_t i = 0; i < 50; ++i)
      EXPECT_EQ(param.get(i), double(before.f32[i] * factor)) << "wd " << wd << " element " << i;
  }
}

TEST(AdamW, GradScaleMultipliesTheGradient) {
  // grad g with scale 0.25 must equal grad g/4 with scale 1, bitwise (the scaling is exact).
  std::mt19937_64 rng(73);
  for (DType dtype : {DType::f32, DType::f64}) {
    const HostTensor param = randn(dtype, {30}, rng), grad = randn(dtype, {30}, rng);
    HostTensor quarter = grad;
    for (int64_t i = 0; i < 30; ++i) quarter.set(i, grad.get(i) * 0.25);
    AdamState a{param, HostTensor(dtype, {30}), HostTensor(dtype, {30})}, b = a;
    ops::AdamWStep s;
    s.lr = 0.01f;
    s.weight_decay = 0.1f;
    s.grad_scale = 0.25f;
    cpu::adamw_update(a.param, grad, a.m, a.v, s);
    s.grad_scale = 1.0f;
    cpu::adamw_update(b.param, quarter, b.m, b.v, s);
    expect_identical(a.param, b.param, "param");
    expect_identical(a.m, b.m, "m");
    expect_identical(a.v, b.v, "v");
  }
}

TEST(AdamW, NaNGradientStaysInItsElement) {
  std::mt19937_64 rng(74);
  HostTensor param = randn(DType::f32, {8}, rng), grad = randn(DType::f32, {8}, rng);
  HostTensor m(DType::f32, {8}), v(DType::f32, {8});
  grad.set(3, kNaN);
  cpu::adamw_update(param, grad, m, v, ops::AdamWStep{});
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(std::isnan(param.get(i)), i == 3) << "element " << i;
  EXPECT_TRUE(std::isnan(m.get(3)) && std::isnan(v.get(3)));
}

TEST(AdamW, RejectsBadArguments) {
  HostTensor param(DType::f32, {4}), grad(DType::f32, {4}), m(DType::f32, {4}), v(DType::f32, {4});
  ops::AdamWStep s;
  s.step = 0;
  EXPECT_THROW(cpu::adamw_update(param, grad, m, v, s), Error);
  s.step = 1;
  HostTensor short_v(DType::f32, {3}), grad64(DType::f64, {4});
  EXPECT_THROW(cpu::adamw_update(param, grad, m, short_v, s), Error);
  EXPECT_THROW(cpu::adamw_update(param, grad64, m, v, s), Error);
}

}  // namespace
}  // namespace tessera::testing
