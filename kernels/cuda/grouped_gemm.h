// Internal to the CUDA grouped GEMM (kernels/cuda/grouped_gemm.cu), for its tests and benchmark:
// which kernel the ops pick for given operands, and the generic kernel called directly (the path
// f32 and unaligned 16-bit operands take), so tests cover it on aligned shapes too. Plain C++.
#pragma once
#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

// "wgmma" (the sm_90a tensor-core kernel) or "generic" for these operands on the current device:
// out is y (forward), dx (dgrad) or dw (wgrad); a is x or dy, b is w or x.
const char* grouped_gemm_kernel_name(const Tensor& out, const Tensor& a, const Tensor& b);

// grouped_gemm_forward / grouped_gemm_backward (kernels/ops_moe.h) on the generic kernel always.
void grouped_gemm_forward_generic(Tensor y, Tensor x, Tensor w, Tensor offsets,
                                  ops::Stream stream = {});
void grouped_gemm_backward_generic(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w,
                                   Tensor offsets, ops::Stream stream = {});

}  // namespace tessera::cuda
