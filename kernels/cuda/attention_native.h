// Our own causal grouped-query attention for CUDA (flash-attention-2 style: online softmax over
// key tiles, backward recomputing P from lse), one of the two implementations behind
// cuda::attention_forward/backward (kernels/cuda/attention.cu picks by the ops::AttentionImpl).
// Same arguments and semantics as ops::attention_* (kernels/ops.h). Head dim D: a multiple of 8,
// at most 128; f32, bf16 or f16. bf16 and f16 with D = 64 or 128 run on tensor cores (mma.sync),
// other cases on FMA kernels.
#pragma once
#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

// out (B,T,Hq,D), lse (B,Hq,T) f32; q (B,T,Hq,D), k and v (B,T,Hkv,D).
void attention_native_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale,
                              ops::Stream stream = {});
// dq (B,T,Hq,D), dk and dv (B,T,Hkv,D) are overwritten; deterministic (no atomics). Uses
// B*Hq*T*4 bytes of the context workspace for rowsum(dout * out).
void attention_native_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                               Tensor v, Tensor out, Tensor lse, float scale,
                               ops::Stream stream = {});

}  // namespace tessera::cuda
