// gemm (CBLAS fast path vs the plain-loop reference), matmul_forward and matmul_backward: exact
// small products, awkward shapes in all four transpose combinations, finite-difference gradients
// in f64, accumulation, the empty-dinp skip, NaN propagation and f32/f64 agreement.
// Shape letters: M rows, K in-features, N out-features.
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/gemm_reference.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

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
// kernels_a_util.h); any wrong index errs by O(1).
TEST(Matmul, GradientsMatchFiniteDifferences) {
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

}  // namespace
}  // namespace tessera::testing
