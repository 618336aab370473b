// fp8_quantize on CUDA (kernels/ops_fp8.h): one pass that scales, converts to E4M3/E5M2 with the
// sm_89+ cvt.rn.satfinite instruction, writes the row-major result and, optionally, its transpose
// (staged through a shared-memory tile so both stores stay contiguous), and max-accumulates the
// input's amax. CPU reference: kernels/cpu/fp8.cpp (bit-exact; tests/cuda/fp8_test.cpp).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fp8.h"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cuda {

namespace {

// A 64x64 tile of the input per block: 64 threads across the columns (coalesced loads and row
// stores), 4 rows of threads stepping down the tile.
constexpr int kTile = 64;
constexpr int kRowsPerPass = 4;
constexpr int kThreads = kTile * kRowsPerPass;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps per block");

__device__ __forceinline__ float load_f32(float x) { return x; }
__device__ __forceinline__ float load_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load_f32(__half x) { return __half2float(x); }

// Saturating RNE conversion; NaN -> kNanCode whatever the hardware writes (ops_fp8.h).
template <bool kE4M3>
__device__ __forceinline__ uint8_t encode(float v) {
  if (isnan(v)) return fp8::kNanCode;
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kE4M3 ? __NV_E4M3 : __NV_E5M2);
}

// amax keys: |x| as an int (non-negative floats order like ints; every NaN becomes kNanKey,
// above +Inf), so the block maximum and the atomicMax on the stored float's bits are exact and
// order-independent.
__device__ __forceinline__ int abs_key(float x) {
  const int k = __float_as_int(x) & 0x7FFFFFFF;
  return k > 0x7F800000 ? int(fp8::kNanKey) : k;
}

template <class T, bool kE4M3, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, int* __restrict__ amax_key,
                const T* __restrict__ in, const float* __restrict__ scale, int64_t rows,
                int64_t cols, int64_t tiles_c) {
  // Codes of this tile, (tile rows, tile cols); the row pitch of 68 bytes (17 words, odd) makes
  // the column reads of the transposed store hit 32 different banks.
  __shared__ uint8_t tile[kTile][kTile + 4];
  __shared__ int warp_max[kThreads / 32];
  const int64_t r0 = (int64_t(blockIdx.x) / tiles_c) * kTile;
  const int64_t c0 = (int64_t(blockIdx.x) % tiles_c) * kTile;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const float s = *scale;
  int key = 0;
  for (int i = ty; i < kTile; i += kRowsPerPass) {
    const int64_t r = r0 + i, c = c0 + tx;
    if (r < rows && c < cols) {
      const float x = load_f32(in[r * cols + c]);
      key = max(key, abs_key(x));
      const uint8_t code = encode<kE4M3>(__fmul_rn(x, s));
      out[r * cols + c] = code;
      if constexpr (kTranspose) tile[i][tx] = code;
    }
  }
  key = __reduce_max_sync(0xFFFFFFFFu, key);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = key;
  __syncthreads();  // also publishes the tile
  if (threadIdx.x == 0) {
    int m = warp_max[0];
    for (int w = 1; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
    atomicMax(amax_key, m);
  }
  if constexpr (kTranspose) {
    // out_t (C,R): row c0 + j holds tile column j; threads run along the tile rows.
    for (int j = ty; j < kTile; j += kRowsPerPass) {
      const int64_t c = c0 + j, r = r0 + tx;
      if (c < cols && r < rows) out_t[c * rows + r] = tile[tx][j];
    }
  }
}

template <class T, bool kE4M3>
void launch(const Tensor& out, const Tensor& out_t, const Tensor& amax, const Tensor& in,
            const Tensor& scale, int64_t rows, int64_t cols) {
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t num_tiles = ((rows + kTile - 1) / kTile) * tiles_c;
  TS_CHECK(num_tiles <= 0x7FFFFFFF, "fp8_quantize: ({}, {}) has too many tiles for one grid", rows,
           cols);
  auto* dst = static_cast<uint8_t*>(out.data);
  auto* key = static_cast<int*>(amax.data);
  const auto* src = static_cast<const T*>(in.data);
  const auto* s = static_cast<const float*>(scale.data);
  if (out_t.empty())
    quantize_kernel<T, kE4M3, false><<<unsigned(num_tiles), kThreads, 0, stream()>>>(
        dst, nullptr, key, src, s, rows, cols, tiles_c);
  else
    quantize_kernel<T, kE4M3, true><<<unsigned(num_tiles), kThreads, 0, stream()>>>(
        dst, static_cast<uint8_t*>(out_t.data), key, src, s, rows, cols, tiles_c);
  TS_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_format(const Tensor& out, const Tensor& out_t, const Tensor& amax, const Tensor& in,
                   const Tensor& scale, int64_t rows, int64_t cols) {
  if (out.dtype == DType::e4m3) launch<T, true>(out, out_t, amax, in, scale, rows, cols);
  else launch<T, false>(out, out_t, amax, in, scale, rows, cols);
}

}  // namespace

void fp8_quantize(Tensor out, Tensor out_t, Tensor amax, Tensor in, Tensor scale) {
  const fp8::QuantizeDims d =
      fp8::check_quantize(out, out_t, amax, in, scale, Device::cuda, "fp8_quantize");
  if (d.rows == 0 || d.cols == 0) return;
  switch (in.dtype) {
    case DType::f32: launch_format<float>(out, out_t, amax, in, scale, d.rows, d.cols); break;
    case DType::bf16:
      launch_format<__nv_bfloat16>(out, out_t, amax, in, scale, d.rows, d.cols);
      break;
    case DType::f16: launch_format<__half>(out, out_t, amax, in, scale, d.rows, d.cols); break;
    default: TS_BUG("fp8_quantize: input dtype {}", dtype_name(in.dtype));
  }
}

}  // namespace tessera::cuda
