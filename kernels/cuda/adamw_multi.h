// Multi-tensor AdamW for the CUDA backend (an extra beside the op contract, which has the
// single-tensor kernels/ops.h adamw_update): one launch updates up to a few dozen parameter
// tensors, so an optimizer step over hundreds of small tensors is not hundreds of launches.
// Results are bitwise those of calling cuda::adamw_update on each entry.
#pragma once
#include <span>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

// One parameter tensor and its state: param, m, v f32 on cuda; grad f32, bf16 or f16 (the same
// grad dtype for every entry of one call), all with param's shape. Each entry has its own step
// settings (learning rate and weight decay differ between parameter groups).
struct AdamWEntry {
  Tensor param;
  Tensor grad;
  Tensor m;
  Tensor v;
  ops::AdamWStep step;
};

// Equivalent to adamw_update(e.param, e.grad, e.m, e.v, e.step) for every entry e, in few
// launches. Entries must not share memory with each other.
void adamw_update_multi(std::span<const AdamWEntry> entries);

}  // namespace tessera::cuda
