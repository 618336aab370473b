// Tests of layernorm_forward / layernorm_backward and the fused add_layernorm_forward
// (kernels/cpu/layernorm.cpp, kernels/cuda/layernorm.cu). CPU: forward against the textbook
// formula, finite-difference gradients in f64 (C = 1, awkward C = 1025, batch 1, with and without
// bias), accumulation of dweight/dbias, NaN confinement to its row, f32 against f64, precondition
// checks; bf16/f16 against the f32 kernel rounded once (the fused op against its two steps); bounds
// and thread counts. GPU parity: f32, bf16, f16 on every kernel layout (one warp per row with 1..6
// packs per lane, several warps up to 1024 threads at C = 20000, scalar rows C = 1, 7, 1025, 4097,
// the streaming kernels past the register layouts at C = 40000, more rows than backward blocks),
// += on pre-filled gradients, NaN rows, extreme eps; the fused op bit for bit against add_forward +
// layernorm_forward. Shape letters: N rows, C channels (B, T when the input is 3-D).
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

constexpr float kEps = 1e-5f;

struct LayerNormCase {
  HostTensor inp, weight, bias, out, mean, rstd;  // (..., C), (C), (C) or empty, (..., C), (N), (N)
};

LayerNormCase make_case(DType dtype, Shape inp_shape, bool with_bias, std::mt19937_64& rng,
                        DType stat_dtype) {
  LayerNormCase l;
  const int64_t num_c = inp_shape[-1];
  l.inp = randn(dtype, inp_shape, rng, 2.0);
  for (int64_t i = 0; i < l.inp.size(); ++i) l.inp.set(i, l.inp.get(i) + 0.5);  // nonzero mean
  l.weight = randn(dtype, {num_c}, rng);
  if (with_bias) l.bias = randn(dtype, {num_c}, rng);
  l.out = HostTensor(dtype, inp_shape);
  l.mean = HostTensor(stat_dtype, {l.inp.size() / num_c});
  l.rstd = HostTensor(stat_dtype, {l.inp.size() / num_c});
  return l;
}

void forward(LayerNormCase& l) {
  cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, l.weight, l.bias, kEps);
}

TEST(LayerNorm, ForwardMatchesFormula) {
  std::mt19937_64 rng(21);
  LayerNormCase l = make_case(DType::f64, {3, 4, 37}, true, rng, DType::f64);
  forward(l);
  const int64_t num_c = 37;
  for (int64_t row = 0; row < 12; ++row) {
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < num_c; ++c) mean += l.inp.get(row * num_c + c) / num_c;
    for (int64_t c = 0; c < num_c; ++c)
      var += std::pow(l.inp.get(row * num_c + c) - mean, 2) / num_c;
    const double rstd = 1.0 / std::sqrt(var + kEps);
    EXPECT_NEAR(l.mean.get(row), mean, 1e-13);
    EXPECT_NEAR(l.rstd.get(row), rstd, 1e-12 * rstd);
    for (int64_t c = 0; c < num_c; ++c) {
      const double expect =
          (l.inp.get(row * num_c + c) - mean) * rstd * l.weight.get(c) + l.bias.get(c);
      EXPECT_NEAR(l.out.get(row * num_c + c), expect, 1e-12) << "row " << row << " c " << c;
    }
  }
}

// Finite differences in f64; the error budget (step and tolerance) is in tests/common/tensors.h. C
// = 1 makes dinp exactly 0 (the output is the bias whatever x is); C = 2 makes it tiny (~1e-7).
TS_FD_TEST(LayerNorm, GradientsMatchFiniteDifferences, "layernorm_forward", "layernorm_backward") {
  struct Case {
    Shape inp;
    bool bias;
  };
  const Case cases[] = {
      {{1, 1}, true}, {{2, 3, 7}, true}, {{1, 1, 1025}, true}, {{5, 64}, false}, {{3, 2}, true}};
  std::mt19937_64 rng(22);
  for (const Case& cs : cases) {
    LayerNormCase l = make_case(DType::f64, cs.inp, cs.bias, rng, DType::f64);
    const int64_t num_c = cs.inp[-1];
    forward(l);
    const HostTensor dout = randn(DType::f64, cs.inp, rng);
    HostTensor dinp(DType::f64, cs.inp), dweight(DType::f64, {num_c});
    HostTensor dbias = cs.bias ? HostTensor(DType::f64, {num_c}) : HostTensor();
    cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
    LayerNormCase scratch = l;
    const auto loss = fd_loss(dout, scratch.out, [&] {
      cpu::layernorm_forward(scratch.out, scratch.mean, scratch.rstd, l.inp, l.weight, l.bias,
                             kEps);
    });
    SCOPED_TRACE("shape " + cs.inp.str());
    expect_grad_matches(l.inp, dinp, loss, kFdTol, "dinp", kFdStep);
    expect_grad_matches(l.weight, dweight, loss, kFdTol, "dweight", kFdStep);
    if (cs.bias) expect_grad_matches(l.bias, dbias, loss, kFdTol, "dbias", kFdStep);
  }
}

TEST(LayerNorm, BackwardAccumulatesParametersAndOverwritesInput) {
  std::mt19937_64 rng(23);
  LayerNormCase l = make_case(DType::f64, {6, 10}, true, rng, DType::f64);
  forward(l);
  const HostTensor dout = randn(DType::f64, {6, 10}, rng);
  HostTensor dinp = filled(DType::f64, {6, 10}, kNaN);
  HostTensor dweight(DType::f64, {10}), dbias(DType::f64, {10});
  cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
  const HostTensor dinp1 = dinp, dweight1 = dweight, dbias1 = dbias;
  cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
  expect_identical(dinp, dinp1, "dinp after two calls");
  for (int64_t c = 0; c < 10; ++c) {
    EXPECT_EQ(dweight.get(c), 2 * dweight1.get(c));
    EXPECT_EQ(dbias.get(c), 2 * dbias1.get(c));
  }
}

TEST(LayerNorm, NaNStaysInItsRow) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(24);
    LayerNormCase l = make_case(dtype, {4, 9}, true, rng, DType::f32);
    l.inp.set(1 * 9 + 4, kNaN);
    forward(l);
    for (int64_t row = 0; row < 4; ++row)
      EXPECT_EQ(count_nan(l.out, row * 9, row * 9 + 9), row == 1 ? 9 : 0) << "row " << row;
    const HostTensor dout = randn(dtype, {4, 9}, rng);
    HostTensor dinp(dtype, {4, 9}), dweight(dtype, {9}), dbias(dtype, {9});
    cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
    for (int64_t row = 0; row < 4; ++row)
      EXPECT_EQ(count_nan(dinp, row * 9, row * 9 + 9), row == 1 ? 9 : 0) << "row " << row;
    EXPECT_EQ(count_nan(dweight, 0, 9), 9);  // every column sums over the NaN row
  }
}

// f32 (with f32 saved statistics) against f64 on identical inputs: outputs are O(|weight| + |bias|)
// ~ 3 and each is rounded once from a double computation that used f32 inputs, so they agree to a
// few f32 ulps; dinp involves rstd rounded to f32 (relative 6e-8) times O(10) terms.
TEST(LayerNorm, F32AgreesWithF64) {
  std::mt19937_64 rng(25);
  LayerNormCase l32 = make_case(DType::f32, {2, 5, 300}, true, rng, DType::f32);
  LayerNormCase l64{to_dtype(l32.inp, DType::f64),  to_dtype(l32.weight, DType::f64),
                    to_dtype(l32.bias, DType::f64), HostTensor(DType::f64, {2, 5, 300}),
                    HostTensor(DType::f64, {10}),   HostTensor(DType::f64, {10})};
  forward(l32);
  forward(l64);
  expect_close(l32.out, l64.out, 1e-6, 1e-6, "layernorm out");
  expect_close(l32.rstd, l64.rstd, 1e-7, 0.0, "layernorm rstd");
  const HostTensor dout64 = randn(DType::f64, {2, 5, 300}, rng);
  const HostTensor dout32 = to_dtype(dout64, DType::f32);
  HostTensor dinp32(DType::f32, {2, 5, 300}), dw32(DType::f32, {300}), db32(DType::f32, {300});
  HostTensor dinp64(DType::f64, {2, 5, 300}), dw64(DType::f64, {300}), db64(DType::f64, {300});
  cpu::layernorm_backward(dinp32, dw32, db32, dout32, l32.inp, l32.weight, l32.mean, l32.rstd);
  cpu::layernorm_backward(dinp64, dw64, db64, to_dtype(dout32, DType::f64), l64.inp, l64.weight,
                          l64.mean, l64.rstd);
  expect_close(dinp32, dinp64, 1e-5, 1e-5, "layernorm dinp");
  expect_close(dw32, dw64, 1e-5, 1e-5, "layernorm dweight");
  expect_close(db32, db64, 1e-6, 1e-6, "layernorm dbias");
}

TEST(LayerNorm, RejectsBadOperands) {
  std::mt19937_64 rng(26);
  LayerNormCase l = make_case(DType::f32, {4, 8}, true, rng, DType::f32);
  HostTensor short_weight(DType::f32, {7});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, short_weight, l.bias, kEps),
               Error);
  HostTensor mean64(DType::f64, {4});  // stats may be f32 or the op's dtype (f32 here), not f64
  EXPECT_THROW(cpu::layernorm_forward(l.out, mean64, l.rstd, l.inp, l.weight, l.bias, kEps), Error);
  HostTensor short_rstd(DType::f32, {3});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, short_rstd, l.inp, l.weight, l.bias, kEps),
               Error);
  HostTensor weight64(DType::f64, {8});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, weight64, l.bias, kEps), Error);
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, LayerNorm) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    expect_contract(
        "layernorm_forward", dt,
        {narrow({num_n, num_c}), f32({num_n}), f32({num_n}), narrow({num_n, num_c}, 3.0),
         narrow({num_c}), narrow({num_c})},
        [](const auto& t) { ops::layernorm_forward(t[0], t[1], t[2], t[3], t[4], t[5], 1e-5f); },
        10);
    expect_contract(
        "layernorm_forward without bias, f32 weight", dt,
        {narrow({num_n, num_c}), f32({num_n}), f32({num_n}), narrow({num_n, num_c}), f32({num_c})},
        [](const auto& t) {
          ops::layernorm_forward(t[0], t[1], t[2], t[3], t[4], Tensor(), 1e-5f);
        },
        11);
    // dinp overwritten; dweight, dbias accumulate onto random contents
    expect_contract(
        "layernorm_backward", dt,
        {narrow({num_n, num_c}), narrow({num_c}), narrow({num_c}), narrow({num_n, num_c}),
         narrow({num_n, num_c}), narrow({num_c}), f32({num_n}), f32({num_n}, true)},
        [](const auto& t) {
          ops::layernorm_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
        },
        12);
    // the fused residual + LayerNorm equals add_forward then layernorm_forward, both rounded to
    // storage (the norm reads the rounded residual), also with residual aliasing a
    const std::vector<Operand> fused_specs{
        narrow({num_n, num_c}), narrow({num_n, num_c}), f32({num_n}),    f32({num_n}),
        narrow({num_n, num_c}), narrow({num_n, num_c}), narrow({num_c}), narrow({num_c})};
    expect_same(
        "add_layernorm_forward", dt, fused_specs,
        [](const auto& t) {
          ops::add_layernorm_forward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], 1e-5f);
        },
        [](const auto& t) {
          ops::add_forward(t[0], t[4], t[5]);
          ops::layernorm_forward(t[1], t[2], t[3], t[0], t[6], t[7], 1e-5f);
        },
        13);
    expect_same(
        "add_layernorm_forward residual aliasing a", dt, fused_specs,
        [](const auto& t) {
          ops::add_layernorm_forward(t[4], t[1], t[2], t[3], t[4], t[5], t[6], t[7], 1e-5f);
        },
        [](const auto& t) {
          ops::add_forward(t[4], t[4], t[5]);
          ops::layernorm_forward(t[1], t[2], t[3], t[4], t[6], t[7], 1e-5f);
        },
        14);
  }
}

TEST(NarrowDtype, AddLayerNormReadsTheRoundedResidual) {
  // Independent of the harness: the norm of the fused op sees round(a + b), not the f32 sum.
  const int64_t num_c = 4;
  std::vector<float> a{1.0f, 2.0f, 3.0f, 4.0f}, b{1.0f / 256, -1.0f / 512, 0.0f, 0.5f};
  std::vector<uint16_t> a16(num_c), b16(num_c), res16(num_c), out16(num_c), w16(num_c);
  for (int64_t i = 0; i < num_c; ++i) {
    a16[i] = f32_to_bf16_bits(a[i]);
    b16[i] = f32_to_bf16_bits(b[i]);
    w16[i] = f32_to_bf16_bits(1.0f);
  }
  auto view = [&](std::vector<uint16_t>& v) {
    return Tensor(v.data(), DType::bf16, Device::cpu, {1, num_c});
  };
  float mean = 0, rstd = 0;
  ops::add_layernorm_forward(view(res16), view(out16), Tensor(&mean, DType::f32, Device::cpu, {1}),
                             Tensor(&rstd, DType::f32, Device::cpu, {1}), view(a16), view(b16),
                             Tensor(w16.data(), DType::bf16, Device::cpu, {num_c}), Tensor(),
                             1e-5f);
  double sum = 0;
  for (int64_t i = 0; i < num_c; ++i) {
    EXPECT_EQ(res16[i], f32_to_bf16_bits(a[i] + b[i]));
    sum += bf16_bits_to_f32(res16[i]);
  }
  EXPECT_EQ(mean, float(sum / num_c));  // 1 + 1/256 rounds to 1 in bf16: the mean is exactly 2.625
  EXPECT_EQ(mean, 2.625f);
}

// FP32 main gradients beside 16-bit activations: dweight and dbias f32, accumulated (twice) in
// f32, equal to the f32 kernel on the widened inputs.
TEST(NarrowDtype, LayerNormF32ParameterGradients) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    const std::vector<Operand> specs{
        narrow({num_n, num_c}), f32({num_c}),    f32({num_c}), narrow({num_n, num_c}),
        narrow({num_n, num_c}), narrow({num_c}), f32({num_n}), f32({num_n}, true)};
    const OpFn backward = [](const auto& t) {
      ops::layernorm_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
    };
    expect_contract("layernorm_backward f32 dweight, dbias", dt, specs, backward, 15);
    expect_steps("layernorm_backward f32 dweight, dbias, twice", dt, specs, {backward, backward},
                 16);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(LayerNorm, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kN = 10, kC = 19;
  const HostTensor x2 = randn(DType::f32, {kN, kC}, rng), dout = randn(DType::f32, {kN, kC}, rng);
  const HostTensor w = randn(DType::f32, {kC}, rng), b = randn(DType::f32, {kC}, rng);
  Guarded ln({kN, kC}), mean({kN}), rstd({kN}), dinp({kN, kC}), dw({kC}), db({kC});
  cpu::layernorm_forward(ln, mean, rstd, x2, w, b, 1e-5f);
  cpu::layernorm_backward(dinp, dw, db, dout, x2, w, mean, rstd);
  for (const Guarded* g : {&ln, &mean, &rstd, &dinp, &dw, &db})
    g->expect_guards_intact("layernorm");
}

constexpr int64_t kRows = 300, kCols = 200;  // 60000 elements, above kMinParallelWork

TEST(LayerNorm, IsThreadCountIndependent) {
  std::mt19937_64 rng(81);
  const HostTensor inp = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor dout = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor w = randn(DType::f32, {kCols}, rng), b = randn(DType::f32, {kCols}, rng);
  HostTensor out(DType::f32, {kRows, kCols}), mean(DType::f32, {kRows}), rstd(DType::f32, {kRows});
  HostTensor dinp(DType::f32, {kRows, kCols});
  HostTensor dw = randn(DType::f32, {kCols}, rng), db = randn(DType::f32, {kCols}, rng);
  expect_thread_independent("layernorm_forward", {&out, &mean, &rstd},
                            [&] { cpu::layernorm_forward(out, mean, rstd, inp, w, b, 1e-5f); });
  expect_thread_independent("layernorm_backward", {&dinp, &dw, &db}, [&] {
    cpu::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd);
  });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/layernorm.cu)
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

class LayerNormGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(LayerNormGpu, ForwardMatchesCpu, "layernorm_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(11);
  for (const NormShape& s : kShapes) {
    for (bool with_bias : {true, false}) {
      const int64_t n = s.rows, c = s.cols;
      auto x = testing::random_vector(n * c, rng, 2.0f);
      for (auto& v : x) v += 0.5f;                                // a non-zero mean
      if (n > 1) x[c] = std::numeric_limits<float>::quiet_NaN();  // row 1 must come out NaN
      x = testing::round_to(dtype, x);
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto b = testing::round_to(dtype, testing::random_vector(c, rng));
      std::vector<float> out(n * c), mean(n), rstd(n);
      cpu::layernorm_forward(host(out, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                             host(w, {c}), with_bias ? host(b, {c}) : Tensor(), 1e-5f);
      DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), db(dtype, {c}), dout(dtype, {n, c});
      DeviceTensor dmean(DType::f32, {n}), drstd(DType::f32, {n});
      dx.upload(x);
      dw.upload(w);
      db.upload(b);
      settle();
      ops::layernorm_forward(dout, dmean, drstd, dx, dw, with_bias ? db.t() : Tensor(), 1e-5f);
      const std::string what = label("layernorm_forward", dtype, s) + (with_bias ? "" : " no bias");
      expect_close(dout, out, tolerance(dtype), what + " out");
      expect_close(dmean, mean, kStatTolerance, what + " mean");
      expect_close(drstd, rstd, kStatTolerance, what + " rstd");
    }
  }
}

TS_GPU_PARITY_TEST_P(LayerNormGpu, BackwardMatchesCpuAndAccumulates, "layernorm_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(12);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
    // Statistics from the CPU forward, given to both backwards.
    std::vector<float> scratch(n * c), mean(n), rstd(n);
    cpu::layernorm_forward(host(scratch, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                           host(w, {c}), Tensor(), 1e-5f);
    // Pre-filled parameter gradients: the backward must add to them.
    auto dweight = testing::round_to(dtype, testing::random_vector(c, rng));
    auto dbias = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> dinp(n * c);
    std::vector<float> dweight_ref = dweight, dbias_ref = dbias;
    cpu::layernorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(dbias_ref, {c}),
                            host(d, {n, c}), host(x, {n, c}), host(w, {c}), host(mean, {n}),
                            host(rstd, {n}));
    DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
    DeviceTensor gdw(dtype, {c}), gdb(dtype, {c}), gmean(DType::f32, {n}), grstd(DType::f32, {n});
    gx.upload(x);
    gw.upload(w);
    gd.upload(d);
    gdw.upload(dweight);
    gdb.upload(dbias);
    gmean.upload(mean);
    grstd.upload(rstd);
    settle();
    ops::layernorm_backward(gdinp, gdw, gdb, gd, gx, gw, gmean, grstd);
    const std::string what = label("layernorm_backward", dtype, s);
    expect_close(gdinp, dinp, tolerance(dtype), what + " dinp");
    expect_close(gdw, dweight_ref, tolerance(dtype), what + " dweight");
    expect_close(gdb, dbias_ref, tolerance(dtype), what + " dbias");
    // Deterministic: the same call from the same state gives the same bits.
    const auto dw_first = gdw.download();
    gdw.upload(dweight);
    settle();
    ops::layernorm_backward(gdinp, gdw, Tensor(), gd, gx, gw, gmean, grstd);
    EXPECT_EQ(gdw.download(), dw_first) << what << " (rerun without dbias)";
  }
}

// eps = 0 on one column: the variance is 0, rstd = Inf and the output NaN on both backends;
// a huge eps shrinks the output towards the bias.
TEST_P(LayerNormGpu, ExtremeEpsAgrees) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(15);
  for (auto [c, eps] : {std::pair<int64_t, float>{1, 0.0f}, {768, 1e4f}, {7, 0.0f}}) {
    const int64_t n = 4;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto b = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> out(n * c), mean(n), rstd(n);
    cpu::layernorm_forward(host(out, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                           host(w, {c}), host(b, {c}), eps);
    DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), db(dtype, {c}), dout(dtype, {n, c});
    DeviceTensor dmean(DType::f32, {n}), drstd(DType::f32, {n});
    dx.upload(x);
    dw.upload(w);
    db.upload(b);
    settle();
    const std::string what = "C=" + std::to_string(c) + " eps=" + std::to_string(eps);
    ops::layernorm_forward(dout, dmean, drstd, dx, dw, db, eps);
    expect_close(dout, out, tolerance(dtype), "layernorm " + what);
    expect_close(drstd, rstd, kStatTolerance, "layernorm rstd " + what);
  }
}

// Bitwise equality of two device tensors' contents.
void expect_same_bits(const DeviceTensor& a, const DeviceTensor& b, const std::string& what) {
  const auto x = a.download(), y = b.download();
  ASSERT_EQ(x.size(), y.size()) << what;
  EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float))) << what;
}

TS_GPU_PARITY_TEST_P(LayerNormGpu, FusedResidualLayerNormEqualsUnfusedBitwise,
                     "add_layernorm_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(16);
  for (const NormShape& s : kShapes) {
    for (bool in_place : {false, true}) {
      const int64_t n = s.rows, c = s.cols;
      auto a = testing::round_to(dtype, testing::random_vector(n * c, rng, 2.0f));
      auto b = testing::round_to(dtype, testing::random_vector(n * c, rng));
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto bias = testing::round_to(dtype, testing::random_vector(c, rng));
      DeviceTensor ga(dtype, {n, c}), gb(dtype, {n, c}), gw(dtype, {c}), gbias(dtype, {c});
      DeviceTensor res1(dtype, {n, c}), out1(dtype, {n, c}), mean1(DType::f32, {n});
      DeviceTensor rstd1(DType::f32, {n}), res2(dtype, {n, c}), out2(dtype, {n, c});
      DeviceTensor mean2(DType::f32, {n}), rstd2(DType::f32, {n});
      ga.upload(a);
      gb.upload(b);
      gw.upload(w);
      gbias.upload(bias);
      settle();
      ops::add_forward(res1, ga, gb);
      ops::layernorm_forward(out1, mean1, rstd1, res1, gw, gbias, 1e-5f);
      if (in_place) {  // residual stream updated in place: residual is a
        res2.upload(a);
        settle();
        ops::add_layernorm_forward(res2, out2, mean2, rstd2, res2, gb, gw, gbias, 1e-5f);
      } else {
        ops::add_layernorm_forward(res2, out2, mean2, rstd2, ga, gb, gw, gbias, 1e-5f);
      }
      const std::string what =
          label("add_layernorm_forward", dtype, s) + (in_place ? " in place" : "");
      expect_same_bits(res2, res1, what + " residual");
      expect_same_bits(out2, out1, what + " out");
      expect_same_bits(mean2, mean1, what + " mean");
      expect_same_bits(rstd2, rstd1, what + " rstd");
      EXPECT_TRUE(res2.guards_intact() && out2.guards_intact() && mean2.guards_intact() &&
                  rstd2.guards_intact())
          << what;
    }
  }
}

// a one element into its buffer (not 16-byte aligned) while the norm's layout reads packs: the
// fused op must still equal the unfused pair.
TEST_P(LayerNormGpu, FusedResidualLayerNormWithMisalignedInput) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(17);
  const int64_t n = 33, c = 768;
  DeviceTensor abuf(dtype, {n * c + 1}), gb(dtype, {n, c}), gw(dtype, {c});
  abuf.upload(testing::round_to(dtype, testing::random_vector(n * c + 1, rng)));
  gb.upload(testing::round_to(dtype, testing::random_vector(n * c, rng)));
  gw.upload(testing::round_to(dtype, testing::random_vector(c, rng)));
  DeviceTensor res1(dtype, {n, c}), out1(dtype, {n, c}), mean1(DType::f32, {n});
  DeviceTensor rstd1(DType::f32, {n}), res2(dtype, {n, c}), out2(dtype, {n, c});
  DeviceTensor mean2(DType::f32, {n}), rstd2(DType::f32, {n});
  settle();
  const Tensor a(static_cast<char*>(abuf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{n, c});
  ops::add_forward(res1, a, gb);
  ops::layernorm_forward(out1, mean1, rstd1, res1, gw, Tensor(), 1e-5f);
  ops::add_layernorm_forward(res2, out2, mean2, rstd2, a, gb, gw, Tensor(), 1e-5f);
  expect_same_bits(res2, res1, "residual");
  expect_same_bits(out2, out1, "out");
  expect_same_bits(rstd2, rstd1, "rstd");
}

// FP32 main gradients (kernels/ops.h): dweight and dbias f32 beside bf16/f16 activations,
// pre-filled and accumulated twice in f32, never rounded to 16 bits. Reference: the CPU backward
// on the same rounded inputs, twice, in f32. Bound: f32's (row sums in f32 where the CPU uses
// double), 100x below the 2^-9 / 2^-11 that rounding the gradient to 16 bits would cost.
TS_GPU_PARITY_TEST(LayerNormMainGrad, F32ParameterGradientsAccumulate, "layernorm_backward") {
  std::mt19937_64 rng(18);
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (const NormShape& s : kShapes) {
      const int64_t n = s.rows, c = s.cols;
      auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
      std::vector<float> scratch(n * c), mean(n), rstd(n);
      cpu::layernorm_forward(host(scratch, {n, c}), host(mean, {n}), host(rstd, {n}),
                             host(x, {n, c}), host(w, {c}), Tensor(), 1e-5f);
      const auto dweight = testing::random_vector(c, rng), dbias = testing::random_vector(c, rng);
      std::vector<float> dinp(n * c), dweight_ref = dweight, dbias_ref = dbias;
      for (int rep = 0; rep < 2; ++rep)
        cpu::layernorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(dbias_ref, {c}),
                                host(d, {n, c}), host(x, {n, c}), host(w, {c}), host(mean, {n}),
                                host(rstd, {n}));
      DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
      DeviceTensor gdw(DType::f32, {c}), gdb(DType::f32, {c}), gmean(DType::f32, {n}),
          grstd(DType::f32, {n});
      gx.upload(x);
      gw.upload(w);
      gd.upload(d);
      gdw.upload(dweight);
      gdb.upload(dbias);
      gmean.upload(mean);
      grstd.upload(rstd);
      settle();
      for (int rep = 0; rep < 2; ++rep)
        ops::layernorm_backward(gdinp, gdw, gdb, gd, gx, gw, gmean, grstd);
      const std::string what = label("layernorm_backward f32 dweight/dbias", dtype, s);
      expect_close(gdinp, dinp, tolerance(dtype), what + " dinp");
      expect_close(gdw, dweight_ref, tolerance(DType::f32), what + " dweight");
      expect_close(gdb, dbias_ref, tolerance(DType::f32), what + " dbias");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, LayerNormGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
