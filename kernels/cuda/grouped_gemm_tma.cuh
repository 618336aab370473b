// The grouped GEMM's warp-specialised Hopper kernel (sm_90a): the tiles, swizzled layouts and
// wgmma m64n256k16 of grouped_gemm_wgmma.cuh, fed by the bulk tensor copy engine (TMA) from a
// producer warp instead of cp.async from the MMA threads. 384 threads: warpgroup 0 produces (one
// warp issues the copies of each k-block into a 4-deep ring, each stage guarded by a "full" and an
// "empty" mbarrier), warpgroups 1 and 2 consume (64 rows each
// of the 128 x 256 tile) and never wait on a block-wide barrier: the copies of the next k-blocks
// and tiles run while they compute and store. No setmaxnreg: the consumers fit the 168 registers
// that 384 threads leave each (128 accumulators, no spills), so moving registers buys nothing.
// Included by grouped_gemm.cu only.
//
// Tensor maps are built on the host over the whole base tensors (x, dy (R, ·) and w (G, N', K')),
// so the copy engine zero-fills only at those tensors' edges:
//  - forward / dgrad: a tile's A box may reach rows of the next group (or unused rows, even NaN):
//    each output row depends on its own A row only, and the epilogue stores rows inside the group;
//    w[g] is addressed as a 3-d tensor, so w[g+1] never enters a box of w[g].
//  - wgrad: k runs over the group's rows, so a k-block's rows past the group are another group's
//    (or past R, zero-filled). Tiles start at the group's first row, so only a tile's last k-block
//    can hold such rows; the consumers zero them in both operands in shared memory before its MMAs.
#pragma once
#include <cuda.h>  // CUtensorMap (the type only; maps are encoded through the runtime's entry point)

#include <cstdint>

#include "kernels/cuda/grouped_gemm_wgmma.cuh"

namespace tessera::cuda::grouped {

constexpr int kWsThreads = 384;      // producer warpgroup + two consumer warpgroups
constexpr int kWsStages = 4;         // ring depth (4 x 48 KB)
constexpr int kWsConsumerWarps = 8;  // arrivals that free a stage
constexpr int kWsBarBytes = 128;     // 2 x kWsStages mbarriers of 8 bytes, padded
constexpr int kWsEpiCols = 32;       // the epilogue stages 64 rows x 32 columns per warpgroup
constexpr int kWsEpiLd =
    kWsEpiCols + 8;  // f32 row stride: + 8 words keep the accesses conflict-free
constexpr int kWsEpiBytes = 64 * kWsEpiLd * 4;  // 10 KB per consumer warpgroup
constexpr int kWsSmemBytes =
    kWsStages * kWgStageBytes + kWsBarBytes + 2 * kWsEpiBytes + 1024;  // + 1024 alignment
static_assert(2 * kWsStages * 8 <= kWsBarBytes);
constexpr int kWsChunkBytes = 64 * kWgRowBytes;  // a 64 x 64 box, one 128-byte swizzle row per line

#ifdef TS_GROUPED_WGMMA

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Returns once the phase of parity `parity` has completed (a fresh barrier counts its phase
// "before 0", parity 1, as completed: the producer's first pass over the ring does not wait).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// One box of a tensor map into shared memory, completing `bytes` on the mbarrier.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Registers move from the producer warpgroup to the consumers ((56 + 2 x 224) x 128 <=
// 64K); ptxas allocates each branch within its new limit.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// The two consumer warpgroups alone (barrier 0 is __syncthreads').
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

// Four consecutive elements of C (16-byte aligned for f32, 8-byte for 16-bit types) as f32.
template <class OutT>
__device__ __forceinline__ float4 load4(const OutT* p) {
  if constexpr (std::is_same_v<OutT, float>) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const OutT* e = reinterpret_cast<const OutT*>(&raw);
    return make_float4(to_f32(e[0]), to_f32(e[1]), to_f32(e[2]), to_f32(e[3]));
  }
}
template <class OutT>
__device__ __forceinline__ void store4(OutT* p, float4 v) {
  if constexpr (std::is_same_v<OutT, float>) {
    *reinterpret_cast<float4*>(p) = v;
  } else {
    OutT e[4] = {from_f32<OutT>(v.x), from_f32<OutT>(v.y), from_f32<OutT>(v.z),
                 from_f32<OutT>(v.w)};
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(e);
  }
}

// The copies of one k-block of tile t into a stage: A (128 MN x 64 k) then B (256 MN x 64 k).
// K-major operands are one box (64 k x rows), MN-major ones a box of 64 MN x 64 k per 8 KB chunk.
// Coordinates are innermost first; w (forward B, dgrad B) is (G, N', K') with g outermost.
template <Pass P>
__device__ __forceinline__ void ws_issue_loads(uint32_t sa, uint32_t bar, const CUtensorMap* ma,
                                               const CUtensorMap* mb, const Tile& t, int kb) {
  const int k = int(t.k0) + kb * kWgBK, am = int(t.a_mn0), bm = int(t.b_mn0);
  const uint32_t sb = sa + kWgAStage;
  if constexpr (P == Pass::forward) {
    tma_load_2d(sa, ma, bar, k, am);           // x (R, K')
    tma_load_3d(sb, mb, bar, k, bm, t.group);  // w[g] (N', K')
  } else if constexpr (P == Pass::dgrad) {
    tma_load_2d(sa, ma, bar, k, am);  // dy (R, N')
#pragma unroll
    for (int c = 0; c < kWgBN / 64; ++c)  // w[g] read along K' (MN), N' is k
      tma_load_3d(sb + c * kWsChunkBytes, mb, bar, bm + 64 * c, k, t.group);
  } else {
#pragma unroll
    for (int c = 0; c < kWgBM / 64; ++c)  // dy (R, N'): N' is MN, rows are k
      tma_load_2d(sa + c * kWsChunkBytes, ma, bar, am + 64 * c, k);
#pragma unroll
    for (int c = 0; c < kWgBN / 64; ++c)  // x (R, K'): K' is MN, rows are k
      tma_load_2d(sb + c * kWsChunkBytes, mb, bar, bm + 64 * c, k);
  }
}

// wgrad's last k-block of a tile: rows [valid, 64) are past the group. Zero them in the stage's
// six 64 x 64 chunks (A: 2, B: 4; a row is 128 contiguous bytes, the swizzle only permutes its
// 16-byte pieces), 16 bytes per store over the 256 consumer threads, then make the stores visible
// to wgmma (async proxy) and to the other consumer warpgroup.
__device__ __forceinline__ void ws_zero_tail_rows(uint32_t stage, int valid) {
  const int per_chunk = (64 - valid) * 8;
  for (int i = int(threadIdx.x) - 128; i < 6 * per_chunk; i += 256) {
    const int c = i / per_chunk, r = valid + (i % per_chunk) / 8, j = i % 8;
    const uint32_t addr = stage + c * kWsChunkBytes + r * kWgRowBytes + j * 16;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
  }
  fence_proxy_async();
  consumers_sync();
}

// Bytes [addr, addr + bytes) into L2 (wgrad: the dw tile the epilogue will read, fetched while
// the tile's k-blocks run, so its read-modify-write finds the old values in L2, not in DRAM).
__device__ __forceinline__ void prefetch_l2(const void* addr, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(addr), "r"(bytes) : "memory");
}

// The producer warp's prefetch of a wgrad tile's rows of C (each row's columns are contiguous,
// 16-byte aligned and a multiple of 16 bytes: N', K' multiples of 8), one row per lane at a time.
template <class OutT>
__device__ __forceinline__ void ws_prefetch_c(const OutT* c, int64_t ldc, const Tile& t) {
  const int64_t rows = std::min<int64_t>(kWgBM, t.a_limit - t.a_mn0);
  const uint32_t bytes = uint32_t(std::min<int64_t>(kWgBN, t.b_limit - t.b_mn0) * sizeof(OutT));
  for (int64_t r = threadIdx.x & 31; r < rows; r += 32)
    prefetch_l2(c + t.c_off + (t.a_mn0 + r) * ldc + t.b_mn0, bytes);
}

// The epilogue's view of one consumer thread: it moves 16-byte pieces (4 columns) of rows
// tid/8 + 16 p (p < 4) of its warpgroup's 64, columns 4 (tid % 8) of each 32-column chunk.
struct EpiThread {
  int64_t row0, col0;  // C coordinates of piece p = 0 of chunk 0
  __device__ EpiThread(const Tile& t, int cw) {
    const int tid = threadIdx.x & 127;
    row0 = t.a_mn0 + cw * 64 + (tid >> 3);
    col0 = t.b_mn0 + 4 * (tid & 7);
  }
  __device__ bool inside(const Tile& t, int chunk, int p) const {
    return row0 + 16 * p < t.a_limit && col0 + chunk * kWsEpiCols < t.b_limit;
  }
  __device__ int64_t offset(const Tile& t, int64_t ldc, int chunk, int p) const {
    return t.c_off + (row0 + 16 * p) * ldc + col0 + chunk * kWsEpiCols;
  }
};

// Accumulating epilogues read C first. The chunks go in rounds of kWsEpiRound, and a round's
// 16 loads are issued together (round 0 by the caller before the tile's last wgmma retires), so
// a tile waits for two load latencies instead of eight.
constexpr int kWsEpiRound = 4;
template <class OutT>
__device__ __forceinline__ void ws_load_round(const OutT* c, int64_t ldc, const Tile& t,
                                              const EpiThread& e, int round,
                                              float4 (&old)[kWsEpiRound][4]) {
#pragma unroll
  for (int q = 0; q < kWsEpiRound; ++q)
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int chunk = round * kWsEpiRound + q;
      old[q][p] = e.inside(t, chunk, p) ? load4(c + e.offset(t, ldc, chunk, p))
                                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// Epilogue of consumer warpgroup cw (rows 64 cw .. of the tile) through its 64 x 32 f32 staging
// area in shared memory, eight column chunks in turn: the wgmma fragments go in (warp w, lane l
// holds rows 16w + l/4 (+8), columns 8j + 2(l%4) (+1)), then each thread moves 16-byte row pieces
// out, so a warp writes (and, accumulating, reads) four whole 128-byte row segments of C per
// access instead of 8-byte pieces of eight rows. Columns come in fours inside N' or K' (multiples
// of 8), so a piece is stored whole or not at all; rows past the tile's group are not stored.
// Accumulating, `old` holds round 0's values of C on entry.
template <class OutT, bool kAccumulate>
__device__ __forceinline__ void ws_store_tile(OutT* c, int64_t ldc, const Tile& t, int cw,
                                              const float (&d)[128], uint32_t stage,
                                              float4 (&old)[kWsEpiRound][4]) {
  const int tid = threadIdx.x & 127, lane = threadIdx.x & 31, warp = tid >> 5;
  const uint32_t frag = stage + ((warp * 16 + (lane >> 2)) * kWsEpiLd + 2 * (lane & 3)) * 4;
  const uint32_t piece = stage + ((tid >> 3) * kWsEpiLd + 4 * (tid & 7)) * 4;
  const EpiThread e(t, cw);
  const auto sync_wg = [cw] { asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory"); };
#pragma unroll
  for (int chunk = 0; chunk < kWgBN / kWsEpiCols; ++chunk) {
    const int q = chunk % kWsEpiRound;
    if (kAccumulate && chunk > 0 && q == 0) ws_load_round(c, ldc, t, e, chunk / kWsEpiRound, old);
#pragma unroll
    for (int jj = 0; jj < kWsEpiCols / 8; ++jj)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 4 * (chunk * kWsEpiCols / 8 + jj) + 2 * h;
        asm volatile(
            "st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(frag + (8 * h * kWsEpiLd + 8 * jj) * 4),
            "f"(d[i]), "f"(d[i + 1])
            : "memory");
      }
    sync_wg();
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float4 v;
      asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                   : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                   : "r"(piece + p * 16 * kWsEpiLd * 4)
                   : "memory");
      if (!e.inside(t, chunk, p)) continue;
      if constexpr (kAccumulate) {
        const float4 o = old[q][p];
        v = make_float4(v.x + o.x, v.y + o.y, v.z + o.z, v.w + o.w);
      }
      store4(c + e.offset(t, ldc, chunk, p), v);
    }
    sync_wg();  // the staging area is rewritten by the next chunk
  }
}

#endif  // TS_GROUPED_WGMMA

// The kernel. Stage s of the ring: A at smem + s * 48 KB, B 16 KB later; full[s] completes when
// its copies have landed (one arrival with the byte count, then the bytes), empty[s] when the 8
// consumer warps have retired the wgmma that read it. Step i (a k-block of some tile, the same
// sequence in producer and consumers: grouped_gemm.cuh's cursor) uses stage i % 4 in round i / 4.
// Each output element is written by one thread after a k loop in a fixed order: deterministic.
template <class T, class OutT, Pass P>
__global__ void __launch_bounds__(kWsThreads, 1)
    grouped_ws_kernel(const __grid_constant__ CUtensorMap map_a,
                      const __grid_constant__ CUtensorMap map_b, const Args args) {
#ifdef TS_GROUPED_WGMMA
  using Cur = Cursor<P, kWgBM, kWgBN, kWgBK>;
  constexpr bool kAK = a_k_major(P), kBK = b_k_major(P);
  extern __shared__ __align__(1024) unsigned char ws_smem[];
  const uint32_t smem = (wg_smem_u32(ws_smem) + 1023u) & ~1023u;  // swizzle atoms: 1024-aligned
  const uint32_t full0 = smem + kWsStages * kWgStageBytes, empty0 = full0 + kWsStages * 8;
  const uint32_t epi0 = full0 + kWsBarBytes;  // the consumers' staging areas
  const int wg = threadIdx.x / 128, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWsStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kWsConsumerWarps);
    }
    mbar_init_fence();
    tma_prefetch_map(&map_a);
    tma_prefetch_map(&map_b);
  }
  __syncthreads();

  if (wg == 0) {  // producer: one warp walks the tiles and issues the copies
    setmaxnreg_dec<56>();
    if (threadIdx.x >= 32) return;
    Cur cur;
    cur.start(args);
    for (int step = 0; cur.valid; ++step) {
      const int stage = step % kWsStages;
      mbar_wait(empty0 + 8 * stage, ((step / kWsStages) & 1) ^ 1);
      if (lane == 0) {
        const uint32_t full = full0 + 8 * stage;
        mbar_arrive_expect_tx(full, kWgStageBytes);
        ws_issue_loads<P>(smem + stage * kWgStageBytes, full, &map_a, &map_b, cur.tile, cur.kb);
      }
      if constexpr (P == Pass::wgrad) {
        if (cur.kb == 0) ws_prefetch_c(static_cast<const OutT*>(args.c), args.ldc, cur.tile);
      }
      __syncwarp();
      cur.advance(args);
    }
  } else {  // consumers: warpgroup cw owns rows [64 cw, 64 cw + 64) of each tile
    setmaxnreg_inc<224>();
    const int cw = wg - 1;
    OutT* c = static_cast<OutT*>(args.c);
    Cur cur;
    cur.start(args);
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
    int held = -1;  // the stage read by the wgmma still in flight, freed once it retires
    for (int step = 0; cur.valid; ++step) {
      const int stage = step % kWsStages;
      const uint32_t sa = smem + stage * kWgStageBytes, sb = sa + kWgAStage;
      mbar_wait(full0 + 8 * stage, (step / kWsStages) & 1);
      if constexpr (P == Pass::wgrad) {
        const int64_t valid = cur.tile.k_limit - (cur.tile.k0 + int64_t(cur.kb) * kWgBK);
        if (valid < kWgBK) ws_zero_tail_rows(sa, int(valid));
      }
#pragma unroll
      for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
      wgmma_fence();
      wg_mma_kblock<T, kAK, kBK>(d, sa, sb, cw, cur.kb == 0);
      wgmma_commit();
#pragma unroll
      for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
      if (cur.kb + 1 == cur.tile.num_kb) {
        float4 old[kWsEpiRound][4];
        if constexpr (P == Pass::wgrad)  // dw's first values, loaded while the last MMAs run
          ws_load_round(static_cast<const OutT*>(c), args.ldc, cur.tile, EpiThread(cur.tile, cw), 0,
                        old);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
        if (lane == 0) {
          if (held >= 0) mbar_arrive(empty0 + 8 * held);
          mbar_arrive(empty0 + 8 * stage);
        }
        held = -1;
        ws_store_tile<OutT, P == Pass::wgrad>(c, args.ldc, cur.tile, cw, d, epi0 + cw * kWsEpiBytes,
                                              old);
        cur.next_tile(args);
      } else {
        wgmma_wait<1>();  // the previous k-block's wgmma has retired: its stage is free
#pragma unroll
        for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
        if (lane == 0 && held >= 0) mbar_arrive(empty0 + 8 * held);
        held = stage;
        ++cur.kb;
      }
    }
    wgmma_wait<0>();
  }
#else
  __trap();  // built without sm_90a: the launcher never picks this kernel on such a build
#endif
}

}  // namespace tessera::cuda::grouped
