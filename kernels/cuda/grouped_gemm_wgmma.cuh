// The grouped GEMM's first Hopper kernel (sm_90a), now behind the TMA kernel of
// grouped_gemm_tma.cuh, which reuses its constants, wgmma wrappers and layouts; the launcher runs
// this one only when TESSERA_GROUPED_GEMM_V1=1 (side-by-side benchmarks). bf16/f16 operands through
// wgmma (m64n256k16, f32 accumulators in registers), 128 x 256 output tiles, k-blocks of 64 staged
// through a 4-deep ring of shared memory filled by cp.async in the 128-byte swizzled layout wgmma
// reads. A persistent grid: each block walks its tiles (grouped_gemm.cuh's scheduler, offsets read
// on the device) as one flat sequence of k-blocks, so the loads of the next tile overlap the last
// MMAs and the epilogue of the current one. Included by grouped_gemm.cu only.
//
// Requirements checked by the launcher: 16-bit operands, N' and K' multiples of 8 and 16-byte
// aligned bases (every 8-element chunk of a row is one aligned 16-byte copy, wholly inside or
// outside the matrix), a CC 9.0 device. Rows outside a tile's group, and chunks past N' or K', are
// zero-filled by the copy (never read), so any group sizes work, and a group's rows never leak into
// another's dw.
#pragma once
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/grouped_gemm.cuh"

namespace tessera::cuda::grouped {

constexpr int kWgBM = 128;    // tile rows: two consumer warpgroups of m64 each
constexpr int kWgBN = 256;    // tile columns: one wgmma n256
constexpr int kWgBK = 64;     // k-block: 64 16-bit elements = one 128-byte swizzle row
constexpr int kWgStages = 4;  // shared-memory ring depth
constexpr int kWgAhead = 2;   // k-blocks loaded ahead of the one computed (kWgStages - 2: the
                              // stage of the wgmma still in flight is not overwritten)
constexpr int kWgThreads = 256;
constexpr int kWgAStage = kWgBM * kWgBK * 2;  // 16 KB
constexpr int kWgBStage = kWgBN * kWgBK * 2;  // 32 KB
constexpr int kWgStageBytes = kWgAStage + kWgBStage;
constexpr int kWgSmemBytes = kWgStages * kWgStageBytes + 1024;  // + slack for 1024-byte alignment
constexpr int kWgRowBytes = 128;                                // one swizzle row
constexpr int kWgChunkBytes = kWgBK * kWgRowBytes;              // MN-major: 64 MN x 64 k

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TS_GROUPED_WGMMA 1
#endif

__device__ __forceinline__ uint32_t wg_smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; zero-fills when !valid (src is then not read).
__device__ __forceinline__ void wg_cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void wg_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int kN>
__device__ __forceinline__ void wg_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kN));
}

// A wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride
// byte offsets (all >> 4), layout type 1 (SWIZZLE_128B) in bits 62-63.
//   K-major:  rows of 128 bytes along k; SBO = 1024 (8-row groups), LBO unused (16).
//   MN-major: rows of 128 bytes (64 MN elements) along MN, one row per k; SBO = 1024 (8-k groups),
//             LBO = the stride between 64-wide MN chunks.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) |
         (uint64_t(1) << 62);
}

#ifdef TS_GROUPED_WGMMA

#define TS_WG_ACC8(i)                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define TS_WG_ACC128                                                                            \
  TS_WG_ACC8(0), TS_WG_ACC8(8), TS_WG_ACC8(16), TS_WG_ACC8(24), TS_WG_ACC8(32), TS_WG_ACC8(40), \
      TS_WG_ACC8(48), TS_WG_ACC8(56), TS_WG_ACC8(64), TS_WG_ACC8(72), TS_WG_ACC8(80),           \
      TS_WG_ACC8(88), TS_WG_ACC8(96), TS_WG_ACC8(104), TS_WG_ACC8(112), TS_WG_ACC8(120)
#define TS_WG_DREGS                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "           \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "           \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "           \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "           \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "           \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "     \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, " \
  "%126, %127}"

// d (64 x 256 per warpgroup, f32) = A (64 x 16) · B (256 x 16)^T + (scale_d ? d : 0).
// kTransA / kTransB: 0 = K-major, 1 = MN-major (allowed for 16-bit types).
template <class T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_256(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                          int scale_d) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " TS_WG_DREGS
        ", %128, %129, p, 1, 1, %131, %132;\n}\n"
        : TS_WG_ACC128
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " TS_WG_DREGS
        ", %128, %129, p, 1, 1, %131, %132;\n}\n"
        : TS_WG_ACC128
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  }
}

#undef TS_WG_DREGS
#undef TS_WG_ACC128
#undef TS_WG_ACC8

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kN>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kN) : "memory");
}
// Orders the compiler's own accesses to an accumulator after the wgmma that wrote it: without
// it, a read for the epilogue could be scheduled before wgmma_wait.
__device__ __forceinline__ void wg_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// One k-block of a 128 x 256 tile for warpgroup `wg` (its 64 rows of A, all 256 columns of B),
// four m64n256k16 steps on the stage at sa/sb; accumulates into d unless this is the tile's first
// k-block. A k16 step is 32 bytes along a K-major row, or 16 rows (2048 bytes) of an MN-major
// chunk.
template <class T, bool kAK, bool kBK>
__device__ __forceinline__ void wg_mma_kblock(float (&d)[128], uint32_t sa, uint32_t sb, int wg,
                                              bool first_kb) {
#pragma unroll
  for (int k16 = 0; k16 < kWgBK / 16; ++k16) {
    const uint64_t da = kAK ? wg_desc(sa + wg * 64 * kWgRowBytes + k16 * 32, 16, 1024)
                            : wg_desc(sa + wg * kWgChunkBytes + k16 * 2048, kWgChunkBytes, 1024);
    const uint64_t db =
        kBK ? wg_desc(sb + k16 * 32, 16, 1024) : wg_desc(sb + k16 * 2048, kWgChunkBytes, 1024);
    wgmma_256<T, kAK ? 0 : 1, kBK ? 0 : 1>(d, da, db, !first_kb || k16 > 0);
  }
}

// Shared memory written by cp.async (the generic proxy) and read next by wgmma (the async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#endif  // TS_GROUPED_WGMMA

// One operand's k-block into a stage: kRows MN indices x 64 k, 16-byte chunks, swizzled.
//   K-major:  row i (MN) = 128 bytes of k; chunk j of row i lands at i*128 + ((j ^ i%8) * 16).
//   MN-major: chunk c of 64 MN indices = 64 rows (one per k) of 128 bytes, chunk j of row r at
//             c*8192 + r*128 + ((j ^ r%8) * 16).
// A chunk is copied when its MN index is below mn_limit and its k below k_limit, else zeroed.
template <class T, bool kKMajor, int kRows>
__device__ __forceinline__ void wg_load_operand(uint32_t dst, const T* base, int64_t ld,
                                                int64_t mn0, int64_t mn_limit, int64_t k0,
                                                int64_t k_limit) {
  static_assert(kRows * 8 % kWgThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kRows * 8 / kWgThreads; ++i) {
    const int idx = int(threadIdx.x) + i * kWgThreads, j = idx & 7;
    int64_t mn, k;
    uint32_t off;
    if constexpr (kKMajor) {
      const int row = idx >> 3;
      mn = mn0 + row;
      k = k0 + 8 * j;
      off = row * kWgRowBytes + ((j ^ (row & 7)) << 4);
    } else {
      const int r = (idx >> 3) & 63, c = idx >> 9;
      mn = mn0 + 64 * c + 8 * j;
      k = k0 + r;
      off = c * kWgChunkBytes + r * kWgRowBytes + ((j ^ (r & 7)) << 4);
    }
    const bool valid = mn < mn_limit && k < k_limit;
    const T* src = !valid ? base : kKMajor ? base + mn * ld + k : base + k * ld + mn;
    wg_cp_async_16(dst + off, src, valid);
  }
}

// C (rows a_mn0.., columns b_mn0..) = or += the warpgroup's 64 x 256 accumulators. Fragment of
// wgmma m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 (+8), columns 8j + 2(lane%4)
// (+1) in d[4j + 2h + {0,1}] (h: the +8 row). Columns come in pairs inside N' or K' (multiples
// of 8), so a pair is stored whole or not at all.
template <class OutT, bool kAccumulate>
__device__ __forceinline__ void wg_store_tile(OutT* c, int64_t ldc, const Tile& t, int wg,
                                              const float (&d)[128]) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int64_t row0 = t.a_mn0 + wg * 64 + warp * 16 + (lane >> 2);
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int64_t col = t.b_mn0 + 8 * j + 2 * (lane & 3);
    if (col >= t.b_limit) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 8 * h;
      if (row >= t.a_limit) continue;
      OutT* p = c + t.c_off + row * ldc + col;
      float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
      if constexpr (std::is_same_v<OutT, float>) {
        float2* p2 = reinterpret_cast<float2*>(p);
        if constexpr (kAccumulate) {
          const float2 old = *p2;
          v0 += old.x;
          v1 += old.y;
        }
        *p2 = make_float2(v0, v1);
      } else {
        if constexpr (kAccumulate) {
          v0 += to_f32(p[0]);
          v1 += to_f32(p[1]);
        }
        OutT pair[2] = {from_f32<OutT>(v0), from_f32<OutT>(v1)};
        *reinterpret_cast<uint32_t*>(p) = *reinterpret_cast<const uint32_t*>(pair);
      }
    }
  }
}

// The kernel: 256 threads = two warpgroups, each owning 64 rows of the 128 x 256 tile; every
// thread also issues its share of the cp.async copies. Step s (a k-block of some tile) uses stage
// s % 4. At step s: wait for step s's copies; barrier (every warpgroup has also retired the wgmma
// of step s-2); issue the copies of step s+2 into the stage of step s-2; issue four wgmma k16;
// keep one wgmma group in flight (wait_group 1), or drain and store at a tile's last k-block.
// Each output element is written by one thread, after a k loop in a fixed order: deterministic.
template <class T, class OutT, Pass P>
__global__ void __launch_bounds__(kWgThreads, 1) grouped_wgmma_kernel(const Args args) {
#ifdef TS_GROUPED_WGMMA
  using Cur = Cursor<P, kWgBM, kWgBN, kWgBK>;
  constexpr bool kAK = a_k_major(P), kBK = b_k_major(P);
  extern __shared__ __align__(1024) unsigned char wg_smem[];
  const uint32_t smem = (wg_smem_u32(wg_smem) + 1023u) & ~1023u;  // swizzle atoms: 1024-aligned
  const T* a = static_cast<const T*>(args.a);
  const T* b = static_cast<const T*>(args.b);
  OutT* c = static_cast<OutT*>(args.c);
  const int wg = threadIdx.x / 128;

  const auto load_stage = [&](int stage, const Cur& cur) {
    const uint32_t sa = smem + stage * kWgStageBytes, sb = sa + kWgAStage;
    const Tile& t = cur.tile;
    const int64_t k0 = t.k0 + int64_t(cur.kb) * kWgBK;
    wg_load_operand<T, kAK, kWgBM>(sa, a, args.lda, t.a_mn0, t.a_limit, k0, t.k_limit);
    wg_load_operand<T, kBK, kWgBN>(sb, b + t.b_off, args.ldb, t.b_mn0, t.b_limit, k0, t.k_limit);
  };

  Cur load, comp;  // the copies run kWgAhead k-blocks ahead of the MMAs
  load.start(args);
  comp.start(args);
#pragma unroll
  for (int s = 0; s < kWgAhead; ++s) {
    if (load.valid) {
      load_stage(s, load);
      load.advance(args);
    }
    wg_cp_async_commit();
  }

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  for (int step = 0; comp.valid; ++step) {
    const int stage = step % kWgStages;
    wg_cp_async_wait<kWgAhead - 1>();
    fence_proxy_async();
    __syncthreads();
    if (load.valid) {
      load_stage((step + kWgAhead) % kWgStages, load);
      load.advance(args);
    }
    wg_cp_async_commit();

    const uint32_t sa = smem + stage * kWgStageBytes, sb = sa + kWgAStage;
#pragma unroll
    for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
    wgmma_fence();
    wg_mma_kblock<T, kAK, kBK>(d, sa, sb, wg, comp.kb == 0);
    wgmma_commit();
#pragma unroll
    for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
    if (comp.kb + 1 == comp.tile.num_kb) {
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
      wg_store_tile<OutT, P == Pass::wgrad>(c, args.ldc, comp.tile, wg, d);
      comp.next_tile(args);
    } else {
      // The tile goes on: no scheduler code on this path, where a wgmma is still in flight.
      wgmma_wait<1>();
#pragma unroll
      for (int i = 0; i < 128; ++i) wg_fence_operand(d[i]);
      ++comp.kb;
    }
  }
  wgmma_wait<0>();  // nothing is in flight here (the last step drained); tells ptxas so
  wg_cp_async_wait<0>();
#else
  __trap();  // built without sm_90a: the launcher never picks this kernel on such a build
#endif
}

}  // namespace tessera::cuda::grouped
