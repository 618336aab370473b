// Building blocks of the memory-bound CUDA kernels (norms, activations, elementwise, rope, loss,
// optimizer): 16-byte packs, alignment and overlap checks, deterministic warp/row reductions, the
// row layouts of the norm kernels, and an elementwise "map" kernel with a vectorized body and a
// scalar tail. Reductions here always combine in a fixed order (no atomics), so results do not
// depend on scheduling. Not a public API: included by kernels/cuda/*.cu only.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace tessera::cuda {

constexpr int kPackBytes = 16;  // one 128-bit load or store per thread
template <class T>
constexpr int kVecWidth = kPackBytes / static_cast<int>(sizeof(T));
constexpr int kBlock = 256;  // threads per block of the elementwise and row kernels

// kWidth consecutive elements, aligned so the whole pack moves as one (or two) vector accesses.
template <class T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

template <class T, int kWidth>
__device__ __forceinline__ Pack<T, kWidth> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kWidth>*>(p);
}
template <class T, int kWidth>
__device__ __forceinline__ void store_pack(T* p, Pack<T, kWidth> x) {
  *reinterpret_cast<Pack<T, kWidth>*>(p) = x;
}

// Butterfly sum over the 32 lanes: every lane ends with the same, order-fixed total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums kNumValues values over the kThreads consecutive threads that share one row. All threads of
// the block must call it (it may contain __syncthreads). smem holds blockDim.x / 32 * kNumValues
// floats. Warp totals are added in warp order, so the result is deterministic.
template <int kThreads, int kNumValues>
__device__ __forceinline__ void row_sum(float (&v)[kNumValues], float* smem) {
#pragma unroll
  for (int k = 0; k < kNumValues; ++k) v[k] = warp_sum(v[k]);
  if constexpr (kThreads > 32) {
    constexpr int kWarps = kThreads / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // a previous call's readers are done with smem
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kNumValues; ++k) smem[warp * kNumValues + k] = v[k];
    }
    __syncthreads();
    const int first_warp = (threadIdx.x / kThreads) * kWarps;
#pragma unroll
    for (int k = 0; k < kNumValues; ++k) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += smem[(first_warp + w) * kNumValues + k];
      v[k] = s;
    }
  }
}

// ---- row layouts of the norm kernels ----------------------------------------------------------
// A row of C = num_packs * kWidth elements is handled by kThreads consecutive threads (a warp or a
// whole block), thread t owning packs t, t + kThreads, ... (kChunks of them, cached in registers).
// Blocks hold max(kBlock, kThreads) threads, i.e. several rows when kThreads < kBlock.
template <int kThreads>
constexpr int kRowBlockThreads = kThreads > kBlock ? kThreads : kBlock;
// The backward kernels hold more registers per row (column sums, the prefetched next row), so
// they use smaller blocks: finer-grained occupancy, more rows in flight per SM.
template <int kThreads>
constexpr int kBackwardBlockThreads = kThreads > 128 ? kThreads : 128;
// Blocks per SM the backward kernels ask the compiler to fit: caps registers at 168 for 128-thread
// blocks (three blocks, 12 warps, instead of two when a layout wants ~170).
template <int kThreads>
constexpr int kBackwardMinBlocks = kBackwardBlockThreads<kThreads> == 128 ? 3 : 1;

// Calls f.template operator()<kThreads, kChunks>() for the first layout that covers num_packs
// with kChunks <= kMaxChunks: one warp per row while it fits (1, 2, 3, 4, 6, 8, 12 or 16 packs
// per lane: C = 768 is 32 lanes x 3 bf16 packs), then 64..1024 threads per row with 2 or
// kMaxChunks packs each. Returns false when the row is wider than 1024 * kMaxChunks packs (the
// caller's streaming fallback).
template <int kMaxChunks, class F>
bool dispatch_row_layout(int64_t num_packs, F&& f) {
  static_assert(kMaxChunks >= 1, "at least one pack per thread");
  bool done = false;
  auto layout = [&]<int kThreads, int kChunks>() {
    if constexpr (kChunks <= kMaxChunks) {
      if (!done && num_packs <= int64_t(kThreads) * kChunks) {
        f.template operator()<kThreads, kChunks>();
        done = true;
      }
    }
  };
  layout.template operator()<32, 1>();
  layout.template operator()<32, 2>();
  layout.template operator()<32, 3>();
  layout.template operator()<32, 4>();
  layout.template operator()<32, 6>();
  layout.template operator()<32, 8>();
  layout.template operator()<32, 12>();
  layout.template operator()<32, 16>();
  auto block = [&]<int kThreads>() {
    layout.template operator()<kThreads, 2>();
    layout.template operator()<kThreads, kMaxChunks>();
  };
  block.template operator()<64>();
  block.template operator()<128>();
  block.template operator()<256>();
  block.template operator()<512>();
  block.template operator()<1024>();
  return done;
}

// dst[c] += sum over g of partial[g * num_c + c], added in the order g = 0, 1, ...: the second
// pass of the deterministic parameter-gradient reductions. Block (32, 32): x picks the column,
// y a strided slice of the partials; the 32 slice sums are then added in y order.
template <class T>
__global__ void __launch_bounds__(1024)
    column_sum_kernel(T* dst, const float* partial, int num_partials, int num_c) {
  __shared__ float slice_sums[32][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.0f;
  if (c < num_c)
    for (int g = threadIdx.y; g < num_partials; g += 32) s += partial[int64_t(g) * num_c + c];
  slice_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < num_c) {
    float total = 0.0f;
    for (int y = 0; y < 32; ++y) total += slice_sums[y][threadIdx.x];
    dst[c] = from_f32<T>(to_f32(dst[c]) + total);
  }
}

template <class T>
void launch_column_sum(T* dst, const float* partial, int num_partials, int num_c,
                       cudaStream_t stream) {
  column_sum_kernel<T>
      <<<ceil_div(num_c, 32), dim3(32, 32), 0, stream>>>(dst, partial, num_partials, num_c);
  TS_CUDA_CHECK_LAUNCH();
}

// Loads the packs that thread t owns in row `row` of a (num_rows, num_c) tensor into registers;
// nothing for a row past the end or packs past the row. The backward norm kernels call it for
// the next row before working on the current one, so its loads are in flight meanwhile.
template <class T, int kWidth, int kThreads, int kChunks>
__device__ __forceinline__ void load_row_packs(Pack<T, kWidth> (&dst)[kChunks], const T* src,
                                               int64_t row, int64_t num_rows, int num_c, int t) {
  if (row >= num_rows) return;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int p = t + k * kThreads;
    if (p < num_c / kWidth) dst[k] = load_pack<T, kWidth>(src + row * num_c + p * kWidth);
  }
}

// Writes the block's column sums (acc: each thread's kChunks x kWidth columns of the row layout;
// kBlockThreads threads in the block) to dst (num_c floats). With several row groups per block,
// their sums are added in group order through shared memory; with one, each thread writes its
// own columns. All threads must call it.
template <int kBlockThreads, int kThreads, int kChunks, int kWidth>
__device__ __forceinline__ void store_column_sums(const float (&acc)[kChunks][kWidth], float* dst,
                                                  int num_c) {
  constexpr int kRowsPerBlock = kBlockThreads / kThreads;
  constexpr int kRowSlots = kThreads * kChunks * kWidth;  // >= num_c
  const int t = threadIdx.x % kThreads;
  if constexpr (kRowsPerBlock == 1) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const int c = (t + k * kThreads) * kWidth + j;
        if (c < num_c) dst[c] = acc[k][j];
      }
  } else {
    __shared__ float combine[kRowsPerBlock * kRowSlots];
    const int group = threadIdx.x / kThreads;
    __syncthreads();  // an earlier call's readers are done with combine
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
#pragma unroll
      for (int j = 0; j < kWidth; ++j)
        combine[group * kRowSlots + (t + k * kThreads) * kWidth + j] = acc[k][j];
    __syncthreads();
    for (int c = threadIdx.x; c < num_c; c += kBlockThreads) {
      float total = 0.0f;
#pragma unroll
      for (int g = 0; g < kRowsPerBlock; ++g) total += combine[g * kRowSlots + c];
      dst[c] = total;
    }
  }
}

// Blocks of `kernel` (block_threads each) that fit on one SM at once.
template <class Kernel>
int resident_blocks_per_sm(Kernel kernel, int block_threads) {
  int blocks = 0;
  TS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, 0));
  return std::max(blocks, 1);
}

// Blocks of a backward norm kernel, each writing one partial row of the parameter gradients:
// one full wave of resident blocks (a persistent grid: no tail wave), fewer when there are fewer
// row groups, and no more partial rows than the workspace holds. The partition depends on the
// shape and the device's SM count, so sums are reproducible run to run on one kind of GPU.
inline int num_partial_blocks(int64_t num_row_groups, int64_t floats_per_partial,
                              int blocks_per_sm) {
  const int64_t wave = int64_t(std::max(context().num_sms, 1)) * blocks_per_sm;
  const int64_t fit = int64_t(context().workspace_bytes / sizeof(float)) / floats_per_partial;
  TS_CHECK(fit >= 1, "workspace of {} bytes too small for {} floats of partial sums",
           context().workspace_bytes, floats_per_partial);
  return static_cast<int>(std::max<int64_t>(1, std::min({num_row_groups, wave, fit})));
}

// ---- host-side helpers ----------------------------------------------------------------------

inline bool is_aligned(const void* p, size_t bytes = kPackBytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when the byte ranges of two tensors intersect.
inline bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.empty() || b.empty()) return false;
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// A present cuda tensor of the given dtype and shape.
inline void expect_tensor(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                          const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == Device::cuda, "{}: {} is {}, expected a cuda tensor", op, name, t.str());
  TS_CHECK(t.dtype == dtype, "{}: {} is {}, expected {} (float tensors of one call share a dtype)",
           op, name, t.str(), dtype_name(dtype));
  TS_CHECK(t.shape == shape, "{}: {} has shape {}, expected {}", op, name, t.shape.str(),
           shape.str());
}

// A parameter gradient (+=) of the given shape beside activations of dtype `dtype`: that dtype,
// or f32 (an FP32 main gradient accumulated from 16-bit activations, kernels/ops.h).
inline void expect_param_grad(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                              const char* name) {
  expect_tensor(t, t.dtype == DType::f32 ? DType::f32 : dtype, shape, op, name);
}

// Runs f.template operator()<TW>() with TW = float for an f32 parameter gradient, else T (the
// activations' type).
template <class T, class F>
void dispatch_param_grad(const Tensor& grad, F&& f) {
  if (grad.dtype == DType::f32)
    f.template operator()<float>();
  else
    f.template operator()<T>();
}

// The first float operand fixes the call's dtype: f32, bf16 or f16 on cuda.
inline void expect_compute_dtype(const Tensor& t, const char* op, const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == Device::cuda, "{}: {} is {}, expected a cuda tensor", op, name, t.str());
  TS_CHECK(is_compute_dtype(t.dtype), "{}: {} is {}; the CUDA kernels compute on f32, bf16 or f16",
           op, name, t.str());
}

// Rows of a (..., C) tensor: the product of all dims but the last.
inline int64_t num_rows_of(const Tensor& t) {
  int64_t n = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) n *= t.dim(i);
  return n;
}

// Grid for a grid-stride loop over `work` items with kBlock-thread blocks: at most 64 blocks per
// SM, enough to keep every SM full while each thread handles a few items.
inline int grid_for(int64_t work) {
  const int64_t cap = int64_t(std::max(context().num_sms, 1)) * 64;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kBlock), cap)));
}

// ---- elementwise map ------------------------------------------------------------------------
// out_k[i] = Op(in_0[i], ..., in_{kNumIn-1}[i]) for k < kNumOut, computed in f32. Each element is
// read before it is written by the same thread, so an output may alias an input exactly.

template <class T, int kNumIn, int kNumOut>
struct MapArgs {
  const T* in[kNumIn > 0 ? kNumIn : 1] = {};
  T* out[kNumOut] = {};
};

template <class T, int kWidth, int kNumIn, int kNumOut, class Op>
__device__ __forceinline__ void map_apply(const MapArgs<T, kNumIn, kNumOut>& a, int64_t i,
                                          const Op& op) {
  float x[kNumIn > 0 ? kNumIn : 1][kWidth];
#pragma unroll
  for (int k = 0; k < kNumIn; ++k) {
    const Pack<T, kWidth> p = load_pack<T, kWidth>(a.in[k] + i);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) x[k][j] = to_f32(p.v[j]);
  }
  Pack<T, kWidth> y[kNumOut];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    float xin[kNumIn > 0 ? kNumIn : 1], yout[kNumOut];
#pragma unroll
    for (int k = 0; k < kNumIn; ++k) xin[k] = x[k][j];
    op(xin, yout);
#pragma unroll
    for (int k = 0; k < kNumOut; ++k) y[k].v[j] = from_f32<T>(yout[k]);
  }
#pragma unroll
  for (int k = 0; k < kNumOut; ++k) store_pack<T, kWidth>(a.out[k] + i, y[k]);
}

// Packs of kWidth through a grid-stride loop; the n % kWidth tail elements go to the first threads.
template <class T, int kWidth, int kNumIn, int kNumOut, class Op>
__global__ void __launch_bounds__(kBlock)
    map_kernel(MapArgs<T, kNumIn, kNumOut> a, int64_t n, Op op) {
  const int64_t num_packs = n / kWidth;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = first; p < num_packs; p += stride) map_apply<T, kWidth>(a, p * kWidth, op);
  if (kWidth > 1 && first < n - num_packs * kWidth)
    map_apply<T, 1>(a, num_packs * kWidth + first, op);
}

// Launches map_kernel with 16-byte packs when every pointer allows it, else element by element.
template <class T, int kNumIn, int kNumOut, class Op>
void launch_map(const MapArgs<T, kNumIn, kNumOut>& a, int64_t n, const Op& op,
                cudaStream_t stream) {
  if (n == 0) return;
  bool aligned = true;
  for (int k = 0; k < kNumIn; ++k) aligned = aligned && is_aligned(a.in[k]);
  for (int k = 0; k < kNumOut; ++k) aligned = aligned && is_aligned(a.out[k]);
  constexpr int kVec = kVecWidth<T>;
  if (aligned) {
    map_kernel<T, kVec, kNumIn, kNumOut, Op>
        <<<grid_for(ceil_div(n, kVec)), kBlock, 0, stream>>>(a, n, op);
  } else {
    map_kernel<T, 1, kNumIn, kNumOut, Op><<<grid_for(n), kBlock, 0, stream>>>(a, n, op);
  }
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace tessera::cuda
