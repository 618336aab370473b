// Small helpers shared by the part-B kernel tests (rope, attention, cross-entropy): dtype copies of
// host tensors and element-wise comparisons. Gradient checks use tests/common/testing.h.
#pragma once
#include <algorithm>
#include <cmath>

#include "tests/common/testing.h"

namespace tessera::testing {

// A copy of `src` stored as `dtype` (f32 <-> f64 conversion rounds to nearest).
inline HostTensor cast_copy(const HostTensor& src, DType dtype) {
  HostTensor dst(dtype, src.t.shape);
  for (int64_t i = 0; i < src.size(); ++i) dst.set(i, src.get(i));
  return dst;
}

// Largest |a - b| over all elements; NaN anywhere gives NaN (so EXPECT_LE fails on it).
inline double max_abs_diff(const HostTensor& a, const HostTensor& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (int64_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(a.get(i) - b.get(i));
    if (std::isnan(diff)) return diff;
    worst = std::max(worst, diff);
  }
  return worst;
}

// Exact element-wise equality (==, so NaN never matches) of two host tensors of one dtype: used
// where two code paths must perform the very same arithmetic.
inline bool exactly_equal(const HostTensor& a, const HostTensor& b) {
  if (a.size() != b.size() || a.t.dtype != b.t.dtype) return false;
  for (int64_t i = 0; i < a.size(); ++i)
    if (!(a.get(i) == b.get(i))) return false;
  return true;
}

}  // namespace tessera::testing
