// Tests of gelu_forward / gelu_backward (tanh approximation; kernels/cpu/gelu.cpp,
// kernels/cuda/gelu.cu): forward values, finite-difference gradients in f64, in-place aliasing,
// limits at large |x| (no NaN from overflow), NaN propagation, f32 vs f64, bf16/f16 on the CPU,
// bounds and thread counts, and GPU parity (f32, bf16, f16; awkward sizes, NaN/Inf agreement, in
// place).
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

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

// Error budget of the finite differences: kFdStep and kFdTol in tests/common/tensors.h.
TS_FD_TEST(Gelu, GradientMatchesFiniteDifferences, "gelu_forward", "gelu_backward") {
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

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Gelu) {
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 100 : 70;
      const std::string tag = specials ? " with NaN/Inf" : "";
      OpRun r = expect_contract(
          "gelu_forward" + tag, dt, {narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_forward(t[0], t[1]); }, seed, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));  // gelu(NaN)
        EXPECT_EQ(at(r, dt, 0, 1), kInf);          // gelu(+Inf) = +Inf
      }
      r = expect_contract(
          "gelu_forward in place" + tag, dt, {narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_forward(t[0], t[0]); }, seed + 1, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
      }
      expect_contract(
          "gelu_backward" + tag, dt, {narrow(s), narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_backward(t[0], t[1], t[2]); }, seed + 2, specials);
      expect_contract(
          "gelu_backward dinp aliasing dout" + tag, dt, {narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_backward(t[0], t[0], t[1]); }, seed + 3, specials);
    }
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Gelu, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(57);
  const HostTensor inp = randn(DType::f32, {10, 23}, rng), dout = randn(DType::f32, {10, 23}, rng);
  Guarded out({10, 23}), dinp({10, 23});
  cpu::gelu_forward(out, inp);
  cpu::gelu_backward(dinp, dout, inp);
  expect_guards_intact({&out, &dinp}, "gelu");
}

TEST(Gelu, IsThreadCountIndependent) {
  std::mt19937_64 rng(58);
  const HostTensor inp = randn(DType::f32, {300, 200}, rng, 3.0);
  const HostTensor dout = randn(DType::f32, {300, 200}, rng);
  HostTensor out(DType::f32, {300, 200}), dinp(DType::f32, {300, 200});
  expect_thread_independent("gelu_forward", {&out}, [&] { cpu::gelu_forward(out, inp); });
  expect_thread_independent("gelu_backward", {&dinp}, [&] { cpu::gelu_backward(dinp, dout, inp); });
}

// ---- GPU parity (kernels/cuda/gelu.cu) ----------------------------------------------------------

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// f32: tanhf/expf are within 2 ulp and the CPU evaluates in double: a few 1e-7 relative.
// bf16: the output is rounded to bf16 (at most 2^-9 relative per element, ~1.1e-3 in L2).
// f16: rounded to f16 instead (2^-11 relative per element, RMS 2^-11/sqrt(3) ~2.8e-4 in L2; the
// inputs, |x| < ~20, stay far inside f16's range, so no element over- or underflows).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

// Values spread over the interesting range of both activations, with NaN and +-Inf mixed in.
std::vector<float> inputs(int64_t n, std::mt19937_64& rng, DType dtype) {
  auto v = testing::random_vector(n, rng, 3.0f);
  if (n > 8) {
    v[3] = std::numeric_limits<float>::quiet_NaN();
    v[5] = std::numeric_limits<float>::infinity();
    v[7] = -std::numeric_limits<float>::infinity();
    v[n - 1] = -100.0f;  // sigmoid is 0 in f32 but 4e-44 in double: a negligible difference
  }
  return testing::round_to(dtype, v);
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, DType dtype,
                  const std::string& what) {
  EXPECT_LE(testing::rel_l2(got, ref), tolerance(dtype)) << what;
  testing::expect_same_nonfinite(got, ref, what.c_str());
}

const int64_t kSizes[] = {1, 7, 1025, 4097, (1 << 20) + 5};

class GeluGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(GeluGpu, ForwardAndBackwardMatchCpu, "gelu_forward", "gelu_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(21);
  for (int64_t n : kSizes) {
    auto x = inputs(n, rng, dtype);
    auto d = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> out(n), dinp(n);
    cpu::gelu_forward(host(out, {n}), host(x, {n}));
    cpu::gelu_backward(host(dinp, {n}), host(d, {n}), host(x, {n}));
    DeviceTensor gx(dtype, {n}), gd(dtype, {n}), gout(dtype, {n}), gdinp(dtype, {n});
    gx.upload(x);
    gd.upload(d);
    settle();
    ops::gelu_forward(gout, gx);
    ops::gelu_backward(gdinp, gd, gx);
    const std::string what = std::string(dtype_name(dtype)) + " n=" + std::to_string(n);
    expect_close(gout.download(), out, dtype, "gelu_forward " + what);
    expect_close(gdinp.download(), dinp, dtype, "gelu_backward " + what);
    EXPECT_TRUE(gout.guards_intact() && gdinp.guards_intact()) << what;
    // In place: out = inp, then dinp = dout.
    ops::gelu_backward(gd, gd, gx);
    ops::gelu_forward(gx, gx);
    expect_close(gx.download(), out, dtype, "gelu_forward in place " + what);
    expect_close(gd.download(), dinp, dtype, "gelu_backward in place " + what);
  }
}

TEST_P(GeluGpu, RejectsPartialOverlap) {
  const DType dtype = GetParam();
  DeviceTensor buf(dtype, {65});
  settle();
  const Tensor a(buf.t().data, dtype, Device::cuda, Shape{64});
  const Tensor b(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{64});
  EXPECT_THROW(ops::gelu_forward(b, a), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GeluGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::testing
