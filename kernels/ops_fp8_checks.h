// Shared by both backends of the FP8 ops (kernels/cpu/fp8.cpp, kernels/cuda/fp8_*.cu,
// gemm_fp8.cu): the operand checks each launcher runs, and the scalar rules that must be the same
// bit for bit on the CPU and the GPU (the NaN code, the scale formula). Internal to kernels/.
#pragma once
#include <cfloat>
#include <cstdint>

#include "core/tensor.h"
#include "kernels/ops_fp8.h"

#if defined(__CUDACC__)
#define TS_FP8_HD __host__ __device__
#else
#define TS_FP8_HD
#endif

namespace tessera::fp8 {

// What a NaN becomes in either format: S.1111.111 with the sign dropped. It is E4M3's only NaN
// code and one of E5M2's, and what the sm_89+ cvt.satfinite instruction writes for NaN input.
constexpr uint8_t kNanCode = 0x7F;

// The amax a NaN input leaves (f32 bits of the canonical quiet NaN): one pattern on both
// backends, whatever NaN payload the input had.
constexpr uint32_t kNanKey = 0x7FC00000u;

constexpr int kMaxMargin = 64;  // 2^64 is an exact f32; larger margins make no sense for FP8

inline bool is_fp8(DType t) { return t == DType::e4m3 || t == DType::e5m2; }

// The delayed-scaling formula (kernels/ops_fp8.h, fp8_update_scales step 3) for a finite
// reduced amax > 0: two correctly rounded f32 divisions (the second by a power of two, exact
// unless the result is subnormal), an overflow to Inf clamped to FLT_MAX so scale_inv stays > 0.
TS_FP8_HD inline float scale_from_amax(float fp8_max, float amax, float pow2_margin) {
  float s = fp8_max / amax;
  s = s / pow2_margin;
  return s > FLT_MAX ? FLT_MAX : s;
}

struct QuantizeDims {
  int64_t rows = 0, cols = 0;  // R, C
};
// Checks fp8_quantize's operands (every tensor on `device`) and returns (R, C).
QuantizeDims check_quantize(const Tensor& out, const Tensor& out_t, const Tensor& amax,
                            const Tensor& in, const Tensor& scale, Device device, const char* op);

// Checks swiglu_backward_fp8's operands: each gradient as fp8_quantize's, gate and up like dout,
// both transposes or neither; returns (R, C).
QuantizeDims check_swiglu_backward(const Tensor& dgate8, const Tensor& dgate8_t, const Tensor& dup8,
                                   const Tensor& dup8_t, const Tensor& amax_gate,
                                   const Tensor& amax_up, const Tensor& dout, const Tensor& gate,
                                   const Tensor& up, const Tensor& scale_gate,
                                   const Tensor& scale_up, Device device, const char* op);

struct GemmDims {
  int64_t m = 0, n = 0, k = 0;
};
// Checks gemm_fp8's operands (dtypes, shapes, e5m2 x e5m2 rejected) and returns (M, N, K).
GemmDims check_gemm(const Tensor& c, const Tensor& a, const Tensor& b, const Tensor& a_scale_inv,
                    const Tensor& b_scale_inv, Device device, const char* op);

struct UpdateDims {
  int64_t history_len = 0, num_tensors = 0;  // L, n
};
UpdateDims check_update(const Tensor& amax_history, const Tensor& scale, const Tensor& scale_inv,
                        const Tensor& amax, const ops::Fp8UpdateParams& params, Device device,
                        const char* op);

}  // namespace tessera::fp8
