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

// A 64x64 tile of the input per step of a block; blocks stride over the tiles (a grid of as many
// blocks as fit on the SMs at once), so the amax is one atomic per block rather than per tile.
// kVec consecutive elements per thread: 8 (16-byte bf16 loads, 8-byte stores) when the row
// length, the row count and the pointers allow it (every model width), else 4, else 1 (any
// shape). A thread issues the loads of all its rows of a tile before converting any, so each has
// 2 (kVec 8) to 16 (kVec 1) loads in flight: a quantization is a pure stream and HBM needs many
// bytes in flight per SM to reach its bandwidth.
constexpr int kTile = 64;
constexpr int kThreads = 256;
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

// kVec elements moved as one access (at most 16 bytes wide, which is what the loads need).
template <class T, int kVec>
struct alignas(kVec * sizeof(T) < 16 ? kVec * sizeof(T) : 16) Vec {
  T v[kVec];
};
template <int kVec>
constexpr int kWords = kVec >= 4 ? kVec / 4 : 1;  // 32-bit words of kVec packed codes

template <class T, int kVec, bool kE4M3, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, int* __restrict__ amax_key,
                const T* __restrict__ in, const float* __restrict__ scale, int64_t rows,
                int64_t cols, int64_t tiles_c, int64_t num_tiles) {
  constexpr int kLanes = kTile / kVec;              // threads across a tile row
  constexpr int kRowsPerPass = kThreads / kLanes;   // tile rows per pass
  constexpr int kPasses = kTile / kRowsPerPass;     // passes per tile
  static_assert(kPasses * kRowsPerPass == kTile, "whole passes per tile");
  // Codes of the current tile, (tile rows, tile cols); the row pitch of 68 bytes (17 words, odd)
  // spreads the column reads of the transposed store over the banks.
  __shared__ alignas(4) uint8_t tile[kTile][kTile + 4];
  __shared__ int warp_max[kThreads / 32];
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const float s = *scale;
  int key = 0;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t r0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    const int64_t c = c0 + int64_t(tx) * kVec;
    Vec<T, kVec> x[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t r = r0 + ty + p * kRowsPerPass;
      // kVec > 1: cols % kVec == 0, so all kVec are in when the first is
      if (r < rows && c < cols) x[p] = *reinterpret_cast<const Vec<T, kVec>*>(in + r * cols + c);
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int i = ty + p * kRowsPerPass;
      const int64_t r = r0 + i;
      if (r >= rows || c >= cols) continue;
      uint32_t words[kWords<kVec>] = {};
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        const float xf = load_f32(x[p].v[q]);
        key = max(key, abs_key(xf));
        words[q / 4] |= uint32_t(encode<kE4M3>(__fmul_rn(xf, s))) << (8 * (q % 4));
      }
      if constexpr (kVec >= 4) {
        Vec<uint32_t, kWords<kVec>> w;
#pragma unroll
        for (int k = 0; k < kWords<kVec>; ++k) w.v[k] = words[k];
        *reinterpret_cast<Vec<uint32_t, kWords<kVec>>*>(out + r * cols + c) = w;
        if constexpr (kTranspose) {
#pragma unroll
          for (int k = 0; k < kWords<kVec>; ++k)
            *reinterpret_cast<uint32_t*>(&tile[i][tx * kVec + 4 * k]) = words[k];
        }
      } else {
        out[r * cols + c] = uint8_t(words[0]);
        if constexpr (kTranspose) tile[i][tx] = uint8_t(words[0]);
      }
    }
    if constexpr (kTranspose) {
      __syncthreads();  // the tile is complete
      // out_t (C,R): row c0 + j holds tile column j; each thread stores kVec consecutive rows.
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int j = ty + p * kRowsPerPass;
        const int64_t ct = c0 + j, rt = r0 + int64_t(tx) * kVec;
        if (ct >= cols || rt >= rows) continue;  // kVec > 1: rows % kVec == 0
        if constexpr (kVec >= 4) {
          Vec<uint32_t, kWords<kVec>> w;
#pragma unroll
          for (int k = 0; k < kWords<kVec>; ++k) {
            const int i = tx * kVec + 4 * k;
            w.v[k] = uint32_t(tile[i][j]) | uint32_t(tile[i + 1][j]) << 8 |
                     uint32_t(tile[i + 2][j]) << 16 | uint32_t(tile[i + 3][j]) << 24;
          }
          *reinterpret_cast<Vec<uint32_t, kWords<kVec>>*>(out_t + ct * rows + rt) = w;
        } else {
          out_t[ct * rows + rt] = tile[tx][j];
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

template <class T, int kVec, bool kE4M3, bool kTranspose>
void launch_vec(uint8_t* dst, uint8_t* dst_t, int* key, const T* src, const float* s, int64_t rows,
                int64_t cols) {
  const auto kernel = quantize_kernel<T, kVec, kE4M3, kTranspose>;
  static const int per_sm = [&] {  // resident blocks per SM, once per instantiation
    int n = 0;
    TS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return std::max(n, 1);
  }();
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t num_tiles = ((rows + kTile - 1) / kTile) * tiles_c;
  const int64_t blocks = std::min<int64_t>(num_tiles, int64_t(context().num_sms) * per_sm);
  kernel<<<unsigned(blocks), kThreads, 0, stream()>>>(dst, dst_t, key, src, s, rows, cols, tiles_c,
                                                      num_tiles);
  TS_CUDA_CHECK_LAUNCH();
}

template <class T, bool kE4M3, bool kTranspose>
void launch(uint8_t* dst, uint8_t* dst_t, int* key, const T* src, const float* s, int64_t rows,
            int64_t cols) {
  // kVec-wide when every row starts kVec-element aligned and (with the transpose) every out_t
  // row too.
  const auto fits = [&](int v) {
    return cols % v == 0 && aligned_to(src, std::min<size_t>(v * sizeof(T), 16)) &&
           aligned_to(dst, v) && (!kTranspose || (rows % v == 0 && aligned_to(dst_t, v)));
  };
  if (fits(8)) launch_vec<T, 8, kE4M3, kTranspose>(dst, dst_t, key, src, s, rows, cols);
  else if (fits(4)) launch_vec<T, 4, kE4M3, kTranspose>(dst, dst_t, key, src, s, rows, cols);
  else launch_vec<T, 1, kE4M3, kTranspose>(dst, dst_t, key, src, s, rows, cols);
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
