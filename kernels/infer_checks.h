// Shared by both backends of infer_linear_forward (kernels/cpu/infer_linear.cpp,
// kernels/cuda/infer_linear.cu): the weight's shape and format rules, which do not depend on where
// the tensors live. Each backend checks devices and the activations' dtypes its own way first.
// Internal to kernels/.
#pragma once
#include <cstdint>

#include "core/error.h"
#include "kernels/ops_infer.h"

namespace tessera::ops {

// w is (N, K) with K = num_k: i8/i4 codes with (N, K/group) f16 scales and a group dividing K
// (even for i4), or a float weight of the activations' dtype `act` with group 0. Returns N.
inline int64_t check_infer_weight(const InferWeight& w, int64_t num_k, DType act, const char* op) {
  TS_CHECK(w.w.ndim() == 2 && w.w.dim(1) == num_k, "{}: w.w is {}, expected (N,{})", op, w.w.str(),
           num_k);
  const int64_t num_n = w.w.dim(0);
  if (!w.quantized()) {
    TS_CHECK(w.w.dtype == act, "{}: a float weight has the activations' dtype {}, got {}", op,
             dtype_name(act), w.w.str());
    TS_CHECK(w.group == 0, "{}: a float weight has group 0, got {}", op, w.group);
    return num_n;
  }
  TS_CHECK(w.w.dtype == DType::i8 || w.w.dtype == DType::i4,
           "{}: a quantized weight has i8 or i4 codes, got {}", op, w.w.str());
  TS_CHECK(w.group >= 1 && num_k % w.group == 0, "{}: group {} must divide K = {}", op, w.group,
           num_k);
  TS_CHECK(w.w.dtype == DType::i8 || w.group % 2 == 0, "{}: int4 needs an even group, got {}", op,
           w.group);
  TS_CHECK(w.scales.dtype == DType::f16 && w.scales.shape == Shape({num_n, num_k / w.group}),
           "{}: w.scales must be f16 ({}, {}), got {}", op, num_n, num_k / w.group, w.scales.str());
  TS_CHECK(w.scales.device == w.w.device, "{}: w.scales on {} but w.w on {}", op,
           device_name(w.scales.device), device_name(w.w.device));
  return num_n;
}

}  // namespace tessera::ops
