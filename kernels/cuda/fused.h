// Fused CUDA kernels outside the op contract (kernels/ops.h has no CPU twin for them): each is
// defined as a sequence of contract ops and tested bit for bit against that sequence.
#pragma once
#include "core/tensor.h"

namespace tessera::cuda {

// residual = a + b, then out, mean, rstd = layernorm(residual, weight, bias, eps): the residual
// stream update followed by the next block's norm in one pass over memory (reads a and b once,
// writes residual and out). Equal bit for bit to cuda::add_forward(residual, a, b) followed by
// cuda::layernorm_forward(out, mean, rstd, residual, weight, bias, eps). residual may be a or b
// exactly (in-place residual update); out must not alias anything. Shapes as layernorm_forward:
// a, b, residual, out (N, C); weight, bias (C) (bias may be empty); mean, rstd (N) f32.
void fused_residual_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd,
                                      Tensor a, Tensor b, Tensor weight, Tensor bias, float eps);

}  // namespace tessera::cuda
