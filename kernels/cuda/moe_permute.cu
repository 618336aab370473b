// CUDA MoE dispatch plan (slots sorted stably by expert, capacity dropping by position) and the
// token permute/unpermute row moves with their backwards (kernels/ops_moe.h defines each op).
// Shapes: N tokens, K slots per token (slot s = t*K + j), E experts, R permuted rows, C width.
//
// The plan, without a host synchronisation and with integer arithmetic only (so it is exact and
// deterministic whatever the scheduling), in four launches over tiles of consecutive slots:
//   1. histogram: each tile's W warps walk their own 32-slot chunks in slot order; per chunk,
//      __match_any_sync groups the lanes of equal expert and the group's lowest lane adds the
//      group size to the warp's own counter row in shared memory (W x E counters, no atomics).
//      The block then writes its per-expert totals to hist[e][tile] (the context workspace).
//   2. tile scan: one warp per expert scans hist[e][:] over the tiles (exclusive, in place): the
//      position of the expert's first slot in each tile; the total is tokens_per_expert[e].
//   3. offsets: one block scans min(tokens_per_expert[e], capacity) over the experts.
//   4. place: each tile recounts its warps' chunks (as in 1), turns the W x E counters into
//      exclusive prefixes over the warps starting at the tile's position from 2, then walks the
//      chunks again: a slot's position p(s) = its warp's running counter + the number of lower
//      lanes in its match group; the group's lowest lane advances the counter. Chunks, warps and
//      tiles are visited in slot order, so p(s) counts exactly the earlier slots of the expert
//      (stable). Kept slots (p < capacity) get row offsets[e] + p in slot_row and their slot in
//      row_slot; every block also fills its share of row_slot[offsets[E], R) with -1.
// Work is O(N*K + E * tiles) with tiles = N*K / (W * 128); shared memory W*E ints (W = 8 up to
// E = 1536, fewer warps for more experts, E <= 12288). Expert ids outside [0, E) are a caller bug
// (checked on the CPU); here such a slot is treated as routed nowhere (slot_row -1, not counted).
//
// Row moves: 16-byte packs when C and every row pointer allow, element by element otherwise;
// sums in f32, over j in order (no atomics). One warp per row: moe_permute per permuted row, the
// two combines per token; moe_unpermute_backward per permuted row r, which writes dyp[r] and,
// with a fixed-order warp reduction, d_topk_w of the slot row_slot[r] (slot_row and row_slot come
// from one plan, so that covers every kept slot once); a second launch zeroes d_topk_w of the
// dropped slots. An index outside its range (a caller bug, checked on the CPU) reads as unused.
#include <climits>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/moe.h"

namespace tessera::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- dispatch plan ----------------------------------------------------------------------------

constexpr int kPlanChunks = 4;        // 32-slot chunks per warp and tile
constexpr int kPlanMaxWarps = 8;      // warps per tile
constexpr int kPlanSmemInts = 12288;  // 48 KB of per-warp expert counters (the default limit)
constexpr int kOffsetsThreads = 1024;

struct PlanGeometry {
  int warps;      // per block (tile)
  int tile;       // slots per tile
  int num_tiles;  // at least 1, so an empty routing still writes its zero counts
};

PlanGeometry plan_geometry(int64_t num_slots, int64_t num_e) {
  const int warps = static_cast<int>(std::min<int64_t>(kPlanMaxWarps, kPlanSmemInts / num_e));
  const int tile = warps * kPlanChunks * 32;
  return {warps, tile, std::max(1, ceil_div(num_slots, tile))};
}

// The experts of the lane's slot in each of its warp's chunks (first_slot: the warp's first slot);
// -1 past the last slot and for ids outside [0, E).
__device__ __forceinline__ void load_warp_experts(int (&expert)[kPlanChunks], const int32_t* idx,
                                                  int64_t first_slot, int num_slots, int num_e,
                                                  int lane) {
#pragma unroll
  for (int c = 0; c < kPlanChunks; ++c) {
    const int64_t s = first_slot + c * 32 + lane;
    const int e = s < num_slots ? idx[s] : -1;
    expert[c] = e >= 0 && e < num_e ? e : -1;
  }
}

// counts[e] += the warp's slots of expert e. Only this warp touches its counter row, and within a
// chunk each expert has one group leader, so there are no races and no atomics.
__device__ __forceinline__ void count_warp_slots(int* counts, const int (&expert)[kPlanChunks],
                                                 int lane) {
#pragma unroll
  for (int c = 0; c < kPlanChunks; ++c) {
    const unsigned peers = __match_any_sync(kFullMask, expert[c]);
    if (expert[c] >= 0 && lane == __ffs(peers) - 1) counts[expert[c]] += __popc(peers);
    __syncwarp();
  }
}

// Step 1: hist[e * num_tiles + tile] = slots of expert e in the tile.
__global__ void plan_histogram_kernel(int32_t* hist, const int32_t* idx, int num_slots, int num_e,
                                      int num_tiles) {
  extern __shared__ int counts[];  // (W, E)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int i = threadIdx.x; i < warps * num_e; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  int expert[kPlanChunks];
  const int64_t first_slot = (int64_t(blockIdx.x) * warps + warp) * (kPlanChunks * 32);
  load_warp_experts(expert, idx, first_slot, num_slots, num_e, lane);
  count_warp_slots(counts + warp * num_e, expert, lane);
  __syncthreads();
  for (int e = threadIdx.x; e < num_e; e += blockDim.x) {
    int total = 0;
    for (int w = 0; w < warps; ++w) total += counts[w * num_e + e];
    hist[int64_t(e) * num_tiles + blockIdx.x] = total;
  }
}

// Step 2: one warp per expert; hist[e, :] becomes its exclusive prefix over the tiles.
__global__ void __launch_bounds__(kBlock)
    plan_scan_tiles_kernel(int32_t* hist, int32_t* tokens_per_expert, int num_e, int num_tiles) {
  const int e = blockIdx.x * (kBlock / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (e >= num_e) return;  // the whole warp
  int32_t* row = hist + int64_t(e) * num_tiles;
  int carry = 0;
  for (int first = 0; first < num_tiles; first += 32) {
    const int b = first + lane;
    const int v = b < num_tiles ? row[b] : 0;
    int inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    if (b < num_tiles) row[b] = carry + inclusive - v;
    carry += __shfl_sync(kFullMask, inclusive, 31);
  }
  if (lane == 0) tokens_per_expert[e] = carry;
}

// Step 3: offsets[e] = sum over e' < e of min(tokens_per_expert[e'], capacity); one block, each
// thread a run of consecutive experts.
__global__ void __launch_bounds__(kOffsetsThreads)
    plan_offsets_kernel(int32_t* offsets, const int32_t* tokens_per_expert, int num_e,
                        int capacity) {
  using Scan = cub::BlockScan<int, kOffsetsThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int per_thread = (num_e + kOffsetsThreads - 1) / kOffsetsThreads;
  const int begin = min(num_e, int(threadIdx.x) * per_thread);
  const int end = min(num_e, begin + per_thread);
  int sum = 0;
  for (int e = begin; e < end; ++e) sum += min(tokens_per_expert[e], capacity);
  int before = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(sum, before, total);
  for (int e = begin; e < end; ++e) {
    offsets[e] = before;
    before += min(tokens_per_expert[e], capacity);
  }
  if (threadIdx.x == 0) offsets[num_e] = total;
}

// Step 4: positions, slot_row, row_slot (see the file comment).
__global__ void plan_place_kernel(int32_t* slot_row, int32_t* row_slot, const int32_t* idx,
                                  const int32_t* tile_base, const int32_t* offsets, int num_slots,
                                  int num_e, int num_tiles, int num_rows, int capacity) {
  extern __shared__ int counts[];  // (W, E)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int i = threadIdx.x; i < warps * num_e; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  int expert[kPlanChunks];
  const int64_t first_slot = (int64_t(blockIdx.x) * warps + warp) * (kPlanChunks * 32);
  load_warp_experts(expert, idx, first_slot, num_slots, num_e, lane);
  count_warp_slots(counts + warp * num_e, expert, lane);
  __syncthreads();
  // Counts -> each warp's first position per expert: the tile's base plus the earlier warps.
  for (int e = threadIdx.x; e < num_e; e += blockDim.x) {
    int running = tile_base[int64_t(e) * num_tiles + blockIdx.x];
    for (int w = 0; w < warps; ++w) {
      const int c = counts[w * num_e + e];
      counts[w * num_e + e] = running;
      running += c;
    }
  }
  __syncthreads();
  int* next = counts + warp * num_e;
  const unsigned lower_lanes = (1u << lane) - 1u;
#pragma unroll
  for (int c = 0; c < kPlanChunks; ++c) {
    const int e = expert[c];
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int p = e >= 0 ? next[e] + __popc(peers & lower_lanes) : 0;
    __syncwarp();  // every lane of the group has read next[e] before its leader advances it
    if (e >= 0 && lane == __ffs(peers) - 1) next[e] += __popc(peers);
    __syncwarp();
    const int64_t s = first_slot + c * 32 + lane;
    if (s < num_slots) {
      const int row = e >= 0 && p < capacity ? offsets[e] + p : -1;
      slot_row[s] = row;
      if (row >= 0 && row < num_rows) row_slot[row] = static_cast<int32_t>(s);
    }
  }
  // Rows past the kept ones are unused; the slots above wrote only rows below offsets[E].
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = offsets[num_e] + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < num_rows;
       r += stride)
    row_slot[r] = -1;
}

// ---- row moves --------------------------------------------------------------------------------

template <class T, int kWidth>
__device__ __forceinline__ Pack<T, kWidth> zero_pack() {
  Pack<T, kWidth> z;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) z.v[k] = from_f32<T>(0.0f);
  return z;
}

// Rows are handled one warp each (grid-stride over rows); lane l moves packs l, l + 32, ... of
// the row. The row's index is one broadcast load, and no item index is divided by the row width.
constexpr int kRowWarps = kBlock / 32;

__device__ __forceinline__ int64_t first_warp_row() {
  return int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t warp_row_stride() { return int64_t(gridDim.x) * kRowWarps; }

// xp[r] = x[row_slot[r] / K], zero for unused rows.
template <class T, int kWidth>
__global__ void __launch_bounds__(kBlock)
    permute_kernel(T* xp, const T* x, const int32_t* row_slot, int64_t num_rows, int num_c,
                   int topk, int64_t num_slots) {
  const int lane = threadIdx.x % 32, packs = num_c / kWidth;
  for (int64_t r = first_warp_row(); r < num_rows; r += warp_row_stride()) {
    const int32_t s = row_slot[r];
    T* dst = xp + r * num_c;
    if (s < 0 || s >= num_slots) {
      for (int p = lane; p < packs; p += 32)
        store_pack<T, kWidth>(dst + p * kWidth, zero_pack<T, kWidth>());
      continue;
    }
    const T* src = x + int64_t(s / topk) * num_c;
#pragma unroll 4
    for (int p = lane; p < packs; p += 32)
      store_pack<T, kWidth>(dst + p * kWidth, load_pack<T, kWidth>(src + p * kWidth));
  }
}

// out[t] = sum over kept j of w[t,j] * rows[slot_row[t,j]] (w = 1 unless kWeighted), in j order in
// f32: moe_permute_backward and moe_unpermute, one warp per token.
template <class T, int kWidth, bool kWeighted>
__global__ void __launch_bounds__(kBlock)
    combine_kernel(T* out, const T* rows, const int32_t* slot_row, const float* topk_w,
                   int64_t num_t, int num_c, int topk, int64_t num_rows) {
  const int lane = threadIdx.x % 32, packs = num_c / kWidth;
  for (int64_t t = first_warp_row(); t < num_t; t += warp_row_stride()) {
    const int32_t* t_rows = slot_row + t * topk;
    for (int p = lane; p < packs; p += 32) {
      float acc[kWidth] = {};
      for (int j = 0; j < topk; ++j) {
        const int32_t r = t_rows[j];
        if (r < 0 || r >= num_rows) continue;
        const Pack<T, kWidth> y = load_pack<T, kWidth>(rows + int64_t(r) * num_c + p * kWidth);
        if constexpr (kWeighted) {
          const float w = topk_w[t * topk + j];
#pragma unroll
          for (int k = 0; k < kWidth; ++k) acc[k] += w * to_f32(y.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < kWidth; ++k) acc[k] += to_f32(y.v[k]);
        }
      }
      Pack<T, kWidth> o;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) o.v[k] = from_f32<T>(acc[k]);
      store_pack<T, kWidth>(out + t * num_c + p * kWidth, o);
    }
  }
}

// One warp per permuted row r with s = row_slot[r]: dyp[r] = topk_w[s] * dout[s/K] and
// d_topk_w[s] = <dout[s/K], yp[r]> (lane partial sums in pack order, then a butterfly); zero dyp
// row and no d_topk_w for an unused row.
template <class T, int kWidth>
__global__ void __launch_bounds__(kBlock)
    unpermute_backward_kernel(T* dyp, float* d_topk_w, const T* dout, const T* yp,
                              const int32_t* row_slot, const float* topk_w, int64_t num_rows,
                              int num_c, int topk, int64_t num_slots) {
  const int lane = threadIdx.x % 32, packs = num_c / kWidth;
  for (int64_t r = first_warp_row(); r < num_rows; r += warp_row_stride()) {
    const int32_t s = row_slot[r];
    T* dy_row = dyp + r * num_c;
    if (s < 0 || s >= num_slots) {  // the whole warp
      for (int p = lane; p < packs; p += 32)
        store_pack<T, kWidth>(dy_row + p * kWidth, zero_pack<T, kWidth>());
      continue;
    }
    const T* d_row = dout + int64_t(s / topk) * num_c;
    const T* y_row = yp + r * num_c;
    const float w = topk_w[s];
    float dot = 0.0f;
    for (int p = lane; p < packs; p += 32) {
      const Pack<T, kWidth> d = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> y = load_pack<T, kWidth>(y_row + p * kWidth);
      Pack<T, kWidth> g;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        dot += to_f32(d.v[k]) * to_f32(y.v[k]);
        g.v[k] = from_f32<T>(w * to_f32(d.v[k]));
      }
      store_pack<T, kWidth>(dy_row + p * kWidth, g);
    }
    dot = warp_sum(dot);
    if (lane == 0) d_topk_w[s] = dot;
  }
}

// d_topk_w[s] = 0 for the dropped slots (the row kernel wrote the kept ones).
__global__ void __launch_bounds__(kBlock)
    zero_dropped_kernel(float* d_topk_w, const int32_t* slot_row, int64_t num_slots,
                        int64_t num_rows) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < num_slots && (slot_row[s] < 0 || slot_row[s] >= num_rows)) d_topk_w[s] = 0.0f;
}

// ---- launchers ------------------------------------------------------------------------------

// A present i32 cuda tensor of the given shape.
void expect_index(const Tensor& t, const Shape& shape, const char* op, const char* name) {
  TS_CHECK(!t.empty() && t.device == Device::cuda && t.dtype == DType::i32,
           "{}: {} must be an i32 cuda tensor, got {}", op, name, t.str());
  TS_CHECK(t.shape == shape, "{}: {} has shape {}, expected {}", op, name, t.shape.str(),
           shape.str());
}

// The first float operand: a 2-D (rows, C) cuda tensor in f32, bf16 or f16.
void expect_rows(const Tensor& t, const char* op, const char* name) {
  expect_compute_dtype(t, op, name);
  TS_CHECK(t.ndim() == 2, "{}: {} must be (rows, C), got {}", op, name, t.str());
  TS_CHECK(t.dim(1) < (int64_t(1) << 30), "{}: C = {} is too large", op, t.dim(1));
}

// The (N, K) index tensor slot_row.
void expect_slot_row(const Tensor& slot_row, const char* op) {
  TS_CHECK(slot_row.ndim() == 2, "{}: slot_row must be (N, K), got {}", op, slot_row.str());
  expect_index(slot_row, slot_row.shape, op, "slot_row");
  TS_CHECK(slot_row.numel() < (int64_t(1) << 31), "{}: {} slots are too many", op,
           slot_row.numel());
}

void expect_weights(const Tensor& t, const Shape& shape, const char* op, const char* name) {
  expect_tensor(t, DType::f32, shape, op, name);
}

// 16-byte packs when C is a multiple of the pack and every row tensor is 16-byte aligned.
bool use_packs(int64_t num_c, int width, std::initializer_list<const Tensor*> rows) {
  if (num_c % width != 0) return false;
  for (const Tensor* t : rows)
    if (!is_aligned(t->data)) return false;
  return true;
}

// Blocks for one warp per row: every row at once, up to 32 blocks (256 warps) per SM.
int row_grid(int64_t rows) {
  const int64_t cap = int64_t(std::max(context().num_sms, 1)) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kRowWarps), cap)));
}

// Runs f.template operator()<kWidth>() with the pack width for T, or 1.
template <class T, class F>
void dispatch_width(int64_t num_c, std::initializer_list<const Tensor*> rows, F&& f) {
  if (use_packs(num_c, kVecWidth<T>, rows))
    f.template operator()<kVecWidth<T>>();
  else
    f.template operator()<1>();
}

}  // namespace

void moe_dispatch_plan(Tensor tokens_per_expert, Tensor offsets, Tensor slot_row, Tensor row_slot,
                       Tensor topk_idx, int64_t capacity, ops::Stream stream) {
  constexpr const char* kOp = "moe_dispatch_plan";
  TS_CHECK(topk_idx.ndim() == 2, "{}: topk_idx must be (N, K), got {}", kOp, topk_idx.str());
  expect_index(topk_idx, topk_idx.shape, kOp, "topk_idx");
  TS_CHECK(tokens_per_expert.ndim() == 1 && tokens_per_expert.numel() >= 1,
           "{}: tokens_per_expert must be (E) with E >= 1, got {}", kOp, tokens_per_expert.str());
  const int64_t num_e = tokens_per_expert.numel(), num_slots = topk_idx.numel();
  expect_index(tokens_per_expert, Shape{num_e}, kOp, "tokens_per_expert");
  expect_index(offsets, Shape{num_e + 1}, kOp, "offsets");
  expect_index(slot_row, topk_idx.shape, kOp, "slot_row");
  TS_CHECK(row_slot.ndim() == 1, "{}: row_slot must be (R), got {}", kOp, row_slot.str());
  expect_index(row_slot, row_slot.shape, kOp, "row_slot");
  TS_CHECK(num_e <= kPlanSmemInts, "{}: E = {} experts, the CUDA plan handles at most {}", kOp,
           num_e, kPlanSmemInts);
  TS_CHECK(num_slots < (int64_t(1) << 30) && row_slot.numel() < (int64_t(1) << 31),
           "{}: {} slots / {} rows are too many for one call", kOp, num_slots, row_slot.numel());
  const PlanGeometry g = plan_geometry(num_slots, num_e);
  const size_t hist_bytes = sizeof(int32_t) * size_t(num_e) * size_t(g.num_tiles);
  Context& ctx = context();
  TS_CHECK(hist_bytes <= ctx.workspace_bytes,
           "{}: {} experts x {} tiles need {} bytes of workspace, have {}", kOp, num_e, g.num_tiles,
           hist_bytes, ctx.workspace_bytes);
  // capacity <= 0 is dropless: a cap no position reaches.
  const int cap = capacity <= 0 ? INT_MAX : static_cast<int>(std::min<int64_t>(capacity, INT_MAX));
  const int ne = static_cast<int>(num_e), ns = static_cast<int>(num_slots);
  const int nr = static_cast<int>(row_slot.numel());
  auto* hist = static_cast<int32_t*>(ctx.workspace);
  const auto* idx = static_cast<const int32_t*>(topk_idx.data);
  auto* tpe = static_cast<int32_t*>(tokens_per_expert.data);
  auto* off = static_cast<int32_t*>(offsets.data);
  const cudaStream_t s = cuda_stream(stream);
  const size_t smem = sizeof(int) * size_t(g.warps) * size_t(num_e);

  plan_histogram_kernel<<<g.num_tiles, g.warps * 32, smem, s>>>(hist, idx, ns, ne, g.num_tiles);
  TS_CUDA_CHECK_LAUNCH();
  plan_scan_tiles_kernel<<<ceil_div(num_e, kBlock / 32), kBlock, 0, s>>>(hist, tpe, ne,
                                                                         g.num_tiles);
  TS_CUDA_CHECK_LAUNCH();
  plan_offsets_kernel<<<1, kOffsetsThreads, 0, s>>>(off, tpe, ne, cap);
  TS_CUDA_CHECK_LAUNCH();
  plan_place_kernel<<<g.num_tiles, g.warps * 32, smem, s>>>(
      static_cast<int32_t*>(slot_row.data), static_cast<int32_t*>(row_slot.data), idx, hist, off,
      ns, ne, g.num_tiles, nr, cap);
  TS_CUDA_CHECK_LAUNCH();
}

void moe_permute(Tensor xp, Tensor x, Tensor row_slot, int topk, ops::Stream stream) {
  constexpr const char* kOp = "moe_permute";
  expect_rows(x, kOp, "x");
  const int64_t num_t = x.dim(0), num_c = x.dim(1);
  TS_CHECK(xp.ndim() == 2, "{}: xp must be (R, C), got {}", kOp, xp.str());
  const int64_t num_rows = xp.dim(0);
  expect_tensor(xp, x.dtype, Shape{num_rows, num_c}, kOp, "xp");
  expect_index(row_slot, Shape{num_rows}, kOp, "row_slot");
  TS_CHECK(topk >= 1, "{}: topk must be >= 1, got {}", kOp, topk);
  TS_CHECK(!overlaps(xp, x), "{}: xp must not alias x", kOp);
  if (num_rows * num_c == 0) return;
  dispatch_float(x, kOp, [&]<class T>() {
    dispatch_width<T>(num_c, {&xp, &x}, [&]<int kWidth>() {
      permute_kernel<T, kWidth><<<row_grid(num_rows), kBlock, 0, cuda_stream(stream)>>>(
          static_cast<T*>(xp.data), static_cast<const T*>(x.data),
          static_cast<const int32_t*>(row_slot.data), num_rows, int(num_c), topk, num_t * topk);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void moe_permute_backward(Tensor dx, Tensor dxp, Tensor slot_row, ops::Stream stream) {
  constexpr const char* kOp = "moe_permute_backward";
  expect_rows(dxp, kOp, "dxp");
  const int64_t num_rows = dxp.dim(0), num_c = dxp.dim(1);
  expect_slot_row(slot_row, kOp);
  const int64_t num_t = slot_row.dim(0);
  const int topk = static_cast<int>(slot_row.dim(1));
  expect_tensor(dx, dxp.dtype, Shape{num_t, num_c}, kOp, "dx");
  TS_CHECK(!overlaps(dx, dxp), "{}: dx must not alias dxp", kOp);
  if (num_t * num_c == 0) return;
  dispatch_float(dxp, kOp, [&]<class T>() {
    dispatch_width<T>(num_c, {&dx, &dxp}, [&]<int kWidth>() {
      combine_kernel<T, kWidth, false><<<row_grid(num_t), kBlock, 0, cuda_stream(stream)>>>(
          static_cast<T*>(dx.data), static_cast<const T*>(dxp.data),
          static_cast<const int32_t*>(slot_row.data), nullptr, num_t, int(num_c), topk, num_rows);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void moe_unpermute(Tensor out, Tensor yp, Tensor slot_row, Tensor topk_w, ops::Stream stream) {
  constexpr const char* kOp = "moe_unpermute";
  expect_rows(yp, kOp, "yp");
  const int64_t num_rows = yp.dim(0), num_c = yp.dim(1);
  expect_slot_row(slot_row, kOp);
  const int64_t num_t = slot_row.dim(0);
  const int topk = static_cast<int>(slot_row.dim(1));
  expect_tensor(out, yp.dtype, Shape{num_t, num_c}, kOp, "out");
  expect_weights(topk_w, slot_row.shape, kOp, "topk_w");
  TS_CHECK(!overlaps(out, yp) && !overlaps(out, topk_w), "{}: out must not alias an input", kOp);
  if (num_t * num_c == 0) return;
  dispatch_float(yp, kOp, [&]<class T>() {
    dispatch_width<T>(num_c, {&out, &yp}, [&]<int kWidth>() {
      combine_kernel<T, kWidth, true><<<row_grid(num_t), kBlock, 0, cuda_stream(stream)>>>(
          static_cast<T*>(out.data), static_cast<const T*>(yp.data),
          static_cast<const int32_t*>(slot_row.data), static_cast<const float*>(topk_w.data), num_t,
          int(num_c), topk, num_rows);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void moe_unpermute_backward(Tensor dyp, Tensor d_topk_w, Tensor dout, Tensor yp, Tensor slot_row,
                            Tensor row_slot, Tensor topk_w, ops::Stream stream) {
  constexpr const char* kOp = "moe_unpermute_backward";
  expect_rows(yp, kOp, "yp");
  const int64_t num_rows = yp.dim(0), num_c = yp.dim(1);
  expect_slot_row(slot_row, kOp);
  const int64_t num_t = slot_row.dim(0);
  const int topk = static_cast<int>(slot_row.dim(1));
  expect_index(row_slot, Shape{num_rows}, kOp, "row_slot");
  expect_tensor(dyp, yp.dtype, Shape{num_rows, num_c}, kOp, "dyp");
  expect_tensor(dout, yp.dtype, Shape{num_t, num_c}, kOp, "dout");
  expect_weights(topk_w, slot_row.shape, kOp, "topk_w");
  expect_weights(d_topk_w, slot_row.shape, kOp, "d_topk_w");
  for (const Tensor* in : {&dout, &yp, &topk_w, &slot_row, &row_slot})
    TS_CHECK(!overlaps(dyp, *in) && !overlaps(d_topk_w, *in),
             "{}: dyp and d_topk_w must not alias an input", kOp);
  TS_CHECK(!overlaps(dyp, d_topk_w), "{}: dyp and d_topk_w must not alias", kOp);
  const int64_t num_slots = num_t * topk;
  const cudaStream_t s = cuda_stream(stream);
  auto* dw = static_cast<float*>(d_topk_w.data);
  if (num_rows > 0) {
    dispatch_float(yp, kOp, [&]<class T>() {
      dispatch_width<T>(num_c, {&dyp, &dout, &yp}, [&]<int kWidth>() {
        unpermute_backward_kernel<T, kWidth><<<row_grid(num_rows), kBlock, 0, s>>>(
            static_cast<T*>(dyp.data), dw, static_cast<const T*>(dout.data),
            static_cast<const T*>(yp.data), static_cast<const int32_t*>(row_slot.data),
            static_cast<const float*>(topk_w.data), num_rows, int(num_c), topk, num_slots);
        TS_CUDA_CHECK_LAUNCH();
      });
    });
  }
  if (num_slots > 0) {
    zero_dropped_kernel<<<ceil_div(num_slots, kBlock), kBlock, 0, s>>>(
        dw, static_cast<const int32_t*>(slot_row.data), num_slots, num_rows);
    TS_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace tessera::cuda
