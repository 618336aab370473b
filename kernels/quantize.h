// Row-wise integer quantization of a weight matrix on the host, by the rules of
// kernels/quant_math.h: the codes and FP16 scales that QAT's fake quantization stands for and that
// the exporters write.
// Shape letters: R rows (output features), K columns (input features), G = K / group.
#pragma once
#include <cstdint>

namespace tessera::quant {

enum class IntBits { int4 = 4, int8 = 8 };

// Each row of w (R, K) in groups of `group` consecutive columns (group == K: one per row, i.e.
// per output channel); K % group must be 0. codes (R, K): int8 in [-127, 127] or int4 in [-8, 7],
// one per byte; scales (R, G): fp16 bits.
void quantize_rows(const float* w, int64_t rows, int64_t cols, IntBits bits, int64_t group,
                   int8_t* codes, uint16_t* scales);
// out (R, K) = codes * scale of their group, in f32: exactly the fake-quantized weight.
void dequantize_rows(const int8_t* codes, const uint16_t* scales, int64_t rows, int64_t cols,
                     int64_t group, float* out);

}  // namespace tessera::quant
