// A weight matrix as the bytes of one GGUF tensor type: F32, F16 and BF16 (each element rounded to
// nearest even), and the GGML block formats Q8_0 and Q4_0, whose integer codes and fp16 scales are
// exactly kernels/quantize.h's (quant::quantize_rows, group 32), so a QAT model's integers reach
// the file bit for bit. Shape letters: R rows (output features), K columns (input features).
//
//   Q8_0 block (34 bytes, 32 elements):  fp16 d | int8 q[32]             x_j = q_j * d
//   Q4_0 block (18 bytes, 32 elements):  fp16 d | u8 qs[16]              x_j = (nibble_j - 8) * d
//        qs[j] = (q_j + 8) | (q_{j+16} + 8) << 4   for j < 16 (low nibbles: the first half)
#pragma once
#include <cstdint>
#include <vector>

#include "export/gguf_file.h"

namespace tessera::exporting {

// w (R, K) row-major -> the tensor's bytes, rows in order. Q8_0/Q4_0 need K % 32 == 0.
std::vector<uint8_t> pack_gguf_rows(GgmlType type, const float* w, int64_t rows, int64_t cols);

// Q8_0/Q4_0 blocks from given codes (R, K) and fp16 scales (R, K/32): what pack_gguf_rows does
// after quantize_rows (exposed so tests can pack hand-made blocks).
std::vector<uint8_t> pack_q8_0(const int8_t* codes, const uint16_t* scales, int64_t rows,
                               int64_t cols);
std::vector<uint8_t> pack_q4_0(const int8_t* codes, const uint16_t* scales, int64_t rows,
                               int64_t cols);

// The values a reader of the tensor gets back (GGML's dequantization), (R, K) f32.
std::vector<float> unpack_gguf_rows(GgmlType type, const uint8_t* data, int64_t rows, int64_t cols);

}  // namespace tessera::exporting
