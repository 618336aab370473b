// Shared by both backends of fake_quantize (kernels/cpu/fake_quant.cpp, kernels/cuda/
// fake_quant.cu): the argument checks that do not depend on where the tensors live. Each backend
// checks dtypes and devices its own way first. Internal to kernels/.
#pragma once
#include <cstdint>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/quantize.h"

namespace tessera::quant {

struct FakeQuantDims {
  int64_t rows = 0, cols = 0;  // in viewed as (R, K), K its last dim
};

// bits int8/int4, group dividing K (each backend checks out against in itself);
// row_amax (when given) only for int8 with one group per row.
inline FakeQuantDims check_fake_quantize(const Tensor& in, IntBits bits, int64_t group,
                                         bool with_row_amax, const char* op) {
  TS_CHECK(in.ndim() >= 1, "{}: in {} needs a last dim", op, in.str());
  FakeQuantDims d;
  d.cols = in.dim(-1);
  d.rows = d.cols == 0 ? 0 : in.numel() / d.cols;
  TS_CHECK(bits == IntBits::int8 || bits == IntBits::int4, "{}: bits {}", op, int(bits));
  TS_CHECK(group >= 1 && d.cols % group == 0, "{}: group {} does not divide K = {}", op, group,
           d.cols);
  TS_CHECK(!with_row_amax || (bits == IntBits::int8 && group == d.cols),
           "{}: row_amax is for int8 with one group per row (group {} of K = {})", op, group,
           d.cols);
  return d;
}

}  // namespace tessera::quant
