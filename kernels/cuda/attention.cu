// The op-contract entry points for causal GQA attention on CUDA (cuda_ops.h): a dispatcher over
// cuDNN's fused SDPA (attention_cudnn.cu) and our own kernel (attention_native.cu), chosen by the
// caller's ops::AttentionImpl. cuDNN's SDPA engines take 16-bit inputs only, so f32 always runs
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

bool is_16bit(DType dtype) { return dtype == DType::bf16 || dtype == DType::f16; }

// True when this call should try cuDNN first.
bool wants_cudnn(const Tensor& q, ops::AttentionImpl impl) {
  TS_CHECK(impl == ops::AttentionImpl::cudnn || impl == ops::AttentionImpl::native,
           "attention: AttentionImpl {} is neither cudnn nor native", int(impl));
  return impl == ops::AttentionImpl::cudnn && is_16bit(q.dtype);
}

}  // namespace

void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale,
                       ops::AttentionImpl impl, ops::Stream stream) {
  if (wants_cudnn(q, impl) && attention_cudnn_forward(out, lse, q, k, v, scale, stream)) return;
  attention_native_forward(out, lse, q, k, v, scale, stream);
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                        Tensor out, Tensor lse, float scale, ops::AttentionImpl impl,
                        ops::Stream stream) {
  if (wants_cudnn(q, impl) &&
      attention_cudnn_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, stream))
    return;
  attention_native_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, stream);
}

size_t attention_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                 int64_t head_dim, DType dtype, ops::AttentionImpl impl) {
  // The native backward keeps rowsum(dO * O), one f32 per (b, h, t), in the workspace.
  size_t bytes = size_t(num_b * num_t * num_hq) * sizeof(float);
  if (impl == ops::AttentionImpl::cudnn && is_16bit(dtype)) {
    for (bool backward : {false, true})
      bytes = std::max(bytes, attention_cudnn_workspace_bytes(num_b, num_t, num_hq, num_hkv,
                                                              head_dim, backward, dtype));
  }
  return bytes;
}

}  // namespace tessera::cuda
