// CUDA bias_add and bias_grad (kernels/ops.h; CPU reference kernels/cpu/bias.cpp): the bias half
// of a linear layer whose GEMM has no bias epilogue (ops::gemm_fp8). Kernels at the top, launchers
// below. bias_grad is a deterministic two-pass column sum (no atomics): f32 partial sums per
// (row chunk, column strip) tile into the context workspace, then a fixed-order sum over chunks.
// Shape letters: M rows (all leading dims flattened), N columns.
#include <algorithm>
#include <climits>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

// bias_grad tiles: block (kStripLanes, kRowLanes). A warp reads kStripLanes packs of one row
// (512 contiguous bytes with 16-byte packs); the kRowLanes warps take interleaved rows.
constexpr int kStripLanes = 32;
constexpr int kRowLanes = 8;
constexpr int kUnroll = 4;  // rows a thread loads before adding them (loads in flight)
// The row chunking of bias_grad is a function of (M, N) alone, never of the device, the dtype or
// the pointer alignment, so a column sum has the same bits on every GPU and on both load paths.
constexpr int64_t kChunkColumns = 256;   // nominal strip width for the chunk count (bf16 strip)
constexpr int64_t kTargetBlocks = 2048;  // tiles to aim for: several waves on a 132-SM GPU
// A chunk's partial costs 8 bytes per column (written, read back), a chunk reads 2 * rows bytes
// per column of bf16: at >= 128 rows the partials add at most 3% to the traffic.
constexpr int64_t kMinChunkRows = 128;

// out (M,N) += bias (N). Thread x of block (bx, by) owns columns [col, col + kWidth) with col =
// (bx * blockDim.x + x) * kWidth, holds their bias in registers and walks rows by * blockDim.y +
// y, then by gridDim.y * blockDim.y. kWidth > 1 needs N % kWidth == 0 and 16-byte aligned out.
template <class T, class TB, int kWidth>
__global__ void __launch_bounds__(kBlock)
    bias_add_kernel(T* __restrict__ out, const TB* __restrict__ bias, int64_t m, int64_t n) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kWidth;
  if (col >= n) return;
  float b[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) b[j] = to_f32(bias[col + j]);
  const int64_t row_stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < m; row += row_stride) {
    T* p = out + row * n + col;
    Pack<T, kWidth> x = load_pack<T, kWidth>(p);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) x.v[j] = from_f32<T>(to_f32(x.v[j]) + b[j]);
    store_pack<T, kWidth>(p, x);
  }
}

// Column sums of one tile: rows [blockIdx.y * rows_per_chunk, + rows_per_chunk) of strip
// blockIdx.x (kStripLanes * kWidth columns). Thread (x, y) sums, in f32 and increasing row order,
// rows chunk_begin + y, + kRowLanes, ... of its kWidth columns; the kRowLanes lane sums of a column
// are then added in lane order. Each column's order is thus fixed by (M, rows_per_chunk) whatever
// kWidth is. kDirect (one chunk only): dst is dbias, dbias += sum rounded once; otherwise dst is
// the (num_chunks, N) f32 partial buffer and row blockIdx.y of it is overwritten.
template <class T, class TD, int kWidth, bool kDirect>
__global__ void __launch_bounds__(kStripLanes* kRowLanes)
    colsum_tile_kernel(TD* dst, const T* __restrict__ dout, int64_t m, int64_t n,
                       int64_t rows_per_chunk) {
  constexpr int kStripCols = kStripLanes * kWidth;
  __shared__ float lane_sums[kRowLanes][kStripCols];
  const int64_t strip_begin = int64_t(blockIdx.x) * kStripCols;
  const int64_t col = strip_begin + int64_t(threadIdx.x) * kWidth;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = std::min(m, row_begin + rows_per_chunk);
  float acc[kWidth] = {};
  if (col < n) {  // with kWidth > 1, N % kWidth == 0: the whole pack is inside the row
    const T* p = dout + col;
    int64_t row = row_begin + threadIdx.y;
    for (; row + (kUnroll - 1) * kRowLanes < row_end; row += kUnroll * kRowLanes) {
      Pack<T, kWidth> x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x[u] = load_pack<T, kWidth>(p + (row + u * kRowLanes) * n);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kWidth; ++j) acc[j] += to_f32(x[u].v[j]);
    }
    for (; row < row_end; row += kRowLanes) {
      const Pack<T, kWidth> x = load_pack<T, kWidth>(p + row * n);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) acc[j] += to_f32(x.v[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kWidth; ++j) lane_sums[threadIdx.y][threadIdx.x * kWidth + j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.y * kStripLanes + threadIdx.x; c < kStripCols;
       c += kStripLanes * kRowLanes) {
    if (strip_begin + c >= n) break;
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kRowLanes; ++y) total += lane_sums[y][c];
    if constexpr (kDirect) {
      dst[strip_begin + c] = from_f32<TD>(to_f32(dst[strip_begin + c]) + total);
    } else {
      dst[int64_t(blockIdx.y) * n + strip_begin + c] = total;
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------

// bias / dbias: (N) on cuda, the op's dtype or f32.
void check_vector(const Tensor& t, DType dtype, int64_t n, const char* op, const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == Device::cuda, "{}: {} is {}, expected a cuda tensor", op, name, t.str());
  TS_CHECK(t.dtype == dtype || t.dtype == DType::f32, "{}: {} is {}, expected {} or f32", op, name,
           t.str(), dtype_name(dtype));
  TS_CHECK(t.shape == Shape{n}, "{}: {} has shape {}, expected ({})", op, name, t.shape.str(), n);
}

// Runs f.template operator()<V>() with V = float for an f32 vector, else the matrix's type T.
template <class T, class F>
void dispatch_vector(const Tensor& v, F&& f) {
  if (v.dtype == DType::f32)
    f.template operator()<float>();
  else
    f.template operator()<T>();
}

struct ChunkPlan {
  int64_t rows_per_chunk = 0, num_chunks = 0;
};

// About kTargetBlocks tiles over nominal 256-column strips, chunks of >= kMinChunkRows rows, and
// no more chunks than grid.y allows; (M, N) in, nothing else.
ChunkPlan plan_chunks(int64_t m, int64_t n) {
  const int64_t num_strips = (n + kChunkColumns - 1) / kChunkColumns;
  const int64_t target_chunks = std::max<int64_t>(1, kTargetBlocks / num_strips);
  ChunkPlan plan;
  plan.rows_per_chunk =
      std::max({kMinChunkRows, (m + target_chunks - 1) / target_chunks, (m + 65534) / 65535});
  plan.num_chunks = (m + plan.rows_per_chunk - 1) / plan.rows_per_chunk;
  return plan;
}

}  // namespace

void bias_add(Tensor out, Tensor bias, ops::Stream stream) {
  constexpr const char* kOp = "bias_add";
  expect_compute_dtype(out, kOp, "out");
  TS_CHECK(out.ndim() >= 1, "{}: out must be (..., N), got {}", kOp, out.str());
  const int64_t n = out.dim(-1), m = num_rows_of(out);
  check_vector(bias, out.dtype, n, kOp, "bias");
  TS_CHECK(!overlaps(out, bias), "{}: out {} overlaps bias {}", kOp, out.str(), bias.str());
  if (m == 0 || n == 0) return;
  dispatch_float(out, kOp, [&]<class T>() {
    dispatch_vector<T>(bias, [&]<class TB>() {
      constexpr int kVec = kVecWidth<T>;
      const bool vec = n % kVec == 0 && is_aligned(out.data);
      const int64_t packs = vec ? n / kVec : n;  // per row
      // A block spans min(256, packs rounded up to a warp) packs and 256 / that many rows.
      const int block_x = static_cast<int>(std::min<int64_t>(kBlock, (packs + 31) / 32 * 32));
      const int block_y = kBlock / block_x;
      const int64_t grid_x = (packs + block_x - 1) / block_x;
      const int64_t wave = int64_t(std::max(context().num_sms, 1)) * 16;
      const int64_t grid_y = std::clamp<int64_t>(
          std::min((m + block_y - 1) / block_y, (wave + grid_x - 1) / grid_x), 1, 65535);
      TS_CHECK(grid_x <= INT_MAX, "{}: N = {} too wide", kOp, n);
      const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
      const dim3 block(block_x, block_y);
      auto* o = static_cast<T*>(out.data);
      const auto* b = static_cast<const TB*>(bias.data);
      if (vec)
        bias_add_kernel<T, TB, kVec><<<grid, block, 0, cuda_stream(stream)>>>(o, b, m, n);
      else
        bias_add_kernel<T, TB, 1><<<grid, block, 0, cuda_stream(stream)>>>(o, b, m, n);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void bias_grad(Tensor dbias, Tensor dout, ops::Stream stream) {
  constexpr const char* kOp = "bias_grad";
  expect_compute_dtype(dout, kOp, "dout");
  TS_CHECK(dout.ndim() >= 1, "{}: dout must be (..., N), got {}", kOp, dout.str());
  const int64_t n = dout.dim(-1), m = num_rows_of(dout);
  check_vector(dbias, dout.dtype, n, kOp, "dbias");
  TS_CHECK(!overlaps(dbias, dout), "{}: dbias {} overlaps dout {}", kOp, dbias.str(), dout.str());
  if (m == 0 || n == 0) return;
  TS_CHECK(n <= INT_MAX, "{}: N = {} exceeds the column-sum kernels' int range", kOp, n);
  const ChunkPlan plan = plan_chunks(m, n);
  const Context& ctx = context();
  // At most kTargetBlocks * kChunkColumns floats (2 MiB) when there are several chunks, far below
  // the 64 MiB a context workspace has at least, so the plan never depends on its size.
  TS_CHECK(plan.num_chunks == 1 ||
               size_t(plan.num_chunks) * size_t(n) * sizeof(float) <= ctx.workspace_bytes,
           "{}: {} partial rows of N = {} floats exceed the workspace of {} bytes", kOp,
           plan.num_chunks, n, ctx.workspace_bytes);
  // The workspace is free: the device's ops run one after another (kernels/cuda/context.h), so an
  // earlier GEMM is done with it.
  float* partial = static_cast<float*>(ctx.workspace);
  dispatch_float(dout, kOp, [&]<class T>() {
    dispatch_vector<T>(dbias, [&]<class TD>() {
      constexpr int kVec = kVecWidth<T>;
      const bool vec = n % kVec == 0 && is_aligned(dout.data);
      const int64_t strip_cols = int64_t(kStripLanes) * (vec ? kVec : 1);
      const dim3 grid(static_cast<unsigned>((n + strip_cols - 1) / strip_cols),
                      static_cast<unsigned>(plan.num_chunks));
      const dim3 block(kStripLanes, kRowLanes);
      const T* d = static_cast<const T*>(dout.data);
      const int64_t rows = plan.rows_per_chunk;
      const auto tiles = [&]<bool kDirect, class TDst>(TDst* dst) {
        if (vec) {
          colsum_tile_kernel<T, TDst, kVec, kDirect>
              <<<grid, block, 0, cuda_stream(stream)>>>(dst, d, m, n, rows);
        } else {
          colsum_tile_kernel<T, TDst, 1, kDirect>
              <<<grid, block, 0, cuda_stream(stream)>>>(dst, d, m, n, rows);
        }
        TS_CUDA_CHECK_LAUNCH();
      };
      // One chunk: the tile kernel adds into dbias itself. Bit-identical to the two passes: its
      // total is never -0 (every sum starts at +0), so column_sum_kernel adding the +0 of absent
      // chunks would not change it.
      TD* db = static_cast<TD*>(dbias.data);
      if (plan.num_chunks == 1) return tiles.template operator()<true>(db);
      tiles.template operator()<false>(partial);
      launch_column_sum<TD>(db, partial, static_cast<int>(plan.num_chunks), static_cast<int>(n),
                            cuda_stream(stream));
    });
  });
}

}  // namespace tessera::cuda
