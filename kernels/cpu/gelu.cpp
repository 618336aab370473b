// CPU GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// Elementwise over any shape; evaluated in double and rounded once to the tensor dtype. out may
// alias inp and dinp may alias dout (each element is read before it is written).
// Computed as x sigmoid(2u) = x / (1 + e^(-2u)), the same function as 0.5 x (1 + tanh u) without
// the cancellation of 1 + tanh u for negative x, through fast_exp (a loop that vectorizes; libm's
// tanh made GELU a sixth of a CPU training step).
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fast_math.h"

namespace tessera::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kCubic = 0.044715;

// sigmoid(2u) = (1 + tanh u) / 2 for u = sqrt(2/pi) (v + 0.044715 v^3).
double gelu_gate(double v) {
  return 1.0 / (1.0 + fast_exp(-2.0 * kSqrt2OverPi * (v + kCubic * v * v * v)));
}
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
      y[i] = T(v * gelu_gate(v));
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
      // dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx, u = sqrt(2/pi) (x + 0.044715 x^3);
      // with s = sigmoid(2u) = (1 + tanh u) / 2 that is s + 2 x s (1 - s) du/dx.
      const double v = x[i];
      const double s = gelu_gate(v);
      const double du = kSqrt2OverPi * (1.0 + 3.0 * kCubic * v * v);
      const double grad = s + 2.0 * v * s * (1.0 - s) * du;
      dx[i] = T(double(d[i]) * grad);
    }
  });
}

}  // namespace tessera::cpu
