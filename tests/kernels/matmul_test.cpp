// Tests of gemm, matmul_forward and matmul_backward (kernels/cpu/matmul.cpp, kernels/cuda/matmul.cu
// on cuBLASLt, gemm_lt.cu). CPU: the CBLAS fast path against the plain-loop reference (exact small
// products, awkward shapes in all four transpose pairs), finite-difference gradients in f64,
// accumulation, the empty-dinp skip, NaN propagation, f32/f64 agreement; bf16/f16 against the f32
// kernel rounded once (16-bit inputs into an f32 c or dweight included); bounds and thread counts.
// GPU parity: every transpose pair, sizes 1, 7, 33, 1025, alpha/beta (beta = 0 ignores a
// NaN-poisoned c, alpha = 0 reads no NaN a and b), bias, misaligned operands, += of parameter
// gradients, the FMA fallback kernel; each check prints "measured" lines with its error.
// Shape letters: M rows, K in-features, N out-features.
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
#include "kernels/cpu/gemm_reference.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/gemm_lt.h"
#endif

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

// op(x) stored as (rows, cols) when not transposed, (cols, rows) when transposed.
HostTensor stored(DType dtype, int64_t rows, int64_t cols, bool trans, std::mt19937_64& rng) {
  return randn(dtype, trans ? Shape{cols, rows} : Shape{rows, cols}, rng);
}

double elem(const HostTensor& x, int64_t r, int64_t c, bool trans) {
  const int64_t cols = trans ? x.t.dim(0) : x.t.dim(1);
  return trans ? x.get(c * x.t.dim(1) + r) : x.get(r * cols + c);
}

TEST(Gemm, ReferenceSmallExactInAllTransposes) {
  // a = [[1, 2, 3], [4, 5, 6]], b = [[1, 0], [-1, 2], [0.5, 1]]: a b = [[0.5, 7], [2, 16]].
  const double a_rows[2][3] = {{1, 2, 3}, {4, 5, 6}};
  const double b_rows[3][2] = {{1, 0}, {-1, 2}, {0.5, 1}};
  const double expect[2][2] = {{0.5, 7}, {2, 16}};
  for (int trans_a = 0; trans_a < 2; ++trans_a) {
    for (int trans_b = 0; trans_b < 2; ++trans_b) {
      HostTensor a(DType::f64, trans_a ? Shape{3, 2} : Shape{2, 3});
      HostTensor b(DType::f64, trans_b ? Shape{2, 3} : Shape{3, 2});
      for (int i = 0; i < 2; ++i)
        for (int p = 0; p < 3; ++p) a.set(trans_a ? p * 2 + i : i * 3 + p, a_rows[i][p]);
      for (int p = 0; p < 3; ++p)
        for (int j = 0; j < 2; ++j) b.set(trans_b ? j * 3 + p : p * 2 + j, b_rows[p][j]);
      HostTensor c = filled(DType::f64, {2, 2}, 1.0);
      cpu::gemm_reference(c, a, b, trans_a, trans_b, 2.0f, 3.0f);  // 2 a b + 3
      HostTensor c_blas = filled(DType::f64, {2, 2}, 1.0);
      cpu::gemm(c_blas, a, b, trans_a, trans_b, 2.0f, 3.0f);
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          EXPECT_EQ(c.get(i * 2 + j), 2 * expect[i][j] + 3) << trans_a << trans_b;
          EXPECT_EQ(c_blas.get(i * 2 + j), 2 * expect[i][j] + 3) << trans_a << trans_b;
        }
      }
    }
  }
}

// gemm (CBLAS when built with it) against gemm_reference. The reference accumulates in double and
// rounds once; a BLAS sum of K products in precision u errs by at most about K u times the sum of
// absolute terms (Higham, Accuracy and Stability, 3.5), so each element gets
// 2 (K + 2) u (|alpha| sum_p |a_ip b_pj| + |beta c_ij|) plus a tiny floor.
TEST(Gemm, FastPathMatchesReferenceOnAwkwardShapes) {
  struct Dims {
    int64_t m, n, k;
  };
  const Dims dims[] = {{1, 1, 1}, {17, 33, 65}, {129, 7, 255}, {3, 1, 2}, {1, 70, 9}};
  const float scalars[][2] = {{1.0f, 0.0f}, {0.5f, 1.0f}, {-2.0f, 0.25f}};
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::f32, DType::f64}) {
    const double u = dtype == DType::f32 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
    for (const Dims& d : dims) {
      for (int trans = 0; trans < 4; ++trans) {
        const bool trans_a = trans & 1, trans_b = trans & 2;
        const HostTensor a = stored(dtype, d.m, d.k, trans_a, rng);
        const HostTensor b = stored(dtype, d.k, d.n, trans_b, rng);
        for (const auto& sc : scalars) {
          const float alpha = sc[0], beta = sc[1];
          // beta = 0 must ignore c entirely, so c starts as NaN garbage there.
          const HostTensor c0 =
              beta == 0.0f ? filled(dtype, {d.m, d.n}, kNaN) : randn(dtype, {d.m, d.n}, rng);
          HostTensor c_ref = c0, c_fast = c0;
          cpu::gemm_reference(c_ref, a, b, trans_a, trans_b, alpha, beta);
          cpu::gemm(c_fast, a, b, trans_a, trans_b, alpha, beta);
          for (int64_t i = 0; i < d.m; ++i) {
            for (int64_t j = 0; j < d.n; ++j) {
              double abs_sum = 0.0;
              for (int64_t p = 0; p < d.k; ++p)
                abs_sum += std::fabs(elem(a, i, p, trans_a) * elem(b, p, j, trans_b));
              const double c_old = beta == 0.0f ? 0.0 : std::fabs(beta * c0.get(i * d.n + j));
              const double bound =
                  2.0 * (d.k + 2) * u * (std::fabs(alpha) * abs_sum + c_old) + 1e-300;
              const double ref = c_ref.get(i * d.n + j), fast = c_fast.get(i * d.n + j);
              ASSERT_FALSE(std::isnan(ref)) << "reference read c although beta = 0";
              ASSERT_LE(std::fabs(fast - ref), bound)
                  << "M=" << d.m << " N=" << d.n << " K=" << d.k << " trans_a=" << trans_a
                  << " trans_b=" << trans_b << " alpha=" << alpha << " beta=" << beta
                  << " dtype=" << dtype_name(dtype) << " at (" << i << ", " << j << ")";
            }
          }
        }
      }
    }
  }
}

TEST(Gemm, AlphaZeroSkipsTheProduct) {
  // As in BLAS: alpha = 0 scales c by beta and never reads a or b (NaN there does not leak).
  HostTensor a = filled(DType::f64, {3, 4}, kNaN), b = filled(DType::f64, {4, 2}, kNaN);
  for (auto fn : {&cpu::gemm, &cpu::gemm_reference}) {
    HostTensor c = filled(DType::f64, {3, 2}, 1.5);
    fn(c, a, b, false, false, 0.0f, 2.0f);
    expect_identical(c, filled(DType::f64, {3, 2}, 3.0), "alpha = 0");
  }
}

TEST(Gemm, RejectsMismatchedOperands) {
  std::mt19937_64 rng(1);
  HostTensor a = randn(DType::f32, {3, 4}, rng), b = randn(DType::f32, {5, 2}, rng);
  HostTensor c(DType::f32, {3, 2});
  EXPECT_THROW(cpu::gemm(c, a, b, false, false, 1.0f, 0.0f), Error);  // K 4 vs 5
  HostTensor b64 = randn(DType::f64, {4, 2}, rng);
  EXPECT_THROW(cpu::gemm(c, a, b64, false, false, 1.0f, 0.0f), Error);  // mixed dtypes
  EXPECT_THROW(cpu::gemm(a, a, a, false, true, 1.0f, 0.0f), Error);     // c aliases a
}

// ---- matmul_forward / matmul_backward -----------------------------------------------------

struct Linear {
  HostTensor inp, weight, bias;  // (M,K) or (B,T,K), (N,K), (N) or empty
  HostTensor out;
};

Linear make_linear(DType dtype, Shape inp_shape, int64_t n, bool with_bias, std::mt19937_64& rng) {
  Linear l;
  l.inp = randn(dtype, inp_shape, rng);
  const int64_t k = inp_shape[-1];
  l.weight = randn(dtype, {n, k}, rng, 1.0 / std::sqrt(double(k)));
  if (with_bias) l.bias = randn(dtype, {n}, rng);
  Shape out_shape = inp_shape;
  out_shape.dims[out_shape.ndim - 1] = n;
  l.out = HostTensor(dtype, out_shape);
  return l;
}

// Finite differences in f64: loss = sum(dout * matmul(inp, weight, bias)). The loss is linear in
// each argument, so the central difference has no truncation error, only rounding (budget in
// tests/common/tensors.h); any wrong index errs by O(1).
TS_FD_TEST(Matmul, GradientsMatchFiniteDifferences, "matmul_forward", "matmul_backward") {
  struct Case {
    Shape inp;
    int64_t n;
    bool bias;
  };
  const Case cases[] = {
      {{1, 1}, 1, true}, {{2, 3, 5}, 7, true}, {{13, 17}, 33, false}, {{1, 1, 64}, 3, true}};
  std::mt19937_64 rng(11);
  for (const Case& cs : cases) {
    Linear l = make_linear(DType::f64, cs.inp, cs.n, cs.bias, rng);
    const HostTensor dout = randn(DType::f64, l.out.t.shape, rng);
    HostTensor dinp(DType::f64, cs.inp), dweight(DType::f64, l.weight.t.shape);
    HostTensor dbias = cs.bias ? HostTensor(DType::f64, {cs.n}) : HostTensor();
    cpu::matmul_backward(dinp, dweight, dbias, dout, l.inp, l.weight);
    const auto loss =
        fd_loss(dout, l.out, [&] { cpu::matmul_forward(l.out, l.inp, l.weight, l.bias); });
    expect_grad_matches(l.inp, dinp, loss, kFdTol, "dinp", kFdStep);
    expect_grad_matches(l.weight, dweight, loss, kFdTol, "dweight", kFdStep);
    if (cs.bias) expect_grad_matches(l.bias, dbias, loss, kFdTol, "dbias", kFdStep);
  }
}

TEST(Matmul, BackwardAccumulatesParametersAndOverwritesInput) {
  std::mt19937_64 rng(12);
  Linear l = make_linear(DType::f64, {4, 6}, 5, true, rng);
  const HostTensor dout = randn(DType::f64, {4, 5}, rng);
  HostTensor dinp = filled(DType::f64, {4, 6}, kNaN);  // overwritten, never read
  HostTensor dweight(DType::f64, {5, 6}), dbias(DType::f64, {5});
  cpu::matmul_backward(dinp, dweight, dbias, dout, l.inp, l.weight);
  const HostTensor dinp1 = dinp, dweight1 = dweight, dbias1 = dbias;
  cpu::matmul_backward(dinp, dweight, dbias, dout, l.inp, l.weight);
  expect_identical(dinp, dinp1, "dinp after two calls");
  for (int64_t i = 0; i < dweight.size(); ++i) EXPECT_EQ(dweight.get(i), 2 * dweight1.get(i));
  for (int64_t i = 0; i < dbias.size(); ++i) EXPECT_EQ(dbias.get(i), 2 * dbias1.get(i));
  EXPECT_EQ(count_nan(dinp, 0, dinp.size()), 0);
}

TEST(Matmul, EmptyDinpSkipsInputGradient) {
  std::mt19937_64 rng(13);
  Linear l = make_linear(DType::f64, {3, 4}, 2, false, rng);
  const HostTensor dout = randn(DType::f64, {3, 2}, rng);
  HostTensor dinp(DType::f64, {3, 4});
  HostTensor dweight_full(DType::f64, {2, 4}), dweight(DType::f64, {2, 4});
  cpu::matmul_backward(dinp, dweight_full, Tensor(), dout, l.inp, l.weight);
  cpu::matmul_backward(Tensor(), dweight, Tensor(), dout, l.inp, l.weight);
  expect_identical(dweight, dweight_full, "dweight without dinp");
}

TEST(Matmul, NaNInOneInputRowStaysInThatRow) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(14);
    Linear l = make_linear(dtype, {5, 8}, 6, true, rng);
    l.inp.set(2 * 8 + 3, kNaN);
    cpu::matmul_forward(l.out, l.inp, l.weight, l.bias);
    for (int64_t row = 0; row < 5; ++row)
      EXPECT_EQ(count_nan(l.out, row * 6, row * 6 + 6), row == 2 ? 6 : 0) << "row " << row;
  }
}

// f32 against f64 on the same (f32-representable) inputs: the f32 path (BLAS) errs by about
// K u_f32 times the sum of absolute terms; with K = 96 and unit-variance terms that is below 2e-5.
TEST(Matmul, F32AgreesWithF64) {
  std::mt19937_64 rng(15);
  Linear l64 = make_linear(DType::f64, {3, 7, 96}, 40, true, rng);
  Linear l32{to_dtype(l64.inp, DType::f32), to_dtype(l64.weight, DType::f32),
             to_dtype(l64.bias, DType::f32), HostTensor(DType::f32, l64.out.t.shape)};
  l64 = Linear{to_dtype(l32.inp, DType::f64), to_dtype(l32.weight, DType::f64),
               to_dtype(l32.bias, DType::f64), l64.out};
  cpu::matmul_forward(l64.out, l64.inp, l64.weight, l64.bias);
  cpu::matmul_forward(l32.out, l32.inp, l32.weight, l32.bias);
  expect_close(l32.out, l64.out, 0.0, 2e-5, "matmul f32 vs f64");
}

TEST(Matmul, RejectsBadShapes) {
  std::mt19937_64 rng(16);
  Linear l = make_linear(DType::f32, {4, 6}, 5, true, rng);
  HostTensor wrong_out(DType::f32, {4, 6});
  EXPECT_THROW(cpu::matmul_forward(wrong_out, l.inp, l.weight, l.bias), Error);
  HostTensor wrong_bias(DType::f32, {6});
  EXPECT_THROW(cpu::matmul_forward(l.out, l.inp, l.weight, wrong_bias), Error);
  HostTensor dweight(DType::f32, {5, 6}), dout(DType::f32, {4, 5}), dinp(DType::f32, {4, 5});
  EXPECT_THROW(cpu::matmul_backward(dinp, dweight, Tensor(), dout, l.inp, l.weight), Error);
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Gemm) {
  for (DType dt : kNarrowTypes) {
    const int64_t m = 3, n = 17, k = 1025;
    for (int trans = 0; trans < 4; ++trans) {
      const bool ta = trans & 1, tb = trans & 2;
      const Shape a_shape = ta ? Shape{k, m} : Shape{m, k};
      const Shape b_shape = tb ? Shape{n, k} : Shape{k, n};
      for (float beta : {0.0f, 0.5f}) {
        expect_contract(
            "gemm trans " + std::to_string(trans) + " beta " + std::to_string(beta), dt,
            {narrow({m, n}), narrow(a_shape), narrow(b_shape)},
            [=](const auto& t) { ops::gemm(t[0], t[1], t[2], ta, tb, 1.5f, beta); }, 30 + trans);
      }
    }
    // 16-bit inputs into an f32 output (cuBLASLt's bf16 x bf16 -> f32)
    expect_contract(
        "gemm into f32", dt, {f32({m, n}), narrow({m, k}), narrow({k, n})},
        [](const auto& t) { ops::gemm(t[0], t[1], t[2], false, false, 1.0f, 1.0f); }, 35);
  }
}

TEST(NarrowDtype, Matmul) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_m = 3, num_k = 1025, num_n = 17;
    expect_contract(
        "matmul_forward", dt,
        {narrow({num_m, num_n}), narrow({num_m, num_k}), narrow({num_n, num_k}), narrow({num_n})},
        [](const auto& t) { ops::matmul_forward(t[0], t[1], t[2], t[3]); }, 40);
    expect_contract(
        "matmul_forward (B,T,K) without bias", dt,
        {narrow({1, num_m, num_n}), narrow({1, num_m, num_k}), narrow({num_n, num_k})},
        [](const auto& t) { ops::matmul_forward(t[0], t[1], t[2], Tensor()); }, 41);
    // dweight and dbias accumulate onto random contents (also twice in a row)
    const std::vector<Operand> bwd{narrow({num_m, num_k}), narrow({num_n, num_k}),
                                   narrow({num_n}),        narrow({num_m, num_n}),
                                   narrow({num_m, num_k}), narrow({num_n, num_k})};
    expect_contract(
        "matmul_backward", dt, bwd,
        [](const auto& t) { ops::matmul_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 42);
    const OpFn no_dinp = [](const auto& t) {
      ops::matmul_backward(Tensor(), t[1], t[2], t[3], t[4], t[5]);
    };
    expect_steps("matmul_backward twice, no dinp", dt, bwd, {no_dinp, no_dinp}, 43);
    expect_contract(
        "matmul_backward f32 dweight (master gradient)", dt,
        {narrow({num_m, num_k}), f32({num_n, num_k}), f32({num_n}), narrow({num_m, num_n}),
         narrow({num_m, num_k}), narrow({num_n, num_k})},
        [](const auto& t) { ops::matmul_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 44);
  }
}

// FP32 main gradients beside 16-bit operands, accumulated twice: dweight and dbias f32 (with and
// without dinp), and the weight-gradient gemm (trans_a, beta = 1) into an f32 c.
TEST(NarrowDtype, MatmulF32ParameterGradients) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_m = 3, num_k = 1025, num_n = 17;
    const std::vector<Operand> bwd{narrow({num_m, num_k}), f32({num_n, num_k}),
                                   f32({num_n}),           narrow({num_m, num_n}),
                                   narrow({num_m, num_k}), narrow({num_n, num_k})};
    const OpFn backward = [](const auto& t) {
      ops::matmul_backward(t[0], t[1], t[2], t[3], t[4], t[5]);
    };
    const OpFn no_dinp = [](const auto& t) {
      ops::matmul_backward(Tensor(), t[1], t[2], t[3], t[4], t[5]);
    };
    expect_steps("matmul_backward f32 dweight, dbias, twice", dt, bwd, {backward, backward}, 45);
    expect_steps("matmul_backward f32 dweight, dbias, no dinp, twice", dt, bwd, {no_dinp, no_dinp},
                 46);
    const OpFn wgrad = [](const auto& t) { ops::gemm(t[0], t[1], t[2], true, false, 1.0f, 1.0f); };
    expect_steps("gemm dW += dout^T x into f32, twice", dt,
                 {f32({num_n, num_k}), narrow({num_m, num_n}), narrow({num_m, num_k})},
                 {wgrad, wgrad}, 47);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Matmul, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kN = 10, kC = 19, kF = 23;
  const HostTensor x2 = randn(DType::f32, {kN, kC}, rng);
  const HostTensor weight = randn(DType::f32, {kF, kC}, rng), bias = randn(DType::f32, {kF}, rng);
  const HostTensor dmm = randn(DType::f32, {kN, kF}, rng);
  Guarded mm({kN, kF}), mm_dinp({kN, kC}), mm_dw({kF, kC}), mm_db({kF});
  cpu::matmul_forward(mm, x2, weight, bias);
  cpu::matmul_backward(mm_dinp, mm_dw, mm_db, dmm, x2, weight);
  for (const Guarded* g : {&mm, &mm_dinp, &mm_dw, &mm_db}) g->expect_guards_intact("matmul");
  // gemm into a view with guards, every transpose pair, beta reading c.
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const HostTensor ga = randn(DType::f32, ta ? Shape{kC, kN} : Shape{kN, kC}, rng);
    const HostTensor gb = randn(DType::f32, tb ? Shape{kF, kC} : Shape{kC, kF}, rng);
    Guarded c({kN, kF});
    cpu::gemm(c, ga, gb, ta, tb, 1.5f, 0.5f);
    c.expect_guards_intact("gemm");
  }
}

constexpr int64_t kRows = 300, kCols = 200;  // 60000 elements, above kMinParallelWork

TEST(Matmul, GemmReferenceAndBiasGradientAreThreadCountIndependent) {
  std::mt19937_64 rng(83);
  const HostTensor a = randn(DType::f32, {70, 90}, rng), b = randn(DType::f32, {60, 90}, rng);
  HostTensor c = randn(DType::f32, {70, 60}, rng);
  expect_thread_independent("gemm_reference", {&c},
                            [&] { cpu::gemm_reference(c, a, b, false, true, 1.5f, 0.5f); });
  const HostTensor inp = randn(DType::f32, {kRows, 8}, rng), w = randn(DType::f32, {kCols, 8}, rng);
  const HostTensor dout = randn(DType::f32, {kRows, kCols}, rng);
  HostTensor dw(DType::f32, {kCols, 8}), dbias = randn(DType::f32, {kCols}, rng);
  // dbias only: dinp and dweight go through BLAS, which may block differently per thread count.
  expect_thread_independent("matmul_backward dbias", {&dbias},
                            [&] { cpu::matmul_backward(Tensor(), dw, dbias, dout, inp, w); });
}

TEST(Matmul, ForwardIsThreadCountIndependent) {
  std::mt19937_64 rng(86);
  // The plain-loop path (f64, never BLAS) splits rows across threads: each output has one writer.
  const HostTensor inp = randn(DType::f64, {kRows, 40}, rng),
                   w = randn(DType::f64, {kCols, 40}, rng);
  const HostTensor bias = randn(DType::f64, {kCols}, rng);
  HostTensor out(DType::f64, {kRows, kCols});
  expect_thread_independent("matmul_forward f64", {&out},
                            [&] { cpu::matmul_forward(out, inp, w, bias); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/matmul.cu, gemm_lt.cu)
// ----------------------------------------------------------------

namespace tessera::testing::gpu_cases {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// Relative L2 bounds against the CPU result, which accumulates in double on the same inputs:
//  f32: cuBLASLt accumulates in f32 (CUBLAS_COMPUTE_32F, never TF32); the rounding error of a
//       K-term sum grows like sqrt(K) * 2^-24 ~ 2e-6 at K = 1025 (split-K changes the order, not
//       the size). 1e-5 is 5x that; TF32 (10-bit mantissa, ~3e-4) would fail it.
//  bf16: the output is rounded to bf16: at most 2^-9 relative per element, RMS 2^-9/sqrt(3) =
//       1.1e-3; f32 accumulation adds ~1e-6. Outputs rounded twice (the separate bias pass, a
//       parameter gradient accumulated over two calls) and terms that cancel (beta*c, bias,
//       prefill) raise that: measured at most 2.8e-3 over 64+ elements (H200), bound 4e-3.
//       Outputs of fewer than 64 elements get no averaging: the worst case of two roundings,
//       2 * 2^-9 = 3.9e-3 of the (possibly larger) intermediates, measured at most 4.8e-3
//       (a single dweight element, prefill + 2 gradients): bound 8e-3.
//  f16: the same roundings at 2^-11 instead of 2^-9 (10 mantissa bits to bf16's 7), products
//       accumulated in f32 (CUBLAS_COMPUTE_32F, never 16F): bf16's measured 2.8e-3 and 4.8e-3
//       scale to ~7e-4 and ~1.2e-3; bounds 1.5e-3 and 2.5e-3 (not yet measured on a GPU). The
//       largest values here (K = 1025 sums of unit products, ~32 std; dweight over 4097 rows,
//       ~64 std, twice) are far inside f16's range (65504).
constexpr double kBoundF32 = 1e-5;
constexpr double kBoundBf16 = 4e-3;
constexpr double kBoundBf16Tiny = 8e-3;
constexpr double kBoundF16 = 1.5e-3;
constexpr double kBoundF16Tiny = 2.5e-3;
constexpr size_t kTinyOutput = 64;
double bound(DType t, size_t numel) {
  if (t == DType::f32) return kBoundF32;
  if (t == DType::f16) return numel < kTinyOutput ? kBoundF16Tiny : kBoundF16;
  return numel < kTinyOutput ? kBoundBf16Tiny : kBoundBf16;
}

size_t elem_size(DType t) { return t == DType::f32 ? 4 : 2; }

// A device tensor of `shape` that starts `offset` elements into a guarded allocation, so its
// pointer is only elem_size-aligned when offset is odd.
struct OffsetTensor {
  DeviceTensor storage;
  Shape shape;
  int64_t offset;
  OffsetTensor(DType dtype, Shape s, int64_t off)
      : storage(dtype, Shape{s.numel() + off}), shape(s), offset(off) {}
  Tensor t() const {
    const Tensor whole = storage.t();
    return Tensor(static_cast<char*>(whole.data) + offset * elem_size(whole.dtype), whole.dtype,
                  Device::cuda, shape);
  }
  void upload(const std::vector<float>& v) {
    std::vector<float> padded(offset, 0.0f);
    padded.insert(padded.end(), v.begin(), v.end());
    storage.upload(padded);
  }
  std::vector<float> download() const {
    std::vector<float> all = storage.download();
    return std::vector<float>(all.begin() + offset, all.end());
  }
};

void report(const std::string& what, double err, double limit) {
  std::printf("measured %-60s rel_l2 %.3e (bound %.1e)\n", what.c_str(), err, limit);
}

void expect_close_within(const std::vector<float>& got, const std::vector<float>& ref, double limit,
                         const std::string& what) {
  expect_same_nonfinite(got, ref, what.c_str());
  const double err = rel_l2(got, ref);
  report(what, err, limit);
  EXPECT_LE(err, limit) << what;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, DType dtype,
                  const std::string& what) {
  expect_close_within(got, ref, bound(dtype, ref.size()), what);
}

struct Dims {
  int64_t m, n, k;
};

const Dims kGemmShapes[] = {{1, 1, 1},        {1, 7, 33},      {7, 1, 33},     {33, 7, 1},
                            {7, 33, 1025},    {1025, 33, 7},   {33, 1025, 33}, {1025, 1025, 33},
                            {128, 256, 1025}, {1, 1025, 1025}, {1025, 1, 1025}};

std::string gemm_name(const char* engine, DType dtype, Dims d, bool ta, bool tb, float alpha,
                      float beta) {
  return fmt::format("{} {} m{} n{} k{} {}{} a{} b{}", engine, dtype_name(dtype), d.m, d.n, d.k,
                     ta ? 'T' : 'N', tb ? 'T' : 'N', alpha, beta);
}

// c = alpha op(a) op(b) + beta c on the GPU vs gemm_reference. beta = 0 leaves c NaN-poisoned.
void check_gemm(DType dtype, Dims d, bool ta, bool tb, float alpha, float beta, bool simt,
                std::mt19937_64& rng) {
  const Shape sa = ta ? Shape{d.k, d.m} : Shape{d.m, d.k};
  const Shape sb = tb ? Shape{d.n, d.k} : Shape{d.k, d.n};
  const Shape sc{d.m, d.n};
  std::vector<float> a = round_to(dtype, random_vector(sa.numel(), rng));
  std::vector<float> b = round_to(dtype, random_vector(sb.numel(), rng));
  std::vector<float> c = round_to(dtype, random_vector(sc.numel(), rng));
  DeviceTensor da(dtype, sa), db(dtype, sb), dc(dtype, sc);
  da.upload(a);
  db.upload(b);
  if (beta != 0.0f) dc.upload(c);
  if (simt) {
#ifdef TESSERA_CUDA
    cuda::gemm_simt(dc, da, db, ta, tb, alpha, beta);  // the fallback kernel, directly
#else
    FAIL() << "gemm_simt exists in CUDA builds only";
#endif
  } else {
    ops::gemm(dc, da, db, ta, tb, alpha, beta);
  }
  const std::vector<float> got = dc.download();
  cpu::gemm_reference(host(c, sc), host(a, sa), host(b, sb), ta, tb, alpha, beta);
  expect_close(got, c, dtype,
               gemm_name(simt ? "gemm_simt" : "gemm", dtype, d, ta, tb, alpha, beta));
  EXPECT_TRUE(dc.guards_intact());
}

TS_GPU_PARITY_TEST(Gemm, ParityAllTransposes, "gemm") {
  std::mt19937_64 rng(1);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Dims& d : kGemmShapes)
      for (int t = 0; t < 4; ++t) {
        check_gemm(dtype, d, t & 1, t & 2, 1.25f, 0.0f, false, rng);
        check_gemm(dtype, d, t & 1, t & 2, -0.75f, 0.5f, false, rng);
      }
}

TS_GPU_TEST(Gemm, FallbackKernelParity) {
  std::mt19937_64 rng(2);
  const Dims shapes[] = {{1, 1, 1}, {7, 33, 1025}, {1025, 33, 7}, {65, 130, 17}};
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Dims& d : shapes)
      for (int t = 0; t < 4; ++t) {
        check_gemm(dtype, d, t & 1, t & 2, 1.0f, 0.0f, true, rng);
        check_gemm(dtype, d, t & 1, t & 2, 0.5f, -1.5f, true, rng);
      }
}

TS_GPU_TEST(Gemm, MisalignedOperands) {
  std::mt19937_64 rng(3);
  // a, b and c one element past 256-byte alignment: cuBLASLt must be asked for algorithms that
  // accept 2- or 4-byte alignment, or the call falls back to our kernel.
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const Dims d{33, 40, 72};
    OffsetTensor a(dtype, {d.m, d.k}, 1), b(dtype, {d.n, d.k}, 1), c(dtype, {d.m, d.n}, 1);
    std::vector<float> ha = round_to(dtype, random_vector(d.m * d.k, rng));
    std::vector<float> hb = round_to(dtype, random_vector(d.n * d.k, rng));
    std::vector<float> hc = round_to(dtype, random_vector(d.m * d.n, rng));
    a.upload(ha);
    b.upload(hb);
    c.upload(hc);
    ops::gemm(c.t(), a.t(), b.t(), false, true, 1.0f, 1.0f);
    const std::vector<float> got = c.download();
    cpu::gemm_reference(host(hc, {d.m, d.n}), host(ha, {d.m, d.k}), host(hb, {d.n, d.k}), false,
                        true, 1.0f, 1.0f);
    expect_close(got, hc, dtype, fmt::format("gemm misaligned {}", dtype_name(dtype)));
    EXPECT_TRUE(c.storage.guards_intact());
  }
}

TS_GPU_TEST(Gemm, AlphaZeroAndEmptyK) {
  std::mt19937_64 rng(4);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const Shape sc{7, 33};
    const std::vector<float> c0 = round_to(dtype, random_vector(sc.numel(), rng));
    // a and b stay NaN-poisoned: alpha = 0 must not read them.
    DeviceTensor a(dtype, {7, 5}), b(dtype, {5, 33}), c(dtype, sc);
    c.upload(c0);
    ops::gemm(c, a, b, false, false, 0.0f, 0.5f);
    std::vector<float> got = c.download();
    // 0.5 c is exact except for f16 subnormals, which it rounds (once, to nearest even).
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], round_to(dtype, {0.5f * c0[i]})[0]) << i;
    ops::gemm(c, a, b, false, false, 0.0f, 0.0f);
    got = c.download();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], 0.0f) << i;
    // K = 0: the product is empty, c = beta * c.
    DeviceTensor a0(dtype, {7, 0}), b0(dtype, {0, 33});
    c.upload(c0);
    ops::gemm(c, a0, b0, false, false, 1.0f, 2.0f);
    got = c.download();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], 2.0f * c0[i]) << i;
    EXPECT_TRUE(c.guards_intact());
  }
}

#ifdef TESSERA_CUDA  // the plan cache is internal to the CUDA backend
TS_GPU_TEST(Gemm, PlansAreCachedAndResultsRepeat) {
  std::mt19937_64 rng(5);
  const Shape sa{19, 29}, sb{29, 23}, sc{19, 23};
  DeviceTensor a(DType::f32, sa), b(DType::f32, sb), c1(DType::f32, sc), c2(DType::f32, sc);
  a.upload(random_vector(sa.numel(), rng));
  b.upload(random_vector(sb.numel(), rng));
  ops::gemm(c1, a, b, false, false, 1.0f, 0.0f);
  const size_t plans = cuda::lt_gemm_plan_count();
  ops::gemm(c2, a, b, false, false, 1.0f, 0.0f);
  EXPECT_EQ(cuda::lt_gemm_plan_count(), plans) << "same shape and alignment: no new plan";
  EXPECT_EQ(c1.download(), c2.download()) << "same inputs must give bitwise equal results";
}
#endif

TS_GPU_TEST(Gemm, RejectsBadShapes) {
  DeviceTensor a(DType::f32, {4, 5}), b(DType::f32, {6, 7}), c(DType::f32, {4, 7});
  EXPECT_THROW(ops::gemm(c, a, b, false, false, 1.0f, 0.0f), Error);
  DeviceTensor bb(DType::bf16, {5, 7}), hb(DType::f16, {5, 7}), ha(DType::f16, {4, 5});
  EXPECT_THROW(ops::gemm(c, a, bb, false, false, 1.0f, 0.0f), Error);
  EXPECT_THROW(ops::gemm(c, a, hb, false, false, 1.0f, 0.0f), Error) << "f32 c, f16 b";
  DeviceTensor hc(DType::f16, {4, 7});
  EXPECT_THROW(ops::gemm(hc, ha, bb, false, false, 1.0f, 0.0f), Error) << "f16 a, bf16 b";
  DeviceTensor sq(DType::f32, {7, 7});
  EXPECT_THROW(ops::gemm(c, c, sq, false, false, 1.0f, 0.0f), Error) << "c aliases a";
}

// ---- matmul_forward / matmul_backward ----------------------------------------------------------

struct Linear {
  Shape inp;  // (..., K)
  int64_t n;
};

const Linear kLinearShapes[] = {{{1, 1}, 1},       {{7, 33}, 1025},      {{2, 5, 64}, 7},
                                {{1025, 33}, 8},   {{3, 40, 768}, 2304}, {{4097, 24}, 7},
                                {{4097, 16}, 1025}};

Shape with_last(Shape s, int64_t last) {
  s.dims[s.ndim - 1] = last;
  return s;
}

void check_forward(DType dtype, const Linear& l, bool with_bias, int64_t bias_offset,
                   std::mt19937_64& rng) {
  const int64_t k = l.inp[-1];
  const Shape so = with_last(l.inp, l.n), sw{l.n, k};
  std::vector<float> inp = round_to(dtype, random_vector(l.inp.numel(), rng));
  std::vector<float> w = round_to(dtype, random_vector(sw.numel(), rng, 0.1f));
  std::vector<float> bias = round_to(dtype, random_vector(l.n, rng));
  DeviceTensor di(dtype, l.inp), dw(dtype, sw), dout(dtype, so);
  OffsetTensor db(dtype, {l.n}, bias_offset);
  di.upload(inp);
  dw.upload(w);
  db.upload(bias);
  ops::matmul_forward(dout, di, dw, with_bias ? db.t() : Tensor());
  const std::vector<float> got = dout.download();
  std::vector<float> ref(so.numel());
  cpu::matmul_forward(host(ref, so), host(inp, l.inp), host(w, sw),
                      with_bias ? host(bias, {l.n}) : Tensor());
  expect_close(got, ref, dtype,
               fmt::format("matmul_forward {} inp {} n{} bias {} off {}", dtype_name(dtype),
                           l.inp.str(), l.n, with_bias, bias_offset));
  EXPECT_TRUE(dout.guards_intact());
}

TS_GPU_PARITY_TEST(Matmul, ForwardParity, "matmul_forward") {
  std::mt19937_64 rng(6);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Linear& l : kLinearShapes) {
      check_forward(dtype, l, false, 0, rng);
      check_forward(dtype, l, true, 0, rng);
      check_forward(dtype, l, true, 1, rng);  // misaligned bias: the separate bias pass
    }
}

// Backward twice from pre-filled parameter gradients: dweight and dbias must end at
// prefill + 2 * gradient (+= semantics), dinp at one gradient (overwrite).
void check_backward(DType dtype, const Linear& l, bool with_dinp, bool with_dbias,
                    std::mt19937_64& rng) {
  const int64_t k = l.inp[-1];
  const Shape so = with_last(l.inp, l.n), sw{l.n, k};
  std::vector<float> inp = round_to(dtype, random_vector(l.inp.numel(), rng));
  std::vector<float> w = round_to(dtype, random_vector(sw.numel(), rng, 0.1f));
  std::vector<float> dout = round_to(dtype, random_vector(so.numel(), rng));
  std::vector<float> dw = round_to(dtype, random_vector(sw.numel(), rng));
  std::vector<float> dbias = round_to(dtype, random_vector(l.n, rng));
  DeviceTensor g_inp(dtype, l.inp), g_w(dtype, sw), g_dout(dtype, so), g_dinp(dtype, l.inp),
      g_dw(dtype, sw), g_db(dtype, {l.n});
  g_inp.upload(inp);
  g_w.upload(w);
  g_dout.upload(dout);
  g_dw.upload(dw);
  g_db.upload(dbias);
  for (int rep = 0; rep < 2; ++rep)
    ops::matmul_backward(with_dinp ? g_dinp.t() : Tensor(), g_dw, with_dbias ? g_db.t() : Tensor(),
                         g_dout, g_inp, g_w);
  std::vector<float> dinp(l.inp.numel());
  for (int rep = 0; rep < 2; ++rep)
    cpu::matmul_backward(with_dinp ? host(dinp, l.inp) : Tensor(), host(dw, sw),
                         with_dbias ? host(dbias, {l.n}) : Tensor(), host(dout, so),
                         host(inp, l.inp), host(w, sw));
  const std::string name =
      fmt::format("matmul_backward {} inp {} n{}", dtype_name(dtype), l.inp.str(), l.n);
  if (with_dinp) {
    expect_close(g_dinp.download(), dinp, dtype, name + " dinp");
    EXPECT_TRUE(g_dinp.guards_intact());
  }
  expect_close(g_dw.download(), dw, dtype, name + " dweight");
  EXPECT_TRUE(g_dw.guards_intact());
  if (with_dbias) {
    expect_close(g_db.download(), dbias, dtype, name + " dbias");
    EXPECT_TRUE(g_db.guards_intact());
  }
}

TS_GPU_PARITY_TEST(Matmul, BackwardParityAccumulates, "matmul_backward") {
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Linear& l : kLinearShapes) {
      check_backward(dtype, l, true, true, rng);
      check_backward(dtype, l, false, false, rng);
    }
}

// FP32 main gradients (kernels/ops.h): dweight and dbias f32 beside bf16/f16 operands, pre-filled
// and accumulated twice (cuBLASLt with an f32 C/D and 16-bit A/B, CUBLAS_COMPUTE_32F; dbias by the
// column sums); dinp keeps the operands' dtype. Reference: the CPU in f32 on the same rounded
// inputs, twice. Bound for the f32 gradients (not yet measured on a GPU): f32 sums of up to 4097
// exact products, ~sqrt(M) 2^-24 = 4e-6 with round-to-nearest; 5e-5 also allows tensor-core
// accumulation that truncates its alignment shifts, and still fails by 40x a gradient rounded to
// bf16 (2^-9).
constexpr double kBoundMainGrad = 5e-5;

TS_GPU_PARITY_TEST(MatmulMainGrad, F32ParameterGradientsAccumulate, "matmul_backward") {
  std::mt19937_64 rng(10);
  for (DType dtype : {DType::bf16, DType::f16})
    for (const Linear& l : kLinearShapes) {
      const int64_t k = l.inp[-1];
      const Shape so = with_last(l.inp, l.n), sw{l.n, k};
      std::vector<float> inp = round_to(dtype, random_vector(l.inp.numel(), rng));
      std::vector<float> w = round_to(dtype, random_vector(sw.numel(), rng, 0.1f));
      std::vector<float> dout = round_to(dtype, random_vector(so.numel(), rng));
      std::vector<float> dw = random_vector(sw.numel(), rng), dbias = random_vector(l.n, rng);
      DeviceTensor g_inp(dtype, l.inp), g_w(dtype, sw), g_dout(dtype, so), g_dinp(dtype, l.inp),
          g_dw(DType::f32, sw), g_db(DType::f32, {l.n});
      g_inp.upload(inp);
      g_w.upload(w);
      g_dout.upload(dout);
      g_dw.upload(dw);
      g_db.upload(dbias);
      for (int rep = 0; rep < 2; ++rep)
        ops::matmul_backward(g_dinp, g_dw, g_db, g_dout, g_inp, g_w);
      std::vector<float> dinp(l.inp.numel());
      for (int rep = 0; rep < 2; ++rep)
        cpu::matmul_backward(host(dinp, l.inp), host(dw, sw), host(dbias, {l.n}), host(dout, so),
                             host(inp, l.inp), host(w, sw));
      const std::string name = fmt::format("matmul_backward {} inp {} n{}, f32 dweight/dbias",
                                           dtype_name(dtype), l.inp.str(), l.n);
      expect_close(g_dinp.download(), dinp, dtype, name + " dinp");
      expect_close_within(g_dw.download(), dw, kBoundMainGrad, name + " dweight");
      expect_close_within(g_db.download(), dbias, kBoundMainGrad, name + " dbias");
      EXPECT_TRUE(g_dinp.guards_intact() && g_dw.guards_intact() && g_db.guards_intact());
    }
}

// gemm into an f32 c from bf16/f16 a and b (the weight-gradient GEMM of an FP32 main gradient,
// dW (N,K) += dout^T (N,M) x (M,K), is trans_a with beta = 1), every transpose pair, beta 0 and 1,
// on cuBLASLt and on the fallback kernel; bound as above.
TS_GPU_PARITY_TEST(GemmMainGrad, F32OutputFromSixteenBitOperands, "gemm") {
  std::mt19937_64 rng(11);
  for (DType dtype : {DType::bf16, DType::f16})
    for (const Dims& d : kGemmShapes)
      for (int t = 0; t < 4; ++t)
        for (float beta : {0.0f, 1.0f})
          for (bool simt : {false, true}) {
#ifndef TESSERA_CUDA
            if (simt) continue;  // the fallback kernel is internal to CUDA builds
#endif
            const bool ta = t & 1, tb = t & 2;
            const Shape sa = ta ? Shape{d.k, d.m} : Shape{d.m, d.k};
            const Shape sb = tb ? Shape{d.n, d.k} : Shape{d.k, d.n};
            const Shape sc{d.m, d.n};
            std::vector<float> a = round_to(dtype, random_vector(sa.numel(), rng));
            std::vector<float> b = round_to(dtype, random_vector(sb.numel(), rng));
            std::vector<float> c = random_vector(sc.numel(), rng);  // f32: not rounded
            DeviceTensor da(dtype, sa), db(dtype, sb), dc(DType::f32, sc);
            da.upload(a);
            db.upload(b);
            if (beta != 0.0f) dc.upload(c);
            if (simt) {
#ifdef TESSERA_CUDA
              cuda::gemm_simt(dc, da, db, ta, tb, 1.0f, beta);
#endif
            } else {
              ops::gemm(dc, da, db, ta, tb, 1.0f, beta);
            }
            const std::vector<float> got = dc.download();
            cpu::gemm_reference(host(c, sc), host(a, sa), host(b, sb), ta, tb, 1.0f, beta);
            expect_close_within(
                got, c, kBoundMainGrad,
                gemm_name(simt ? "gemm_simt" : "gemm", dtype, d, ta, tb, 1.0f, beta) + " f32 c");
            EXPECT_TRUE(dc.guards_intact());
          }
}

TS_GPU_TEST(Matmul, DbiasIsDeterministic) {
  std::mt19937_64 rng(8);
  const Shape si{5000, 16}, sw{300, 16}, so{5000, 300};
  DeviceTensor inp(DType::f32, si), w(DType::f32, sw), dout(DType::f32, so);
  inp.upload(random_vector(si.numel(), rng));
  w.upload(random_vector(sw.numel(), rng));
  dout.upload(random_vector(so.numel(), rng));
  std::vector<std::vector<float>> results;
  for (int rep = 0; rep < 2; ++rep) {
    DeviceTensor dw(DType::f32, sw), db(DType::f32, {300});
    dw.upload(std::vector<float>(sw.numel(), 0.0f));
    db.upload(std::vector<float>(300, 0.0f));
    ops::matmul_backward(Tensor(), dw, db, dout, inp, w);
    results.push_back(db.download());
  }
  EXPECT_EQ(results[0], results[1]);
}

}  // namespace
}  // namespace tessera::testing::gpu_cases
