// CPU AdamW with decoupled weight decay. The contract's formula (kernels/ops.h) is evaluated in
// exactly the order of torch.optim.AdamW's single-tensor path (PyTorch 2.x), so that the golden
// test can compare ten steps against PyTorch:
//   p     = p * (1 - lr wd)                      param.mul_  (skipped when wd = 0, as in torch)
//   m     = fma(1 - b1, g - m, m)                exp_avg.lerp_(g, 1 - b1); torch's vector path
//                                                 fuses this multiply-add, so we use std::fma
//   v     = v * b2 + ((1 - b2) g) g              exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps
//   p     = p + (-(lr / (1 - b1^t)) m) / denom   param.addcdiv_(m, denom, -step_size)
// Scalars are formed in double (like Python floats) and rounded once to the tensor dtype; the
// tensor math runs in the tensor dtype (f32; f64 for tests). g = grad * grad_scale comes first.
#include <cmath>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

namespace {

template <class T>
void adamw_kernel(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWStep& s) {
  const double lr = s.lr, beta1 = s.beta1, beta2 = s.beta2;
  const double bias_correction1 = 1.0 - std::pow(beta1, double(s.step));
  const double bias_correction2 = 1.0 - std::pow(beta2, double(s.step));
  const bool decay = s.weight_decay != 0.0f;
  const T decay_factor = T(1.0 - lr * double(s.weight_decay));
  const T m_weight = T(1.0 - beta1);
  const T v_decay = T(beta2);
  const T v_weight = T(1.0 - beta2);
  const T neg_step_size = T(-(lr / bias_correction1));
  const T bias_correction2_sqrt = T(std::sqrt(bias_correction2));
  const T eps = T(s.eps);
  const T grad_scale = T(s.grad_scale);
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const T g = grad[i] * grad_scale;
    T p = param[i];
    if (decay) p = p * decay_factor;
    const T m_new = std::fma(m_weight, g - m[i], m[i]);
    const T v_new = v[i] * v_decay + v_weight * g * g;
    const T denom = std::sqrt(v_new) / bias_correction2_sqrt + eps;
    param[i] = p + neg_step_size * m_new / denom;
    m[i] = m_new;
    v[i] = v_new;
  }
}

}  // namespace

void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s) {
  constexpr const char* kOp = "adamw_update";
  check_compute_dtype(param, kOp, "param");
  check_like(grad, param.dtype, param.shape, kOp, "grad");
  check_like(m, param.dtype, param.shape, kOp, "m");
  check_like(v, param.dtype, param.shape, kOp, "v");
  TS_CHECK(s.step >= 1, "{}: step is {}, but steps are 1-based", kOp, s.step);
  TS_CHECK(s.beta1 >= 0.0f && s.beta1 < 1.0f && s.beta2 >= 0.0f && s.beta2 < 1.0f,
           "{}: betas ({}, {}) must lie in [0, 1)", kOp, s.beta1, s.beta2);
  dispatch_float(param.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    adamw_kernel<T>(param.ptr<T>(), grad.ptr<T>(), m.ptr<T>(), v.ptr<T>(), param.numel(), s);
  });
}

}  // namespace tessera::cpu
