// Tests of rmsnorm_forward / rmsnorm_backward (kernels/cpu/rmsnorm.cpp, kernels/cuda/rmsnorm.cu).
// CPU: forward against the formula, finite-difference gradients in f64 (C = 1, awkward C = 1025,
// batch 1, a QK-norm shaped input), accumulation of dweight, NaN confinement to its row, f32
// against f64, precondition checks; bf16/f16 against the f32 kernel rounded once; bounds and
// thread counts. GPU parity: f32, bf16, f16 on every kernel layout (as layernorm_test.cpp), +=,
// NaN rows, extreme eps, aliasing rejected. Shape letters: N rows, C channels (B, T, H, D for the
// per-head case).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/memory.h"
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

// Finite differences in f64; the error budget (step and tolerance) is in tests/common/tensors.h.
TS_FD_TEST(RmsNorm, GradientsMatchFiniteDifferences, "rmsnorm_forward", "rmsnorm_backward") {
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

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, RmsNorm) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    expect_contract(
        "rmsnorm_forward", dt,
        {narrow({num_n, num_c}), f32({num_n}), narrow({num_n, num_c}, 2.0), narrow({num_c})},
        [](const auto& t) { ops::rmsnorm_forward(t[0], t[1], t[2], t[3], 1e-6f); }, 20);
    expect_contract(
        "rmsnorm_backward", dt,
        {narrow({num_n, num_c}), narrow({num_c}), narrow({num_n, num_c}), narrow({num_n, num_c}),
         narrow({num_c}), f32({num_n}, true)},
        [](const auto& t) { ops::rmsnorm_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 21);
  }
}

// FP32 main gradient beside 16-bit activations: dweight f32, accumulated (twice) in f32, equal to
// the f32 kernel on the widened inputs.
TEST(NarrowDtype, RmsNormF32WeightGradient) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    const std::vector<Operand> specs{narrow({num_n, num_c}), f32({num_c}),
                                     narrow({num_n, num_c}), narrow({num_n, num_c}),
                                     narrow({num_c}),        f32({num_n}, true)};
    const OpFn backward = [](const auto& t) {
      ops::rmsnorm_backward(t[0], t[1], t[2], t[3], t[4], t[5]);
    };
    expect_contract("rmsnorm_backward f32 dweight", dt, specs, backward, 22);
    expect_steps("rmsnorm_backward f32 dweight, twice", dt, specs, {backward, backward}, 23);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(RmsNorm, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kN = 10, kC = 19;
  const HostTensor x2 = randn(DType::f32, {kN, kC}, rng), dout = randn(DType::f32, {kN, kC}, rng);
  const HostTensor w = randn(DType::f32, {kC}, rng);
  Guarded rms({kN, kC}), rms_rstd({kN}), rms_dinp({kN, kC}), rms_dw({kC});
  cpu::rmsnorm_forward(rms, rms_rstd, x2, w, 1e-6f);
  cpu::rmsnorm_backward(rms_dinp, rms_dw, dout, x2, w, rms_rstd);
  for (const Guarded* g : {&rms, &rms_rstd, &rms_dinp, &rms_dw}) g->expect_guards_intact("rmsnorm");
}

constexpr int64_t kRows = 300, kCols = 200;  // 60000 elements, above kMinParallelWork

TEST(RmsNorm, IsThreadCountIndependent) {
  std::mt19937_64 rng(81);
  const HostTensor inp = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor dout = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor w = randn(DType::f32, {kCols}, rng), b = randn(DType::f32, {kCols}, rng);
  HostTensor out(DType::f32, {kRows, kCols}), mean(DType::f32, {kRows}), rstd(DType::f32, {kRows});
  HostTensor dinp(DType::f32, {kRows, kCols});
  HostTensor dw = randn(DType::f32, {kCols}, rng), db = randn(DType::f32, {kCols}, rng);
  expect_thread_independent("rmsnorm_forward", {&out, &rstd},
                            [&] { cpu::rmsnorm_forward(out, rstd, inp, w, 1e-6f); });
  expect_thread_independent("rmsnorm_backward", {&dinp, &dw},
                            [&] { cpu::rmsnorm_backward(dinp, dw, dout, inp, w, rstd); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/rmsnorm.cu)
// ----------------------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// f32: the GPU sums rows of up to 20000 values in f32 (pairwise across threads) where the CPU
// uses double: ~sqrt(C) * 6e-8 relative, under 1e-5; 2e-5 leaves margin. bf16: outputs are
// rounded to bf16 (at most 2^-9 relative per element, ~1.1e-3 of the L2 norm); 8e-3 covers it
// plus the f32 accumulation. f16 rounds to 2^-11 (~2.8e-4 in L2): 2e-3 is the same 7x margin.
// The largest values (dweight, dbias summed over 9000 rows, ~1e2) are far inside f16's range.
// Statistics (mean, rstd) are f32 for every dtype.
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 8e-3, 2e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}
constexpr double kStatTolerance = 2e-5;

struct NormShape {
  int64_t rows, cols;
};
const NormShape kShapes[] = {{1, 1},    {3, 7},     {64, 768},  {40, 128},  {5, 1025}, {4, 2048},
                             {3, 4097}, {2, 20000}, {2, 40000}, {9000, 64}, {300, 96}, {1000, 768}};

void expect_close(const DeviceTensor& gpu, const std::vector<float>& cpu, double tol,
                  const std::string& what) {
  const auto got = gpu.download();
  EXPECT_LE(testing::rel_l2(got, cpu), tol) << what;
  testing::expect_same_nonfinite(got, cpu, what.c_str());
  EXPECT_TRUE(gpu.guards_intact()) << what;
}

std::string label(const char* op, DType dtype, const NormShape& s) {
  return std::string(op) + " " + std::string(dtype_name(dtype)) + " (" + std::to_string(s.rows) +
         ", " + std::to_string(s.cols) + ")";
}

class RmsNormGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(RmsNormGpu, ForwardMatchesCpu, "rmsnorm_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(13);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::random_vector(n * c, rng, 2.0f);
    if (n > 1) x[c + c / 2] = std::numeric_limits<float>::quiet_NaN();
    x = testing::round_to(dtype, x);
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> out(n * c), rstd(n);
    cpu::rmsnorm_forward(host(out, {n, c}), host(rstd, {n}), host(x, {n, c}), host(w, {c}), 1e-6f);
    DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), dout(dtype, {n, c}), drstd(DType::f32, {n});
    dx.upload(x);
    dw.upload(w);
    settle();
    ops::rmsnorm_forward(dout, drstd, dx, dw, 1e-6f);
    const std::string what = label("rmsnorm_forward", dtype, s);
    expect_close(dout, out, tolerance(dtype), what + " out");
    expect_close(drstd, rstd, kStatTolerance, what + " rstd");
  }
}

TS_GPU_PARITY_TEST_P(RmsNormGpu, BackwardMatchesCpuAndAccumulates, "rmsnorm_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(14);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
    std::vector<float> scratch(n * c), rstd(n);
    cpu::rmsnorm_forward(host(scratch, {n, c}), host(rstd, {n}), host(x, {n, c}), host(w, {c}),
                         1e-6f);
    auto dweight = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> dinp(n * c), dweight_ref = dweight;
    cpu::rmsnorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(d, {n, c}),
                          host(x, {n, c}), host(w, {c}), host(rstd, {n}));
    DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
    DeviceTensor gdw(dtype, {c}), grstd(DType::f32, {n});
    gx.upload(x);
    gw.upload(w);
    gd.upload(d);
    gdw.upload(dweight);
    grstd.upload(rstd);
    settle();
    ops::rmsnorm_backward(gdinp, gdw, gd, gx, gw, grstd);
    const std::string what = label("rmsnorm_backward", dtype, s);
    // dinp = rstd * (dnorm - norm * mean(dnorm * norm)) is a difference of terms of size
    // |rstd * dout * weight|; at C = 1 they cancel to ~eps / x^2 of their size, so the error is
    // measured against the terms (the same bound as the L2-relative one whenever they do not
    // cancel).
    double terms_sq = 0.0, ref_sq = 0.0, err_sq = 0.0;
    const auto got_dinp = gdinp.download();
    for (int64_t i = 0; i < n * c; ++i) {
      const double term = double(rstd[i / c]) * d[i] * w[i % c];
      terms_sq += term * term;
      ref_sq += double(dinp[i]) * dinp[i];
      err_sq += (double(got_dinp[i]) - dinp[i]) * (double(got_dinp[i]) - dinp[i]);
    }
    EXPECT_LE(std::sqrt(err_sq / std::max({terms_sq, ref_sq, 1e-30})), tolerance(dtype))
        << what << " dinp";
    testing::expect_same_nonfinite(got_dinp, dinp, (what + " dinp").c_str());
    EXPECT_TRUE(gdinp.guards_intact()) << what;
    expect_close(gdw, dweight_ref, tolerance(dtype), what + " dweight");
  }
}

// The same extreme eps for RMSNorm: eps = 0 on one column gives rstd = 1/|x| with nothing to
// hide a wrong formula; a huge eps shrinks the output towards 0.
TEST_P(RmsNormGpu, ExtremeEpsAgrees) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(15);
  for (auto [c, eps] : {std::pair<int64_t, float>{1, 0.0f}, {768, 1e4f}, {7, 0.0f}}) {
    const int64_t n = 4;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto b = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> rms_out(n * c), rms_rstd(n);
    cpu::rmsnorm_forward(host(rms_out, {n, c}), host(rms_rstd, {n}), host(x, {n, c}), host(w, {c}),
                         eps);
    DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), db(dtype, {c}), dout(dtype, {n, c});
    DeviceTensor dmean(DType::f32, {n}), drstd(DType::f32, {n});
    dx.upload(x);
    dw.upload(w);
    db.upload(b);
    settle();
    const std::string what = "C=" + std::to_string(c) + " eps=" + std::to_string(eps);
    ops::rmsnorm_forward(dout, drstd, dx, dw, eps);
    expect_close(dout, rms_out, tolerance(dtype), "rmsnorm " + what);
    expect_close(drstd, rms_rstd, kStatTolerance, "rmsnorm rstd " + what);
  }
}

TEST_P(RmsNormGpu, RejectsAliasedGradient) {
  const DType dtype = GetParam();
  DeviceTensor x(dtype, {4, 8}), w(dtype, {8}), dw(dtype, {8}), rstd(DType::f32, {4});
  settle();
  EXPECT_THROW(ops::rmsnorm_backward(x, dw, x, x, w, rstd), Error);
}

// FP32 main gradient (kernels/ops.h): dweight f32 beside bf16/f16 activations, pre-filled and
// accumulated twice in f32. Reference and bound as LayerNormMainGradGpu (layernorm_test.cpp).
TS_GPU_PARITY_TEST(RmsNormMainGrad, F32WeightGradientAccumulates, "rmsnorm_backward") {
  std::mt19937_64 rng(19);
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (const NormShape& s : kShapes) {
      const int64_t n = s.rows, c = s.cols;
      auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
      std::vector<float> scratch(n * c), rstd(n);
      cpu::rmsnorm_forward(host(scratch, {n, c}), host(rstd, {n}), host(x, {n, c}), host(w, {c}),
                           1e-6f);
      const auto dweight = testing::random_vector(c, rng);
      std::vector<float> dinp(n * c), dweight_ref = dweight;
      for (int rep = 0; rep < 2; ++rep)
        cpu::rmsnorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(d, {n, c}),
                              host(x, {n, c}), host(w, {c}), host(rstd, {n}));
      DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
      DeviceTensor gdw(DType::f32, {c}), grstd(DType::f32, {n});
      gx.upload(x);
      gw.upload(w);
      gd.upload(d);
      gdw.upload(dweight);
      grstd.upload(rstd);
      settle();
      for (int rep = 0; rep < 2; ++rep) ops::rmsnorm_backward(gdinp, gdw, gd, gx, gw, grstd);
      expect_close(gdw, dweight_ref, tolerance(DType::f32),
                   label("rmsnorm_backward f32 dweight", dtype, s));
      EXPECT_TRUE(gdinp.guards_intact());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RmsNormGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
