// The op-contract entry points for causal GQA attention on CUDA (cuda_ops.h): a dispatcher over
// cuDNN's fused SDPA (attention_cudnn.cu) and our own kernel (attention_native.cu), chosen by
// Context::attention_impl. cuDNN's SDPA engines take 16-bit inputs only, so f32 always runs
// natively; bf16 and f16 also fall back to native when cuDNN has no engine for the shape (it warns
// once).
// Both write lse as the natural-log logsumexp of the scaled scores, so a forward from one and a
// backward from the other agree. No kernels here.
#include <algorithm>

#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/attention_native.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace tessera::cuda {
namespace {

// True when this call should try cuDNN first.
bool wants_cudnn(const Tensor& q) {
  const int impl = context().attention_impl;
  TS_CHECK(impl == kAttentionCudnn || impl == kAttentionNative,
           "attention: Context::attention_impl = {} (0 = cudnn, 1 = native)", impl);
  return impl == kAttentionCudnn && (q.dtype == DType::bf16 || q.dtype == DType::f16);
}

}  // namespace

void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale) {
  if (wants_cudnn(q) && attention_cudnn_forward(out, lse, q, k, v, scale)) return;
  attention_native_forward(out, lse, q, k, v, scale);
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                        Tensor out, Tensor lse, float scale) {
  if (wants_cudnn(q) && attention_cudnn_backward(dq, dk, dv, dout, q, k, v, out, lse, scale))
    return;
  attention_native_backward(dq, dk, dv, dout, q, k, v, out, lse, scale);
}

}  // namespace tessera::cuda

namespace tessera::cuda {

size_t attention_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                 int64_t head_dim, DType dtype) {
  // The native backward keeps rowsum(dO * O), one f32 per (b, h, t), in the workspace.
  size_t bytes = size_t(num_b * num_t * num_hq) * sizeof(float);
  const bool sixteen_bit = dtype == DType::bf16 || dtype == DType::f16;
  if (sixteen_bit && context().attention_impl == kAttentionCudnn) {
    for (bool backward : {false, true})
      bytes = std::max(bytes, attention_cudnn_workspace_bytes(num_b, num_t, num_hq, num_hkv,
                                                              head_dim, backward, dtype));
  }
  return bytes;
}

}  // namespace tessera::cuda
