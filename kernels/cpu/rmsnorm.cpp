// CPU RMSNorm over the last dim: out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps).
// Shapes: N rows (all leading dims of inp flattened; N = B*T*H for QK-norm), C channels.
// rstd (N elements) is saved as f32, or as f64 when the op computes in f64 (exact
// finite-difference tests).
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps) {
  constexpr const char* kOp = "rmsnorm_forward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = cpu::num_rows(inp);
  check_like(out, inp.dtype, inp.shape, kOp, "out");
  check_like(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  check_stat(rstd, inp.dtype, num_rows, kOp, "rstd");
  TS_CHECK(eps >= 0.0f, "{}: eps must be >= 0, got {}", kOp, eps);

  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    const T* w = weight.ptr<T>();
    T* o = out.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t row = 0; row < num_rows; ++row) {
      const T* x_row = x + row * num_c;
      double sum_sq = 0.0;
      for (int64_t c = 0; c < num_c; ++c) sum_sq += double(x_row[c]) * double(x_row[c]);
      const double s = 1.0 / std::sqrt(sum_sq / double(num_c) + double(eps));
      T* o_row = o + row * num_c;
      for (int64_t c = 0; c < num_c; ++c) o_row[c] = T(double(x_row[c]) * s * double(w[c]));
      store_stat(rstd, row, s);
    }
  });
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight,
                      Tensor rstd) {
  constexpr const char* kOp = "rmsnorm_backward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = cpu::num_rows(inp);
  check_like(dinp, inp.dtype, inp.shape, kOp, "dinp");
  check_like(dout, inp.dtype, inp.shape, kOp, "dout");
  check_like(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  check_like(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");
  check_stat(rstd, inp.dtype, num_rows, kOp, "rstd");
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);

  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    const T* w = weight.ptr<T>();
    const T* d = dout.ptr<T>();
    T* dx = dinp.ptr<T>();

    // dweight first (it reads dout), accumulated (+=) in a fixed order.
    accumulate_column_sums(dweight.ptr<T>(), num_rows, num_c, [&](int64_t row, int64_t c) {
      return double(d[row * num_c + c]) * double(x[row * num_c + c]) * load_stat(rstd, row);
    });

    // dinp = rstd * (dnorm - norm * mean(dnorm * norm)), norm = x * rstd, dnorm = dout * weight.
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t row = 0; row < num_rows; ++row) {
      const T* x_row = x + row * num_c;
      const T* d_row = d + row * num_c;
      const double s = load_stat(rstd, row);
      double sum_dnorm_norm = 0.0;
      for (int64_t c = 0; c < num_c; ++c)
        sum_dnorm_norm += double(d_row[c]) * double(w[c]) * double(x_row[c]) * s;
      const double mean_dnorm_norm = sum_dnorm_norm / double(num_c);
      T* dx_row = dx + row * num_c;
      for (int64_t c = 0; c < num_c; ++c) {
        const double dnorm = double(d_row[c]) * double(w[c]);
        dx_row[c] = T(s * (dnorm - double(x_row[c]) * s * mean_dnorm_norm));
      }
    }
  });
}

}  // namespace tessera::cpu
