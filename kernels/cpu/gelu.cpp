// CPU GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// Elementwise over any shape; evaluated in double and rounded once to the tensor dtype. out may
// alias inp and dinp may alias dout (each element is read before it is written).
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kCubic = 0.044715;
}  // namespace

void gelu_forward(Tensor out, Tensor inp) {
  constexpr const char* kOp = "gelu_forward";
  check_compute_dtype(inp, kOp, "inp");
  check_like(out, inp.dtype, inp.shape, kOp, "out");
  const int64_t n = inp.numel();
  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    T* y = out.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) {
      const double v = x[i];
      y[i] = T(0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v))));
    }
  });
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  constexpr const char* kOp = "gelu_backward";
  check_compute_dtype(inp, kOp, "inp");
  check_like(dout, inp.dtype, inp.shape, kOp, "dout");
  check_like(dinp, inp.dtype, inp.shape, kOp, "dinp");
  const int64_t n = inp.numel();
  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    const T* d = dout.ptr<T>();
    T* dx = dinp.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) {
      // dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx, u = sqrt(2/pi) (x + 0.044715 x^3).
      const double v = x[i];
      const double th = std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v));
      const double du = kSqrt2OverPi * (1.0 + 3.0 * kCubic * v * v);
      const double grad = 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * du;
      dx[i] = T(double(d[i]) * grad);
    }
  });
}

}  // namespace tessera::cpu
