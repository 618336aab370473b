// CPU references of the FP8 op family (kernels/ops_fp8.h documents each op): same names and
// argument order as the CUDA versions in kernels/cuda/fp8.h. They emulate the GPU numerics with
// the exact scalar conversions of core/dtype.h; call through tessera::ops in model code.
#pragma once
#include "core/tensor.h"
#include "kernels/ops_fp8.h"

namespace tessera::cpu {

void fp8_quantize(Tensor out /*(R,C) e4m3|e5m2*/, Tensor out_t /*(C,R) or empty*/,
                  Tensor amax /*(1) f32*/, Tensor in /*(R,C) f32|bf16|f16*/, Tensor scale /*(1)*/);
void swiglu_backward_fp8(Tensor dgate8 /*(R,C)*/, Tensor dgate8_t /*(C,R) or empty*/,
                         Tensor dup8 /*(R,C)*/, Tensor dup8_t /*(C,R) or empty*/,
                         Tensor amax_gate /*(1)*/, Tensor amax_up /*(1)*/, Tensor dout /*(R,C)*/,
                         Tensor gate /*(R,C)*/, Tensor up /*(R,C)*/, Tensor scale_gate /*(1)*/,
                         Tensor scale_up /*(1)*/);
void gemm_fp8(Tensor c /*(M,N) bf16|f32*/, Tensor a /*(M,K) fp8*/, Tensor b /*(N,K) fp8*/,
              Tensor a_scale_inv /*(1) f32*/, Tensor b_scale_inv /*(1) f32*/, bool accumulate);
void fp8_update_scales(Tensor amax_history /*(L,n) f32*/, Tensor scale /*(n) f32*/,
                       Tensor scale_inv /*(n) f32*/, Tensor amax /*(n) f32*/,
                       const ops::Fp8UpdateParams& params);

}  // namespace tessera::cpu
