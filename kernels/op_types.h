// Plain parameter structs shared by the op contract (kernels/ops.h) and both backends.
#pragma once
#include "core/tensor.h"

namespace tessera::ops {

struct AdamWStep {
  float lr = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // 0 for parameters excluded from decay
  int step = 1;               // 1-based, for bias correction
  float grad_scale = 1.0f;    // multiplies the gradient first (clipping, loss-scale unscaling)
};

// One tensor's share of a multi-tensor AdamW step (kernels/ops.h adamw_update_multi).
struct AdamWTensors {
  Tensor param, grad, m, v;
  AdamWStep step;
};

}  // namespace tessera::ops
