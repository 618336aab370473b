// rmsnorm_forward / rmsnorm_backward: forward against the formula, finite-difference gradients in
// f64 (C = 1, awkward C = 1025, batch 1, a QK-norm shaped input), accumulation of dweight, NaN
// confinement to its row, f32 against f64, and precondition checks.
// Shape letters: N rows, C channels (B, T, H, D for the per-head case).
#include <cmath>
#include <random>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

constexpr float kEps = 1e-6f;

struct RmsNormCase {
  HostTensor inp, weight, out, rstd;  // (..., C), (C), (..., C), (N)
};

RmsNormCase make_case(DType dtype, Shape inp_shape, std::mt19937_64& rng, DType stat_dtype) {
  RmsNormCase r;
  const int64_t num_c = inp_shape[-1];
  r.inp = randn(dtype, inp_shape, rng, 1.5);
  r.weight = randn(dtype, {num_c}, rng);
  r.out = HostTensor(dtype, inp_shape);
  r.rstd = HostTensor(stat_dtype, {r.inp.size() / num_c});
  return r;
}

void forward(RmsNormCase& r) { cpu::rmsnorm_forward(r.out, r.rstd, r.inp, r.weight, kEps); }

TEST(RmsNorm, ForwardMatchesFormula) {
  std::mt19937_64 rng(31);
  RmsNormCase r = make_case(DType::f64, {2, 3, 4, 16}, rng, DType::f64);  // (B, T, H, D)
  forward(r);
  const int64_t num_c = 16;
  for (int64_t row = 0; row < 24; ++row) {
    double mean_sq = 0.0;
    for (int64_t c = 0; c < num_c; ++c) mean_sq += std::pow(r.inp.get(row * num_c + c), 2) / num_c;
    const double rstd = 1.0 / std::sqrt(mean_sq + kEps);
    EXPECT_NEAR(r.rstd.get(row), rstd, 1e-12 * rstd);
    for (int64_t c = 0; c < num_c; ++c)
      EXPECT_NEAR(r.out.get(row * num_c + c), r.inp.get(row * num_c + c) * rstd * r.weight.get(c),
                  1e-12);
  }
}

// Finite differences in f64; the error budget (step and tolerance) is in kernels_a_util.h.
TEST(RmsNorm, GradientsMatchFiniteDifferences) {
  const Shape shapes[] = {{1, 1}, {2, 3, 7}, {1, 1, 1025}, {2, 2, 3, 8}, {4, 2}};
  std::mt19937_64 rng(32);
  for (const Shape& shape : shapes) {
    RmsNormCase r = make_case(DType::f64, shape, rng, DType::f64);
    forward(r);
    const HostTensor dout = randn(DType::f64, shape, rng);
    HostTensor dinp(DType::f64, shape), dweight(DType::f64, {shape[-1]});
    cpu::rmsnorm_backward(dinp, dweight, dout, r.inp, r.weight, r.rstd);
    RmsNormCase scratch = r;
    const auto loss = fd_loss(dout, scratch.out, [&] {
      cpu::rmsnorm_forward(scratch.out, scratch.rstd, r.inp, r.weight, kEps);
    });
    SCOPED_TRACE("shape " + shape.str());
    expect_grad_matches(r.inp, dinp, loss, kFdTol, "dinp", kFdStep);
    expect_grad_matches(r.weight, dweight, loss, kFdTol, "dweight", kFdStep);
  }
}

TEST(RmsNorm, BackwardAccumulatesWeightAndOverwritesInput) {
  std::mt19937_64 rng(33);
  RmsNormCase r = make_case(DType::f64, {5, 12}, rng, DType::f64);
  forward(r);
  const HostTensor dout = randn(DType::f64, {5, 12}, rng);
  HostTensor dinp = filled(DType::f64, {5, 12}, kNaN), dweight(DType::f64, {12});
  cpu::rmsnorm_backward(dinp, dweight, dout, r.inp, r.weight, r.rstd);
  const HostTensor dinp1 = dinp, dweight1 = dweight;
  cpu::rmsnorm_backward(dinp, dweight, dout, r.inp, r.weight, r.rstd);
  expect_identical(dinp, dinp1, "dinp after two calls");
  for (int64_t c = 0; c < 12; ++c) EXPECT_EQ(dweight.get(c), 2 * dweight1.get(c));
}

TEST(RmsNorm, NaNStaysInItsRow) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(34);
    RmsNormCase r = make_case(dtype, {3, 5}, rng, DType::f32);
    r.inp.set(2 * 5 + 0, kNaN);
    forward(r);
    for (int64_t row = 0; row < 3; ++row)
      EXPECT_EQ(count_nan(r.out, row * 5, row * 5 + 5), row == 2 ? 5 : 0) << "row " << row;
  }
}

// f32 against f64 on identical inputs: each output is rounded once from a double computation;
// rstd saved in f32 adds 6e-8 relative in backward. Magnitudes are O(10), so 1e-5 relative and
// 1e-5 absolute is a few dozen f32 ulps.
TEST(RmsNorm, F32AgreesWithF64) {
  std::mt19937_64 rng(35);
  RmsNormCase r32 = make_case(DType::f32, {7, 257}, rng, DType::f32);
  RmsNormCase r64{to_dtype(r32.inp, DType::f64), to_dtype(r32.weight, DType::f64),
                  HostTensor(DType::f64, {7, 257}), HostTensor(DType::f64, {7})};
  forward(r32);
  forward(r64);
  expect_close(r32.out, r64.out, 1e-6, 1e-6, "rmsnorm out");
  const HostTensor dout32 = randn(DType::f32, {7, 257}, rng);
  HostTensor dinp32(DType::f32, {7, 257}), dw32(DType::f32, {257});
  HostTensor dinp64(DType::f64, {7, 257}), dw64(DType::f64, {257});
  cpu::rmsnorm_backward(dinp32, dw32, dout32, r32.inp, r32.weight, r32.rstd);
  cpu::rmsnorm_backward(dinp64, dw64, to_dtype(dout32, DType::f64), r64.inp, r64.weight, r64.rstd);
  expect_close(dinp32, dinp64, 1e-5, 1e-5, "rmsnorm dinp");
  expect_close(dw32, dw64, 1e-5, 1e-5, "rmsnorm dweight");
}

TEST(RmsNorm, RejectsBadOperands) {
  std::mt19937_64 rng(36);
  RmsNormCase r = make_case(DType::f32, {4, 8}, rng, DType::f32);
  HostTensor wrong_out(DType::f32, {8, 4});
  EXPECT_THROW(cpu::rmsnorm_forward(wrong_out, r.rstd, r.inp, r.weight, kEps), Error);
  HostTensor short_rstd(DType::f32, {2});
  EXPECT_THROW(cpu::rmsnorm_forward(r.out, short_rstd, r.inp, r.weight, kEps), Error);
  HostTensor dinp(DType::f32, {4, 8}), dweight(DType::f64, {8});
  EXPECT_THROW(cpu::rmsnorm_backward(dinp, dweight, r.out, r.inp, r.weight, r.rstd), Error);
}

}  // namespace
}  // namespace tessera::testing
