// Tests of swiglu_forward / swiglu_backward (out = silu(gate) * up; kernels/cpu/swiglu.cpp,
// kernels/cuda/swiglu.cu): values and limits, finite-difference gradients in f64, NaN propagation,
// f32 vs f64, shape checks, bf16/f16 on the CPU, bounds and thread counts, and GPU parity (f32,
// bf16, f16; awkward sizes, misaligned views, NaN/Inf agreement).
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

// Smooth in both arguments; error budget as for gelu (tests/common/tensors.h).
TS_FD_TEST(Swiglu, GradientsMatchFiniteDifferences, "swiglu_forward", "swiglu_backward") {
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

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Swiglu) {
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 100 : 70;
      const std::string tag = specials ? " with NaN/Inf" : "";
      OpRun r = expect_contract(
          "swiglu_forward" + tag, dt, {narrow(s), narrow(s, 2.0), narrow(s)},
          [](const auto& t) { ops::swiglu_forward(t[0], t[1], t[2]); }, seed + 4, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
      }
      expect_contract(
          "swiglu_backward" + tag, dt, {narrow(s), narrow(s), narrow(s), narrow(s, 2.0), narrow(s)},
          [](const auto& t) { ops::swiglu_backward(t[0], t[1], t[2], t[3], t[4]); }, seed + 5,
          specials);
    }
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Swiglu, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(59);
  const HostTensor gate = randn(DType::f32, {10, 23}, rng), up = randn(DType::f32, {10, 23}, rng);
  const HostTensor dout = randn(DType::f32, {10, 23}, rng);
  Guarded out({10, 23}), dgate({10, 23}), dup({10, 23});
  cpu::swiglu_forward(out, gate, up);
  cpu::swiglu_backward(dgate, dup, dout, gate, up);
  expect_guards_intact({&out, &dgate, &dup}, "swiglu");
}

TEST(Swiglu, IsThreadCountIndependent) {
  std::mt19937_64 rng(60);
  const HostTensor gate = randn(DType::f32, {300, 200}, rng, 2.0);
  const HostTensor up = randn(DType::f32, {300, 200}, rng);
  const HostTensor dout = randn(DType::f32, {300, 200}, rng);
  HostTensor out(DType::f32, {300, 200}), dgate(DType::f32, {300, 200}),
      dup(DType::f32, {300, 200});
  expect_thread_independent("swiglu_forward", {&out}, [&] { cpu::swiglu_forward(out, gate, up); });
  expect_thread_independent("swiglu_backward", {&dgate, &dup},
                            [&] { cpu::swiglu_backward(dgate, dup, dout, gate, up); });
}

// ---- GPU parity (kernels/cuda/swiglu.cu)
// ----------------------------------------------------------

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

class SwigluGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(SwigluGpu, ForwardAndBackwardMatchCpu, "swiglu_forward", "swiglu_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(22);
  for (int64_t n : kSizes) {
    // (N, F) with F odd when possible; the ops are elementwise over any shape.
    const Shape shape = n % 7 == 0 ? Shape{n / 7, 7} : Shape{n};
    auto g = inputs(n, rng, dtype);
    auto u = testing::round_to(dtype, testing::random_vector(n, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> out(n), dg(n), du(n);
    cpu::swiglu_forward(host(out, shape), host(g, shape), host(u, shape));
    cpu::swiglu_backward(host(dg, shape), host(du, shape), host(d, shape), host(g, shape),
                         host(u, shape));
    DeviceTensor gg(dtype, shape), gu(dtype, shape), gd(dtype, shape), gout(dtype, shape);
    DeviceTensor gdg(dtype, shape), gdu(dtype, shape);
    gg.upload(g);
    gu.upload(u);
    gd.upload(d);
    settle();
    ops::swiglu_forward(gout, gg, gu);
    ops::swiglu_backward(gdg, gdu, gd, gg, gu);
    const std::string what = std::string(dtype_name(dtype)) + " n=" + std::to_string(n);
    expect_close(gout.download(), out, dtype, "swiglu_forward " + what);
    expect_close(gdg.download(), dg, dtype, "swiglu_backward dgate " + what);
    expect_close(gdu.download(), du, dtype, "swiglu_backward dup " + what);
    EXPECT_TRUE(gout.guards_intact() && gdg.guards_intact() && gdu.guards_intact()) << what;
  }
}

TEST_P(SwigluGpu, MisalignedViewsUseTheScalarPath) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(23);
  const int64_t n = 1000;
  auto g = inputs(n + 1, rng, dtype);
  auto u = testing::round_to(dtype, testing::random_vector(n + 1, rng));
  std::vector<float> g_tail(g.begin() + 1, g.end()), u_tail(u.begin() + 1, u.end()), out(n);
  cpu::swiglu_forward(host(out, {n}), host(g_tail, {n}), host(u_tail, {n}));
  DeviceTensor gg(dtype, {n + 1}), gu(dtype, {n + 1}), gout(dtype, {n + 1});
  gg.upload(g);
  gu.upload(u);
  settle();
  auto view = [&](const DeviceTensor& t) {
    return Tensor(static_cast<char*>(t.t().data) + dtype_size(dtype), dtype, Device::cuda,
                  Shape{n});
  };
  ops::swiglu_forward(view(gout), view(gg), view(gu));
  const auto all = gout.download();
  EXPECT_TRUE(std::isnan(all[0])) << "the element before the view was written";
  expect_close(std::vector<float>(all.begin() + 1, all.end()), out, dtype, "misaligned swiglu");
}

TEST_P(SwigluGpu, RejectsPartialOverlap) {
  const DType dtype = GetParam();
  DeviceTensor buf(dtype, {65});
  settle();
  const Tensor a(buf.t().data, dtype, Device::cuda, Shape{64});
  const Tensor b(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{64});
  EXPECT_THROW(ops::swiglu_backward(a, a, b, b, b), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SwigluGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::testing
