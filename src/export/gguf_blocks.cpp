// GGUF tensor packing: element roundings for F16/BF16 and the Q8_0/Q4_0 block layouts over the
// codes and scales of quant::quantize_rows.
#include "export/gguf_blocks.h"

#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/quant_math.h"
#include "kernels/quantize.h"

namespace tessera::exporting {
namespace {

constexpr int kBlock = quant::kGgufBlock;

void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t get_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

std::vector<uint8_t> pack_q8_0(const int8_t* codes, const uint16_t* scales, int64_t rows,
                               int64_t cols) {
  TS_CHECK(cols % kBlock == 0, "Q8_0 row of {} elements", cols);
  const int64_t blocks = rows * (cols / kBlock);
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * (2 + kBlock));
  for (int64_t b = 0; b < blocks; ++b) {
    uint8_t* dst = out.data() + b * (2 + kBlock);
    put_u16(dst, scales[b]);
    std::memcpy(dst + 2, codes + b * kBlock, kBlock);
  }
  return out;
}

std::vector<uint8_t> pack_q4_0(const int8_t* codes, const uint16_t* scales, int64_t rows,
                               int64_t cols) {
  TS_CHECK(cols % kBlock == 0, "Q4_0 row of {} elements", cols);
  const int64_t blocks = rows * (cols / kBlock);
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * (2 + kBlock / 2));
  for (int64_t b = 0; b < blocks; ++b) {
    uint8_t* dst = out.data() + b * (2 + kBlock / 2);
    const int8_t* q = codes + b * kBlock;
    put_u16(dst, scales[b]);
    for (int j = 0; j < kBlock / 2; ++j) {
      TS_CHECK(q[j] >= -8 && q[j] <= 7 && q[j + 16] >= -8 && q[j + 16] <= 7,
               "int4 code out of range in block {}", b);
      dst[2 + j] = uint8_t((q[j] + 8) | ((q[j + kBlock / 2] + 8) << 4));
    }
  }
  return out;
}

std::vector<uint8_t> pack_gguf_rows(GgmlType type, const float* w, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  switch (type) {
    case GgmlType::f32: {
      std::vector<uint8_t> out(size_t(n) * 4);
      std::memcpy(out.data(), w, out.size());
      return out;
    }
    case GgmlType::f16:
    case GgmlType::bf16: {
      std::vector<uint8_t> out(size_t(n) * 2);
      for (int64_t i = 0; i < n; ++i)
        put_u16(out.data() + 2 * i,
                type == GgmlType::f16 ? f32_to_f16_bits(w[i]) : f32_to_bf16_bits(w[i]));
      return out;
    }
    case GgmlType::q8_0:
    case GgmlType::q4_0: {
      TS_CHECK(cols % kBlock == 0, "{} row of {} elements", ggml_type_name(type), cols);
      std::vector<int8_t> codes(static_cast<size_t>(n));
      std::vector<uint16_t> scales(static_cast<size_t>(n / kBlock));
      const quant::IntBits bits =
          type == GgmlType::q8_0 ? quant::IntBits::int8 : quant::IntBits::int4;
      quant::quantize_rows(w, rows, cols, bits, kBlock, codes.data(), scales.data());
      return type == GgmlType::q8_0 ? pack_q8_0(codes.data(), scales.data(), rows, cols)
                                    : pack_q4_0(codes.data(), scales.data(), rows, cols);
    }
  }
  TS_BUG("ggml type {}", uint32_t(type));
}

std::vector<float> unpack_gguf_rows(GgmlType type, const uint8_t* data, int64_t rows,
                                    int64_t cols) {
  const int64_t n = rows * cols;
  std::vector<float> out(static_cast<size_t>(n));
  switch (type) {
    case GgmlType::f32: std::memcpy(out.data(), data, size_t(n) * 4); break;
    case GgmlType::f16:
      for (int64_t i = 0; i < n; ++i) out[i] = f16_bits_to_f32(get_u16(data + 2 * i));
      break;
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_to_f32(get_u16(data + 2 * i));
      break;
    case GgmlType::q8_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const uint8_t* src = data + b * (2 + kBlock);
        for (int j = 0; j < kBlock; ++j)
          out[b * kBlock + j] = quant::dequant(int8_t(src[2 + j]), get_u16(src));
      }
      break;
    case GgmlType::q4_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const uint8_t* src = data + b * (2 + kBlock / 2);
        for (int j = 0; j < kBlock / 2; ++j) {
          out[b * kBlock + j] = quant::dequant((src[2 + j] & 0x0f) - 8, get_u16(src));
          out[b * kBlock + j + kBlock / 2] = quant::dequant((src[2 + j] >> 4) - 8, get_u16(src));
        }
      }
      break;
  }
  return out;
}

}  // namespace tessera::exporting
