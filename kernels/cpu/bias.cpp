// CPU reference of bias_add and bias_grad (kernels/ops.h): the bias add of matmul_forward and the
// dbias reduction of matmul_backward as ops of their own, for GEMMs without a bias epilogue
// (ops::gemm_fp8). bf16/f16 operands arrive widened to f32 (kernels/cpu/narrow.h).
// Shape letters: M rows (all leading dims flattened), N columns (out features).
#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

namespace {

// bias / dbias: (N), host, and the op's dtype or f32 (an f32 master copy beside f64 tensors).
void check_vector(const Tensor& t, DType dtype, int64_t n, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == dtype || t.dtype == DType::f32, "{}: {} is {}, expected {} or f32", op, name,
           t.str(), dtype_name(dtype));
  check_shape(t, Shape{n}, op, name);
}

// Runs fn(T{}, V{}) for the (matrix, vector) dtype pair, each float (f32) or double (f64).
template <class Fn>
void dispatch_pair(DType matrix, DType vector, const char* op, Fn&& fn) {
  dispatch_float(matrix, op, [&](auto matrix_zero) {
    dispatch_float(vector, op, [&](auto vector_zero) { fn(matrix_zero, vector_zero); });
  });
}

}  // namespace

void bias_add(Tensor out, Tensor bias) {
  constexpr const char* kOp = "bias_add";
  check_compute_dtype(out, kOp, "out");
  TS_CHECK(out.ndim() >= 1, "{}: out must be (..., N), got {}", kOp, out.str());
  const int64_t n = out.dim(-1), m = num_rows(out);
  check_vector(bias, out.dtype, n, kOp, "bias");
  TS_CHECK(!overlaps(out, bias), "{}: out {} overlaps bias {}", kOp, out.str(), bias.str());
  dispatch_pair(out.dtype, bias.dtype, kOp, [&](auto out_zero, auto bias_zero) {
    using T = decltype(out_zero);
    using TB = decltype(bias_zero);
    T* o = out.ptr<T>();
    const TB* b = bias.ptr<TB>();
    // The sum of two floats formed in double and rounded to float is the correctly rounded float
    // sum, so this equals the CUDA kernel's f32 add bit for bit.
#pragma omp parallel for schedule(static) if (m * n > kMinParallelWork)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        o[i * n + j] = static_cast<T>(double(o[i * n + j]) + double(b[j]));
  });
}

void bias_grad(Tensor dbias, Tensor dout) {
  constexpr const char* kOp = "bias_grad";
  check_compute_dtype(dout, kOp, "dout");
  TS_CHECK(dout.ndim() >= 1, "{}: dout must be (..., N), got {}", kOp, dout.str());
  const int64_t n = dout.dim(-1), m = num_rows(dout);
  check_vector(dbias, dout.dtype, n, kOp, "dbias");
  TS_CHECK(!overlaps(dbias, dout), "{}: dbias {} overlaps dout {}", kOp, dbias.str(), dout.str());
  dispatch_pair(dout.dtype, dbias.dtype, kOp, [&](auto dout_zero, auto dbias_zero) {
    using T = decltype(dout_zero);
    using TD = decltype(dbias_zero);
    const T* d = dout.ptr<T>();
    // Each column in double over rows 0..M-1 in order, then dbias + sum rounded once: the same
    // helper and order as matmul_backward's dbias, so the two agree bit for bit.
    accumulate_column_sums(dbias.ptr<TD>(), m, n,
                           [&](int64_t i, int64_t j) { return static_cast<double>(d[i * n + j]); });
  });
}

}  // namespace tessera::cpu
