// CPU reference of the fused sequences in kernels/ops.h: literally the sequence of reference ops
// each one is defined as (the CUDA versions are tested bit for bit against their own sequence).
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps) {
  add_forward(residual, a, b);
  layernorm_forward(out, mean, rstd, residual, weight, bias, eps);
}

void adamw_update_multi(std::span<const ops::AdamWTensors> entries) {
  for (const ops::AdamWTensors& e : entries) adamw_update(e.param, e.grad, e.m, e.v, e.step);
}

}  // namespace tessera::cpu
