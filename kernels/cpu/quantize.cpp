// Host reference of row-wise int8/int4 quantization (kernels/quantize.h), one group at a time with
// the scalar rules of kernels/quant_math.h.
#include "kernels/quantize.h"

#include <cmath>

#include "core/error.h"
#include "kernels/quant_math.h"

namespace tessera::quant {
namespace {

// The group's f32 scale: int8 from its largest |x|, int4 from its signed element of largest |x|
// (the first on ties, as GGML's strict comparison picks).
float group_scale(const float* x, int64_t n, IntBits bits) {
  float amax = 0.0f, signed_max = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      signed_max = x[j];
    }
  }
  return bits == IntBits::int8 ? int8_scale(amax) : int4_scale(signed_max);
}

}  // namespace

void quantize_rows(const float* w, int64_t rows, int64_t cols, IntBits bits, int64_t group,
                   int8_t* codes, uint16_t* scales) {
  TS_CHECK(group > 0 && cols % group == 0, "group {} does not divide {} columns", group, cols);
  const int64_t groups = cols / group;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = w + r * cols + g * group;
      int8_t* q = codes + r * cols + g * group;
      const float d = group_scale(x, group, bits);
      const float inv_d = inverse_or_zero(d);
      scales[r * groups + g] = scale_to_f16_bits(d);
      for (int64_t j = 0; j < group; ++j)
        q[j] = int8_t(bits == IntBits::int8 ? int8_code(x[j], inv_d) : int4_code(x[j], inv_d));
    }
  }
}

void dequantize_rows(const int8_t* codes, const uint16_t* scales, int64_t rows, int64_t cols,
                     int64_t group, float* out) {
  TS_CHECK(group > 0 && cols % group == 0, "group {} does not divide {} columns", group, cols);
  const int64_t groups = cols / group;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      out[r * cols + k] = dequant(codes[r * cols + k], scales[r * groups + k / group]);
}

}  // namespace tessera::quant
