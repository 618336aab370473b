// gelu (tanh approximation) and swiglu: forward values, finite-difference gradients in f64,
// in-place aliasing, limits at large |x| (no NaN from overflow), NaN propagation, f32 vs f64.
// Shape letters: N rows, F FFN width.
#include <cmath>
#include <random>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

TEST(Gelu, ForwardMatchesTanhApproximation) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) evaluated independently (Python, double).
  const double xs[] = {-3.0, -0.5, 0.0, 1.0, 2.5};
  const double ys[] = {-0.0036373920817729943, -0.15428599017485606, 0.0, 0.8411919906082768,
                       2.484915733910001};
  HostTensor inp(DType::f64, {5}), out(DType::f64, {5});
  for (int i = 0; i < 5; ++i) inp.set(i, xs[i]);
  cpu::gelu_forward(out, inp);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(out.get(i), ys[i], 1e-15) << "x = " << xs[i];
}

TEST(Gelu, LimitsAndNaN) {
  HostTensor inp(DType::f32, {4}), out(DType::f32, {4});
  const double xs[] = {1e4, -1e4, kNaN, 30.0};
  for (int i = 0; i < 4; ++i) inp.set(i, xs[i]);
  cpu::gelu_forward(out, inp);
  EXPECT_EQ(out.get(0), 1e4);
  EXPECT_EQ(out.get(1), 0.0);
  EXPECT_TRUE(std::isnan(out.get(2)));
  EXPECT_EQ(out.get(3), 30.0);
  HostTensor dout = filled(DType::f32, {4}, 1.0), dinp(DType::f32, {4});
  cpu::gelu_backward(dinp, dout, inp);
  EXPECT_EQ(dinp.get(0), 1.0);
  EXPECT_EQ(dinp.get(1), 0.0);
  EXPECT_TRUE(std::isnan(dinp.get(2)));
}

// Error budget of the finite differences: kFdStep and kFdTol in kernels_a_util.h.
TEST(Gelu, GradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(51);
  for (const Shape& shape : {Shape{1}, Shape{3, 1025}, Shape{2, 3, 5}}) {
    HostTensor inp = randn(DType::f64, shape, rng, 2.0), out(DType::f64, shape);
    const HostTensor dout = randn(DType::f64, shape, rng);
    HostTensor dinp(DType::f64, shape);
    cpu::gelu_backward(dinp, dout, inp);
    const auto loss = fd_loss(dout, out, [&] { cpu::gelu_forward(out, inp); });
    expect_grad_matches(inp, dinp, loss, kFdTol, "gelu dinp", kFdStep);
  }
}

TEST(Gelu, InPlaceMatchesOutOfPlace) {
  std::mt19937_64 rng(52);
  HostTensor inp = randn(DType::f32, {7, 9}, rng), out(DType::f32, {7, 9});
  const HostTensor dout = randn(DType::f32, {7, 9}, rng);
  HostTensor dinp(DType::f32, {7, 9});
  cpu::gelu_forward(out, inp);
  cpu::gelu_backward(dinp, dout, inp);
  HostTensor in_place = inp, grad_in_place = dout;
  cpu::gelu_backward(grad_in_place, grad_in_place, inp);  // dinp aliases dout
  cpu::gelu_forward(in_place, in_place);                  // out aliases inp
  expect_identical(in_place, out, "gelu out aliasing inp");
  expect_identical(grad_in_place, dinp, "gelu dinp aliasing dout");
}

// f32 against f64 on identical inputs: both evaluate in double and round once, so results differ
// only by that final f32 rounding (<= 2^-24 relative).
TEST(Gelu, F32AgreesWithF64) {
  std::mt19937_64 rng(53);
  HostTensor inp32 = randn(DType::f32, {1000}, rng, 3.0), out32(DType::f32, {1000});
  HostTensor out64(DType::f64, {1000});
  cpu::gelu_forward(out32, inp32);
  cpu::gelu_forward(out64, to_dtype(inp32, DType::f64));
  expect_close(out32, out64, 1e-7, 1e-30, "gelu f32 vs f64");
}

TEST(Swiglu, ForwardValuesAndLimits) {
  HostTensor gate(DType::f64, {5}), up(DType::f64, {5}), out(DType::f64, {5});
  const double gs[] = {0.0, 1.0, -2.0, -1000.0, 1000.0};
  const double us[] = {3.0, 2.0, 0.5, 7.0, -1.5};
  for (int i = 0; i < 5; ++i) {
    gate.set(i, gs[i]);
    up.set(i, us[i]);
  }
  cpu::swiglu_forward(out, gate, up);
  EXPECT_EQ(out.get(0), 0.0);
  EXPECT_NEAR(out.get(1), 2.0 / (1.0 + std::exp(-1.0)), 1e-15);
  EXPECT_NEAR(out.get(2), 0.5 * -2.0 / (1.0 + std::exp(2.0)), 1e-15);
  EXPECT_EQ(out.get(3), 0.0);  // silu(-1000) underflows to -0, not NaN
  EXPECT_EQ(out.get(4), -1500.0);
}

// Smooth in both arguments; error budget as for gelu (kernels_a_util.h).
TEST(Swiglu, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(54);
  for (const Shape& shape : {Shape{1, 1}, Shape{4, 257}, Shape{2, 3, 6}}) {
    HostTensor gate = randn(DType::f64, shape, rng, 2.0), up = randn(DType::f64, shape, rng);
    HostTensor out(DType::f64, shape), dgate(DType::f64, shape), dup(DType::f64, shape);
    const HostTensor dout = randn(DType::f64, shape, rng);
    cpu::swiglu_backward(dgate, dup, dout, gate, up);
    const auto loss = fd_loss(dout, out, [&] { cpu::swiglu_forward(out, gate, up); });
    expect_grad_matches(gate, dgate, loss, kFdTol, "dgate", kFdStep);
    expect_grad_matches(up, dup, loss, kFdTol, "dup", kFdStep);
  }
}

TEST(Swiglu, NaNPropagatesElementwise) {
  std::mt19937_64 rng(55);
  HostTensor gate = randn(DType::f32, {3, 4}, rng), up = randn(DType::f32, {3, 4}, rng);
  gate.set(5, kNaN);
  up.set(9, kNaN);
  HostTensor out(DType::f32, {3, 4});
  cpu::swiglu_forward(out, gate, up);
  for (int64_t i = 0; i < 12; ++i)
    EXPECT_EQ(std::isnan(out.get(i)), i == 5 || i == 9) << "element " << i;
}

TEST(Swiglu, F32AgreesWithF64) {
  std::mt19937_64 rng(56);
  const HostTensor gate32 = randn(DType::f32, {8, 125}, rng, 3.0);
  const HostTensor up32 = randn(DType::f32, {8, 125}, rng);
  HostTensor out32(DType::f32, {8, 125}), out64(DType::f64, {8, 125});
  cpu::swiglu_forward(out32, gate32, up32);
  cpu::swiglu_forward(out64, to_dtype(gate32, DType::f64), to_dtype(up32, DType::f64));
  expect_close(out32, out64, 1e-7, 1e-30, "swiglu f32 vs f64");
}

TEST(Swiglu, RejectsMismatchedShapes) {
  HostTensor gate(DType::f32, {2, 3}), up(DType::f32, {3, 2}), out(DType::f32, {2, 3});
  EXPECT_THROW(cpu::swiglu_forward(out, gate, up), Error);
  HostTensor up64(DType::f64, {2, 3});
  EXPECT_THROW(cpu::swiglu_forward(out, gate, up64), Error);
}

}  // namespace
}  // namespace tessera::testing
