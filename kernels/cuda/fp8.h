// CUDA versions of the FP8 ops (kernels/ops_fp8.h documents each op; the CPU references with the
// same names are in kernels/cpu/fp8.h): fp8_cast.cu (quantize + transpose + amax, alone or fused
// with SwiGLU's backward), gemm_fp8.cu (cuBLASLt scaled FP8 GEMM), fp8_scaling.cu
// (delayed-scaling update). All queue work on the stream they take and never synchronize with the
// host. Plain C++ header.
#pragma once
#include <cstddef>

#include "core/tensor.h"
#include "kernels/op_types.h"
#include "kernels/ops_fp8.h"

namespace tessera::cuda {

void fp8_quantize(Tensor out /*(R,C) e4m3|e5m2*/, Tensor out_t /*(C,R) or empty*/,
                  Tensor amax /*(1) f32*/, Tensor in /*(R,C) f32|bf16|f16*/, Tensor scale /*(1)*/,
                  ops::Stream stream = {});
void swiglu_backward_fp8(Tensor dgate8 /*(R,C)*/, Tensor dgate8_t /*(C,R) or empty*/,
                         Tensor dup8 /*(R,C)*/, Tensor dup8_t /*(C,R) or empty*/,
                         Tensor amax_gate /*(1)*/, Tensor amax_up /*(1)*/, Tensor dout /*(R,C)*/,
                         Tensor gate /*(R,C)*/, Tensor up /*(R,C)*/, Tensor scale_gate /*(1)*/,
                         Tensor scale_up /*(1)*/, ops::Stream stream = {});
void gemm_fp8(Tensor c /*(M,N) bf16|f32*/, Tensor a /*(M,K) fp8*/, Tensor b /*(N,K) fp8*/,
              Tensor a_scale_inv /*(1) f32*/, Tensor b_scale_inv /*(1) f32*/, bool accumulate,
              ops::Stream stream = {});
void fp8_update_scales(Tensor amax_history /*(L,n) f32*/, Tensor scale /*(n) f32*/,
                       Tensor scale_inv /*(n) f32*/, Tensor amax /*(n) f32*/,
                       const ops::Fp8UpdateParams& params, ops::Stream stream = {});

}  // namespace tessera::cuda
