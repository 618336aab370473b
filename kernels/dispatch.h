// Internal to the op dispatch files (kernels/ops.cpp, kernels/ops_fp8.cpp): which backend an op
// runs on, and the error for a CUDA op in a build without CUDA. Not part of the op contract.
#pragma once
#include <initializer_list>

#include "core/error.h"
#include "core/tensor.h"

namespace tessera::ops::detail {

[[noreturn, maybe_unused]] inline void no_cuda(const char* op) {
  TS_USER_ERROR(
      "op {} was asked to run on cuda, but this build has no CUDA backend "
      "(configure with -DTESSERA_CUDA=ON on a machine with nvcc)",
      op);
}

// The device an op runs on: that of its first non-empty tensor (optional outputs such as an
// absent dinp are empty tensors, whose device field means nothing).
inline Device device_of(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (!t->empty()) return t->device;
  return Device::cpu;
}

}  // namespace tessera::ops::detail
