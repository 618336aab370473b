// CPU LayerNorm over the last dim: out = (x - mean) * rstd * weight + bias.
// Shapes: N rows (all leading dims of inp flattened), C channels. mean and rstd (N elements) are
// saved for backward as f32, or as f64 when the op computes in f64 (exact finite-difference
// tests); the forward uses the unrounded double statistics, the backward the saved ones.
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias,
                       float eps) {
  constexpr const char* kOp = "layernorm_forward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = cpu::num_rows(inp);
  check_like(out, inp.dtype, inp.shape, kOp, "out");
  check_like(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  if (!bias.empty()) {
    check_like(bias, inp.dtype, Shape{num_c}, kOp, "bias");
  }
  check_stat(mean, inp.dtype, num_rows, kOp, "mean");
  check_stat(rstd, inp.dtype, num_rows, kOp, "rstd");
  TS_CHECK(eps >= 0.0f, "{}: eps must be >= 0, got {}", kOp, eps);

  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    const T* w = weight.ptr<T>();
    const T* b = bias.empty() ? nullptr : bias.ptr<T>();
    T* o = out.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t row = 0; row < num_rows; ++row) {
      const T* x_row = x + row * num_c;
      double sum = 0.0;
      for (int64_t c = 0; c < num_c; ++c) sum += x_row[c];
      const double m = sum / double(num_c);
      double sum_sq = 0.0;  // two passes: no cancellation from E[x^2] - E[x]^2
      for (int64_t c = 0; c < num_c; ++c) sum_sq += (x_row[c] - m) * (x_row[c] - m);
      const double s = 1.0 / std::sqrt(sum_sq / double(num_c) + double(eps));
      T* o_row = o + row * num_c;
      for (int64_t c = 0; c < num_c; ++c) {
        const double y = (x_row[c] - m) * s * double(w[c]);
        o_row[c] = T(b == nullptr ? y : y + double(b[c]));
      }
      store_stat(mean, row, m);
      store_stat(rstd, row, s);
    }
  });
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd) {
  constexpr const char* kOp = "layernorm_backward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = cpu::num_rows(inp);
  check_like(dinp, inp.dtype, inp.shape, kOp, "dinp");
  check_like(dout, inp.dtype, inp.shape, kOp, "dout");
  check_like(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  check_like(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");
  if (!dbias.empty()) {
    check_like(dbias, inp.dtype, Shape{num_c}, kOp, "dbias");
  }
  check_stat(mean, inp.dtype, num_rows, kOp, "mean");
  check_stat(rstd, inp.dtype, num_rows, kOp, "rstd");
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);

  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    const T* w = weight.ptr<T>();
    const T* d = dout.ptr<T>();
    T* dx = dinp.ptr<T>();

    // Parameter gradients first (they read dout), accumulated (+=) in a fixed order.
    auto norm = [&](int64_t row, int64_t c) {
      return (x[row * num_c + c] - load_stat(mean, row)) * load_stat(rstd, row);
    };
    accumulate_column_sums(dweight.ptr<T>(), num_rows, num_c, [&](int64_t row, int64_t c) {
      return double(d[row * num_c + c]) * norm(row, c);
    });
    if (!dbias.empty()) {
      accumulate_column_sums(dbias.ptr<T>(), num_rows, num_c,
                             [&](int64_t row, int64_t c) { return double(d[row * num_c + c]); });
    }

    // dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight.
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t row = 0; row < num_rows; ++row) {
      const T* x_row = x + row * num_c;
      const T* d_row = d + row * num_c;
      const double m = load_stat(mean, row), s = load_stat(rstd, row);
      double sum_dnorm = 0.0, sum_dnorm_norm = 0.0;
      for (int64_t c = 0; c < num_c; ++c) {
        const double dnorm = double(d_row[c]) * double(w[c]);
        sum_dnorm += dnorm;
        sum_dnorm_norm += dnorm * (x_row[c] - m) * s;
      }
      const double mean_dnorm = sum_dnorm / double(num_c);
      const double mean_dnorm_norm = sum_dnorm_norm / double(num_c);
      T* dx_row = dx + row * num_c;
      for (int64_t c = 0; c < num_c; ++c) {
        const double dnorm = double(d_row[c]) * double(w[c]);
        const double n = (x_row[c] - m) * s;
        dx_row[c] = T(s * (dnorm - mean_dnorm - n * mean_dnorm_norm));
      }
    }
  });
}

}  // namespace tessera::cpu
