// CPU SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x). Elementwise over (N, F) (any shape,
// all operands equal); evaluated in double and rounded once. Each element is read before it is
// written, so outputs may alias inputs element for element.
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fast_math.h"

namespace tessera::cpu {

namespace {
// exp(-x) overflows to Inf for x < -709, giving sigmoid 0 and silu -0: the right limits.
inline double sigmoid(double x) { return 1.0 / (1.0 + fast_exp(-x)); }
}  // namespace

void swiglu_forward(Tensor out, Tensor gate, Tensor up) {
  constexpr const char* kOp = "swiglu_forward";
  check_compute_dtype(gate, kOp, "gate");
  check_like(up, gate.dtype, gate.shape, kOp, "up");
  check_like(out, gate.dtype, gate.shape, kOp, "out");
  const int64_t n = gate.numel();
  dispatch_float(gate.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* g = gate.ptr<T>();
    const T* u = up.ptr<T>();
    T* o = out.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) {
      const double x = g[i];
      o[i] = T(x * sigmoid(x) * double(u[i]));
    }
  });
}

void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) {
  constexpr const char* kOp = "swiglu_backward";
  check_compute_dtype(gate, kOp, "gate");
  check_like(up, gate.dtype, gate.shape, kOp, "up");
  check_like(dout, gate.dtype, gate.shape, kOp, "dout");
  check_like(dgate, gate.dtype, gate.shape, kOp, "dgate");
  check_like(dup, gate.dtype, gate.shape, kOp, "dup");
  TS_CHECK(!overlaps(dgate, dup), "{}: dgate and dup must not alias", kOp);
  const int64_t n = gate.numel();
  dispatch_float(gate.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* g = gate.ptr<T>();
    const T* u = up.ptr<T>();
    const T* d = dout.ptr<T>();
    T* dg = dgate.ptr<T>();
    T* du = dup.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) {
      // d silu / dx = sigmoid(x) (1 + x (1 - sigmoid(x))).
      const double x = g[i], s = sigmoid(x), grad_out = d[i], up_i = u[i];
      dg[i] = T(grad_out * up_i * s * (1.0 + x * (1.0 - s)));
      du[i] = T(grad_out * x * s);
    }
  });
}

}  // namespace tessera::cpu
