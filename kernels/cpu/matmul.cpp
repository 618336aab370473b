// CPU GEMM and the linear layer built on it: gemm (CBLAS when the build has it, otherwise the
// plain loop), gemm_reference (the plain loop, kernels/cpu/gemm_reference.h), matmul_forward and
// matmul_backward. Shapes: M rows (all leading dims of inp flattened), K in-features, N out.
// Hazard: through CBLAS the result may depend on the BLAS library's blocking and thread count;
// that is accepted for the fast path, and gemm_reference is the deterministic baseline.
#include <climits>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/gemm_reference.h"

#ifdef TESSERA_HAVE_CBLAS
#include <cblas.h>
#include <omp.h>
#endif

namespace tessera::cpu {

namespace {

struct GemmDims {
  int64_t m = 0, n = 0, k = 0;
};

GemmDims check_gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                    const char* op) {
  check_compute_dtype(c, op, "c");
  check_float(a, c.dtype, op, "a");
  check_float(b, c.dtype, op, "b");
  TS_CHECK(c.ndim() == 2 && a.ndim() == 2 && b.ndim() == 2,
           "{}: c, a and b must be 2-D, got c {}, a {}, b {}", op, c.str(), a.str(), b.str());
  GemmDims d;
  d.m = c.dim(0);
  d.n = c.dim(1);
  d.k = trans_a ? a.dim(0) : a.dim(1);
  check_shape(a, trans_a ? Shape{d.k, d.m} : Shape{d.m, d.k}, op, trans_a ? "a (K,M)" : "a (M,K)");
  check_shape(b, trans_b ? Shape{d.n, d.k} : Shape{d.k, d.n}, op, trans_b ? "b (N,K)" : "b (K,N)");
  TS_CHECK(!overlaps(c, a) && !overlaps(c, b), "{}: c must not alias a or b", op);
  return d;
}

// Element (i, p) of op(a) is a[i * a_row + p * a_col]; element (p, j) of op(b) likewise.
template <class T>
void gemm_loops(T* c, const T* a, const T* b, GemmDims d, bool trans_a, bool trans_b, double alpha,
                double beta) {
  const int64_t m = d.m, n = d.n, k = d.k;
  const int64_t a_row = trans_a ? 1 : k, a_col = trans_a ? m : 1;
#pragma omp parallel for schedule(static) if (m * n * k > kMinParallelWork)
  for (int64_t i = 0; i < m; ++i) {
    std::vector<double> acc(n, 0.0);
    // Both loop orders add the terms of each acc[j] in increasing p, so they agree bitwise; the
    // order is picked only so that the inner loop walks b contiguously.
    if (alpha != 0.0 && trans_b) {  // op(b)(p, j) = b[j * k + p]: dot products along rows of b
      for (int64_t j = 0; j < n; ++j) {
        const T* b_j = b + j * k;
        double sum = 0.0;
        for (int64_t p = 0; p < k; ++p) sum += double(a[i * a_row + p * a_col]) * double(b_j[p]);
        acc[j] = sum;
      }
    } else if (alpha != 0.0) {  // op(b)(p, j) = b[p * n + j]: sweep rows of b
      for (int64_t p = 0; p < k; ++p) {
        const double a_ip = a[i * a_row + p * a_col];
        const T* b_p = b + p * n;
        for (int64_t j = 0; j < n; ++j) acc[j] += a_ip * double(b_p[j]);
      }
    }
    T* c_i = c + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const double old = beta == 0.0 ? 0.0 : beta * double(c_i[j]);  // beta = 0: c may be garbage
      c_i[j] = static_cast<T>(alpha * acc[j] + old);
    }
  }
}

#ifdef TESSERA_HAVE_CBLAS
// BLAS threads and the OpenMP threads of the other kernels would oversubscribe the cores (each pool
// spins while the other works: measured 30% slower on 2 cores). So BLAS runs single-threaded and
// large GEMMs are split here over row blocks of c, one BLAS call per OpenMP thread. Each element of
// c is still computed by one call with the same K loop, so the split does not change results.
void single_threaded_blas() {
#ifdef OPENBLAS_VERSION
  static const bool once = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
#endif
}

template <class T>
void gemm_blas(T* c, const T* a, const T* b, GemmDims d, bool trans_a, bool trans_b, float alpha,
               float beta) {
  if (d.m == 0 || d.n == 0) return;
  single_threaded_blas();
  const int m = int(d.m), n = int(d.n), k = int(d.k);
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  // Leading dimensions of the row-major operands as stored; BLAS rejects 0 even for empty ones.
  const int lda = std::max(1, trans_a ? m : k);
  const int ldb = std::max(1, trans_b ? k : n);
  const auto call = [&](int i0, int rows) {
    // Row i of op(a) starts at a + i * lda (stored as is) or at column i (stored transposed).
    const T* a_i = a + (trans_a ? int64_t(i0) : int64_t(i0) * lda);
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, ta, tb, rows, n, k, alpha, a_i, lda, b, ldb, beta,
                  c + int64_t(i0) * n, n);
    else
      cblas_dgemm(CblasRowMajor, ta, tb, rows, n, k, alpha, a_i, lda, b, ldb, beta,
                  c + int64_t(i0) * n, n);
  };
  const int64_t work = int64_t(m) * n * std::max(k, 1);
  const int num_blocks = work < (int64_t(1) << 20) ? 1 : std::min(m, omp_get_max_threads());
  if (num_blocks <= 1) return call(0, m);
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < num_blocks; ++blk) {
    const int i0 = int(int64_t(m) * blk / num_blocks),
              i1 = int(int64_t(m) * (blk + 1) / num_blocks);
    if (i1 > i0) call(i0, i1 - i0);
  }
}
#endif

}  // namespace

void gemm_reference(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
                    float beta) {
  const GemmDims d = check_gemm(c, a, b, trans_a, trans_b, "gemm_reference");
  dispatch_float(c.dtype, "gemm_reference", [&](auto zero) {
    using T = decltype(zero);
    gemm_loops<T>(c.ptr<T>(), a.ptr<T>(), b.ptr<T>(), d, trans_a, trans_b, alpha, beta);
  });
}

void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta) {
#ifdef TESSERA_HAVE_CBLAS
  const GemmDims d = check_gemm(c, a, b, trans_a, trans_b, "gemm");
  if (alpha == 0.0f) {  // OpenBLAS would still form 0 * a * b and let NaN/Inf in a or b through
    gemm_reference(c, a, b, trans_a, trans_b, alpha, beta);
    return;
  }
  TS_CHECK(d.m <= INT_MAX && d.n <= INT_MAX && d.k <= INT_MAX,
           "gemm: sizes M={} N={} K={} exceed the 32-bit BLAS interface", d.m, d.n, d.k);
  dispatch_float(c.dtype, "gemm", [&](auto zero) {
    using T = decltype(zero);
    gemm_blas<T>(c.ptr<T>(), a.ptr<T>(), b.ptr<T>(), d, trans_a, trans_b, alpha, beta);
  });
#else
  gemm_reference(c, a, b, trans_a, trans_b, alpha, beta);
#endif
}

void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias) {
  constexpr const char* kOp = "matmul_forward";
  check_compute_dtype(out, kOp, "out");
  check_float(inp, out.dtype, kOp, "inp");
  check_float(weight, out.dtype, kOp, "weight");
  TS_CHECK(weight.ndim() == 2, "{}: weight must be (N, K), got {}", kOp, weight.str());
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., K), got {}", kOp, inp.str());
  const int64_t n = weight.dim(0), k = weight.dim(1), m = num_rows(inp);
  TS_CHECK(inp.dim(-1) == k, "{}: inp {} does not end in K={} of weight {}", kOp, inp.str(), k,
           weight.str());
  Shape out_shape = inp.shape;
  out_shape.dims[out_shape.ndim - 1] = n;
  check_shape(out, out_shape, kOp, "out");
  if (!bias.empty()) {
    check_like(bias, out.dtype, Shape{n}, kOp, "bias");
  }

  gemm(out.view({m, n}), inp.view({m, k}), weight, false, true, 1.0f, 0.0f);
  if (bias.empty()) return;
  dispatch_float(out.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    T* o = out.ptr<T>();
    const T* b = bias.ptr<T>();
#pragma omp parallel for schedule(static) if (m * n > kMinParallelWork)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) o[i * n + j] += b[j];
  });
}

void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                     Tensor weight) {
  constexpr const char* kOp = "matmul_backward";
  check_compute_dtype(dout, kOp, "dout");
  check_float(inp, dout.dtype, kOp, "inp");
  check_float(weight, dout.dtype, kOp, "weight");
  check_float(dweight, dout.dtype, kOp, "dweight");
  TS_CHECK(weight.ndim() == 2, "{}: weight must be (N, K), got {}", kOp, weight.str());
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., K), got {}", kOp, inp.str());
  const int64_t n = weight.dim(0), k = weight.dim(1), m = num_rows(inp);
  TS_CHECK(inp.dim(-1) == k, "{}: inp {} does not end in K={} of weight {}", kOp, inp.str(), k,
           weight.str());
  Shape dout_shape = inp.shape;
  dout_shape.dims[dout_shape.ndim - 1] = n;
  check_shape(dout, dout_shape, kOp, "dout");
  check_shape(dweight, weight.shape, kOp, "dweight");
  if (!dinp.empty()) {
    check_like(dinp, dout.dtype, inp.shape, kOp, "dinp");
  }
  if (!dbias.empty()) {
    check_like(dbias, dout.dtype, Shape{n}, kOp, "dbias");
  }

  const Tensor dout_2d = dout.view({m, n});
  if (!dinp.empty()) gemm(dinp.view({m, k}), dout_2d, weight, false, false, 1.0f, 0.0f);
  gemm(dweight, dout_2d, inp.view({m, k}), true, false, 1.0f, 1.0f);  // dweight += dout^T inp
  if (dbias.empty()) return;
  dispatch_float(dout.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* d = dout.ptr<T>();
    accumulate_column_sums(dbias.ptr<T>(), m, n,
                           [&](int64_t i, int64_t j) { return double(d[i * n + j]); });
  });
}

}  // namespace tessera::cpu
