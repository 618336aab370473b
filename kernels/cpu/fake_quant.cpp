// CPU reference of QAT's fake quantization (kernels/ops.h fake_quantize, row_absmax): each row
// converted to f32 and run through quant::quantize_rows / dequantize_rows, the very functions the
// exporters call, so the fake-quantized forward and the exported integers cannot drift apart. A
// row given its amax from outside (tp) takes the int8 rule of kernels/quant_math.h directly.
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/fake_quant_checks.h"
#include "kernels/quant_math.h"

namespace tessera::cpu {

namespace {

// One row (K f32 values) quantized with the int8 scale of an external amax, per quant_math.h.
void int8_row_with_amax(const float* x, int64_t cols, float amax, float* out) {
  const float d = quant::int8_scale(amax);
  const float inv_d = quant::inverse_or_zero(d);
  const uint16_t d_bits = quant::scale_to_f16_bits(d);
  for (int64_t k = 0; k < cols; ++k) out[k] = quant::dequant(quant::int8_code(x[k], inv_d), d_bits);
}

}  // namespace

void fake_quantize(Tensor out, Tensor in, quant::IntBits bits, int64_t group, Tensor row_amax) {
  constexpr const char* kOp = "fake_quantize";
  check_compute_dtype(in, kOp, "in");
  check_like(out, in.dtype, in.shape, kOp, "out");
  TS_CHECK(!overlaps(out, in) || out.data == in.data, "{}: out partially overlaps in", kOp);
  const quant::FakeQuantDims dims =
      quant::check_fake_quantize(in, bits, group, !row_amax.empty(), kOp);
  const int64_t rows = dims.rows, cols = dims.cols;
  if (!row_amax.empty()) {
    check_host(row_amax, kOp, "row_amax");
    TS_CHECK(row_amax.dtype == DType::f32 && row_amax.shape == Shape{rows},
             "{}: row_amax is {}, expected ({}) f32", kOp, row_amax.str(), rows);
  }
  const int64_t groups = cols / std::max<int64_t>(group, 1);
  dispatch_float(in.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = in.ptr<T>();
    T* y = out.ptr<T>();
#pragma omp parallel for schedule(static) if (rows * cols > kMinParallelWork)
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> row(cols), value(cols);
      std::vector<int8_t> codes(cols);
      std::vector<uint16_t> scales(groups);
      for (int64_t k = 0; k < cols; ++k) row[k] = float(x[r * cols + k]);
      if (row_amax.empty()) {
        quant::quantize_rows(row.data(), 1, cols, bits, group, codes.data(), scales.data());
        quant::dequantize_rows(codes.data(), scales.data(), 1, cols, group, value.data());
      } else {
        int8_row_with_amax(row.data(), cols, row_amax.ptr<float>()[r], value.data());
      }
      for (int64_t k = 0; k < cols; ++k) y[r * cols + k] = T(value[k]);
    }
  });
}

void row_absmax(Tensor amax, Tensor in) {
  constexpr const char* kOp = "row_absmax";
  check_compute_dtype(in, kOp, "in");
  TS_CHECK(in.ndim() >= 1, "{}: in {} needs a last dim", kOp, in.str());
  const int64_t cols = in.dim(-1), rows = cols == 0 ? 0 : in.numel() / cols;
  check_host(amax, kOp, "amax");
  TS_CHECK(amax.dtype == DType::f32 && amax.shape == Shape{rows},
           "{}: amax is {}, expected ({}) f32", kOp, amax.str(), rows);
  dispatch_float(in.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = in.ptr<T>();
    float* a = amax.ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      float m = 0.0f;  // strict comparison: NaN never enters, as in quantize_rows
      for (int64_t k = 0; k < cols; ++k)
        if (m < std::fabs(float(x[r * cols + k]))) m = std::fabs(float(x[r * cols + k]));
      a[r] = m;
    }
  });
}

}  // namespace tessera::cpu
