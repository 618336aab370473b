// The scalar rules of Tessera's integer weight formats, shared bit for bit by the fake-quantization
// ops (QAT: kernels/cpu and kernels/cuda) and the exporters (src/export): a group's scale, and each
// element's integer code. They are GGML's reference rules, so a group of 32 is a GGUF block.
//
//   int8 (GGUF Q8_0 when the group is 32):  d = amax / 127    q = roundf(x * (1 / d))  in +-127
//   int4 (GGUF Q4_0 when the group is 32):  d = m / -8, where m is the group's element of largest
//        |x| (the first one on ties)        q = min(15, trunc(x * (1 / d) + 8.5)) - 8   in [-8, 7]
//
// d is computed in f32; the format stores fp16(d) (round to nearest even), and the value a code
// stands for is q * float(fp16(d)), also in f32 — that is what the fake-quantized forward uses and
// what llama.cpp dequantizes. The codes are computed from the f32 d (not its fp16 rounding), as
// GGML does. A group of zeros has d = 0, 1/d taken as 0, and every q = 0. Every product and sum is
// one correctly rounded f32 operation: CUDA code must not contract them into FMAs (the __*_rn
// intrinsics below make sure).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define TS_QUANT_HD __host__ __device__
#else
#include "core/dtype.h"
#define TS_QUANT_HD
#endif

namespace tessera::quant {

constexpr int kGgufBlock = 32;  // GGUF Q8_0 / Q4_0 block length (elements along the input dim)

TS_QUANT_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

TS_QUANT_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// f32 -> fp16 bits, round to nearest even (IEEE), and back.
TS_QUANT_HD inline uint16_t scale_to_f16_bits(float d) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(d));
#else
  return f32_to_f16_bits(d);
#endif
}

TS_QUANT_HD inline float f16_bits_to_scale(uint16_t b) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(b));
#else
  return f16_bits_to_f32(b);
#endif
}

TS_QUANT_HD inline float inverse_or_zero(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// int8: the group's f32 scale from its largest |x|.
TS_QUANT_HD inline float int8_scale(float amax) { return amax / 127.0f; }
TS_QUANT_HD inline int int8_code(float x, float inv_d) { return int(roundf(mul_rn(x, inv_d))); }

// int4: the group's f32 scale from its signed element of largest |x|.
TS_QUANT_HD inline float int4_scale(float signed_max) { return signed_max / -8.0f; }
// Returns the code in [-8, 7] (GGUF stores code + 8 as a nibble).
TS_QUANT_HD inline int int4_code(float x, float inv_d) {
  const int biased = int(add_rn(mul_rn(x, inv_d), 8.5f));  // > 0, so truncation is floor
  return (biased < 15 ? biased : 15) - 8;
}

// The value a code stands for: q * fp16(d), in f32 (exact: |q| < 2^8 and d has 11 bits).
TS_QUANT_HD inline float dequant(int q, uint16_t d_bits) {
  return mul_rn(float(q), f16_bits_to_scale(d_bits));
}

}  // namespace tessera::quant
