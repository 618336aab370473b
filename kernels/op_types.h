// Plain types shared by the op contract (kernels/ops.h, ops_fp8.h) and both backends: the
// stream and attention-implementation arguments, and the AdamW parameter structs.
#pragma once
#include "core/tensor.h"

namespace tessera::ops {

// Where an op's device work is queued: a cudaStream_t carried as void*, so plain C++ can hold one.
// The default, {}, is the device's default stream (the legacy stream 0), which also orders the
// synchronous copies of core/memory. Every op that launches device work takes one as its last
// argument; the CPU ignores it. Passed in, never a global: callers that overlap work own streams.
struct Stream {
  void* handle = nullptr;  // cudaStream_t; nullptr = the legacy default stream
};

// How attention runs on CUDA (model.attention_impl): cuDNN's fused SDPA, falling back to the
// native kernel for f32 and for shapes cuDNN refuses; or always the native kernel. The CPU
// reference ignores it.
enum class AttentionImpl { cudnn, native };

struct AdamWStep {
  float lr = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // 0 for parameters excluded from decay
  int step = 1;               // 1-based, for bias correction
  float grad_scale = 1.0f;    // multiplies the gradient first (clipping, loss-scale unscaling)
};

// One tensor's share of a multi-tensor AdamW step (kernels/ops.h adamw_update_multi). `value`,
// when not empty, is the 16-bit copy of param that forward reads: it receives the updated param
// rounded to its dtype.
struct AdamWTensors {
  Tensor param, grad, m, v;
  AdamWStep step;
  Tensor value;
};

}  // namespace tessera::ops
