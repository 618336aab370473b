// Causal grouped-query attention through cuDNN's fused scaled-dot-product attention (the cuDNN
// backend graph API; no cudnn-frontend). bf16 or f16: cuDNN's SDPA engines take 16-bit inputs,
// so f32 goes to the native kernel (kernels/cuda/attention.cu dispatches). Arguments and semantics
// are those of the op contract (kernels/cuda/cuda_ops.h: attention_forward/attention_backward).
// Shape letters: B batch, T time, Hq query heads, Hkv key/value heads, D head dim.
#pragma once
#include <string>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

// Each returns true when cuDNN ran the op. False means cuDNN has no engine for this shape (or
// the pointers are not 16-byte aligned, or D is not a multiple of 8 up to 256): nothing was
// written, a warning naming the reason was logged once per shape, and the caller must use
// another implementation. Bad arguments (shapes, dtypes, devices) are bugs (TS_CHECK).
// Plans are built on the first call per (device, B, T, Hq, Hkv, D, dtype, direction) and cached.
bool attention_cudnn_forward(Tensor out /*(B,T,Hq,D)*/, Tensor lse /*(B,Hq,T) f32*/,
                             Tensor q /*(B,T,Hq,D)*/, Tensor k /*(B,T,Hkv,D)*/,
                             Tensor v /*(B,T,Hkv,D)*/, float scale, ops::Stream stream = {});
// dq, dk, dv are overwritten (dk/dv summed over the Hq / Hkv query heads of each kv head).
// Not promised bitwise reproducible (see build_backward in the .cu for the choice made).
bool attention_cudnn_backward(Tensor dq /*(B,T,Hq,D)*/, Tensor dk /*(B,T,Hkv,D)*/,
                              Tensor dv /*(B,T,Hkv,D)*/, Tensor dout /*(B,T,Hq,D)*/, Tensor q,
                              Tensor k, Tensor v, Tensor out /*(B,T,Hq,D)*/,
                              Tensor lse /*(B,Hq,T) f32*/, float scale, ops::Stream stream = {});

// Diagnostics for tests and benchmarks: builds (or finds) the plan for the shape and dtype and
// describes it (cuDNN version, graph variant, engine index, numerical notes, workspace bytes),
// or, when no plan could be built, every failure cuDNN reported (cudnnGetLastErrorString).
std::string attention_cudnn_describe(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                     int64_t head_dim, bool backward, DType dtype = DType::bf16);

// Scratch bytes the plan for this shape needs (building the plan if it is not cached; 0 when cuDNN
// has no engine for it). Used to size the context workspace before training starts.
size_t attention_cudnn_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq,
                                       int64_t num_hkv, int64_t head_dim, bool backward,
                                       DType dtype = DType::bf16);

}  // namespace tessera::cuda
