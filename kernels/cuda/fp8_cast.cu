// fp8_quantize on CUDA (kernels/ops_fp8.h): one pass that scales, converts to E4M3/E5M2 with the
// sm_89+ cvt.rn.satfinite instruction, writes the row-major result and, optionally, its transpose
// (staged through a shared-memory tile so both stores stay contiguous), and max-accumulates the
// input's amax. CPU reference: kernels/cpu/fp8.cpp (bit-exact; tests/cuda/fp8_test.cpp).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fp8.h"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cuda {

namespace {

// A 64x64 tile of the input per step of a block; blocks stride over the tiles (a grid of a few
// blocks per SM), so the amax is one atomic per block rather than per tile. kVec consecutive
// elements per thread: 4 when the row length, the row count and the pointers allow 4-element
// loads and 4-byte stores (every model width), else 1 (any shape).
constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
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

template <class T, int kVec>
struct alignas(kVec * sizeof(T)) Vec {
  T v[kVec];
};

template <class T, int kVec, bool kE4M3, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, int* __restrict__ amax_key,
                const T* __restrict__ in, const float* __restrict__ scale, int64_t rows,
                int64_t cols, int64_t tiles_c, int64_t num_tiles) {
  constexpr int kLanes = kTile / kVec;            // threads across a tile row
  constexpr int kRowsPerPass = kThreads / kLanes;  // tile rows per pass
  // Codes of the current tile, (tile rows, tile cols); the row pitch of 68 bytes (17 words, odd)
  // spreads the column reads of the transposed store over the banks.
  __shared__ alignas(4) uint8_t tile[kTile][kTile + 4];
  __shared__ int warp_max[kThreads / 32];
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const float s = *scale;
  int key = 0;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t r0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t r = r0 + i, c = c0 + int64_t(tx) * kVec;
      if (r >= rows || c >= cols) continue;  // kVec > 1: cols % kVec == 0, so all kVec are in
      const Vec<T, kVec> x = *reinterpret_cast<const Vec<T, kVec>*>(in + r * cols + c);
      uint32_t packed = 0;
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        const float xf = load_f32(x.v[q]);
        key = max(key, abs_key(xf));
        packed |= uint32_t(encode<kE4M3>(__fmul_rn(xf, s))) << (8 * q);
      }
      if constexpr (kVec == 4) {
        *reinterpret_cast<uint32_t*>(out + r * cols + c) = packed;
        if constexpr (kTranspose) *reinterpret_cast<uint32_t*>(&tile[i][tx * kVec]) = packed;
      } else {
        out[r * cols + c] = uint8_t(packed);
        if constexpr (kTranspose) tile[i][tx] = uint8_t(packed);
      }
    }
    if constexpr (kTranspose) {
      __syncthreads();  // the tile is complete
      // out_t (C,R): row c0 + j holds tile column j; each thread stores kVec consecutive rows.
      for (int j = ty; j < kTile; j += kRowsPerPass) {
        const int64_t c = c0 + j, r = r0 + int64_t(tx) * kVec;
        if (c >= cols || r >= rows) continue;  // kVec > 1: rows % kVec == 0
        if constexpr (kVec == 4) {
          const int i = tx * kVec;
          const uint32_t packed = uint32_t(tile[i][j]) | uint32_t(tile[i + 1][j]) << 8 |
                                  uint32_t(tile[i + 2][j]) << 16 | uint32_t(tile[i + 3][j]) << 24;
          *reinterpret_cast<uint32_t*>(out_t + c * rows + r) = packed;
        } else {
          out_t[c * rows + r] = tile[tx][j];
        }
      }
      __syncthreads();  // before the next tile overwrites it
    }
  }
  key = __reduce_max_sync(0xFFFFFFFFu, key);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = key;
  __syncthreads();
  if (threadIdx.x == 0) {
    int m = warp_max[0];
    for (int w = 1; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
    atomicMax(amax_key, m);
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <class T, bool kE4M3, bool kTranspose>
void launch(uint8_t* dst, uint8_t* dst_t, int* key, const T* src, const float* s, int64_t rows,
            int64_t cols) {
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t num_tiles = ((rows + kTile - 1) / kTile) * tiles_c;
  const int64_t blocks = std::min<int64_t>(num_tiles, int64_t(context().num_sms) * kBlocksPerSm);
  // 4-wide when every row starts 4-element aligned and (with the transpose) every out_t row too.
  const bool vec4 = cols % 4 == 0 && aligned_to(src, 4 * sizeof(T)) && aligned_to(dst, 4) &&
                    (!kTranspose || (rows % 4 == 0 && aligned_to(dst_t, 4)));
  if (vec4)
    quantize_kernel<T, 4, kE4M3, kTranspose><<<unsigned(blocks), kThreads, 0, stream()>>>(
        dst, dst_t, key, src, s, rows, cols, tiles_c, num_tiles);
  else
    quantize_kernel<T, 1, kE4M3, kTranspose><<<unsigned(blocks), kThreads, 0, stream()>>>(
        dst, dst_t, key, src, s, rows, cols, tiles_c, num_tiles);
  TS_CUDA_CHECK_LAUNCH();
}

template <class T, bool kE4M3>
void launch(const Tensor& out, const Tensor& out_t, const Tensor& amax, const Tensor& in,
            const Tensor& scale, int64_t rows, int64_t cols) {
  auto* dst = static_cast<uint8_t*>(out.data);
  auto* key = static_cast<int*>(amax.data);
  const auto* src = static_cast<const T*>(in.data);
  const auto* s = static_cast<const float*>(scale.data);
  if (out_t.empty()) launch<T, kE4M3, false>(dst, nullptr, key, src, s, rows, cols);
  else launch<T, kE4M3, true>(dst, static_cast<uint8_t*>(out_t.data), key, src, s, rows, cols);
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
