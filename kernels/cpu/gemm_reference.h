// The plain-loop GEMM that the CPU fast path (CBLAS) is tested against, and the CPU gemm itself
// in builds without CBLAS. Same contract as ops::gemm (kernels/ops.h); f32 or f64; accumulates in
// double over k in increasing order; each c element is written by one thread (deterministic).
#pragma once
#include "core/tensor.h"

namespace tessera::cpu {

// c (M,N) = alpha * op(a) · op(b) + beta * c. beta = 0 ignores c's contents (NaN included);
// alpha = 0 skips the product (a and b are not read), as in BLAS.
void gemm_reference(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
                    float beta);

}  // namespace tessera::cpu
