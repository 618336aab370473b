// Shared by the grouped GEMM kernels (kernels/cuda/grouped_gemm.cu, grouped_gemm_wgmma.cuh): the
// three passes written as one tiled product C = A · B^T, and the device-side tile scheduler that
// maps a block's tiles to (group, m-tile, n-tile) from the offsets in device memory (no host sync).
// Shape letters: R rows, G groups, N' out features, K' in features.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace tessera::cuda::grouped {

// forward:  y (R,N')      = x (R,K')  · w[g]^T      A = x  K-major,  B = w[g] K-major
// dgrad:    dx (R,K')     = dy (R,N') · w[g]        A = dy K-major,  B = w[g] MN-major
// wgrad:    dw[g] (N',K') += dy_g^T · x_g           A = dy MN-major, B = x    MN-major
// An operand is K-major when element (mn, k) sits at p[mn * ld + k], MN-major at p[k * ld + mn].
enum class Pass { forward, dgrad, wgrad };

constexpr bool a_k_major(Pass p) { return p != Pass::wgrad; }
constexpr bool b_k_major(Pass p) { return p == Pass::forward; }

struct Args {
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;
  const int32_t* offsets = nullptr;  // (G+1), device memory
  int64_t rows = 0;                  // R: offsets are clamped to [0, R]
  int groups = 0;                    // G
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t b_group_stride = 0;  // elements from w[g] to w[g+1] (forward, dgrad)
  int64_t c_group_stride = 0;  // elements from dw[g] to dw[g+1] (wgrad)
  int64_t m_size = 0;          // wgrad: rows of dw[g] (N'); forward / dgrad: the group's rows
  int64_t n_size = 0;          // columns of C: N' (forward), K' (dgrad, wgrad)
  int64_t k_size = 0;          // reduction: K' (forward), N' (dgrad); wgrad: the group's rows
  int m_tiles = 0;             // wgrad: tiles along M
  int n_tiles = 0;             // tiles along N
};

// One output tile: C rows [a_mn0, a_limit) ∩ [a_mn0, a_mn0 + BM), columns likewise from b_mn0,
// reducing over [k0, k_limit) in num_kb blocks. Rows of C are A's MN index, columns B's.
struct Tile {
  int64_t a_mn0 = 0, a_limit = 0;
  int64_t b_mn0 = 0, b_limit = 0;
  int64_t k0 = 0, k_limit = 0;
  int64_t b_off = 0;  // B's group offset in elements (w[g])
  int64_t c_off = 0;  // C's group offset in elements (dw[g])
  int group = 0;      // g (the TMA kernel addresses w[g] by coordinate)
  int num_kb = 0;
};

// Rows [lo, hi) of group g, clamped to [0, R] so that corrupt offsets cannot send a kernel out of
// bounds (the CPU checks them; the GPU never reads them on the host).
__device__ __forceinline__ void group_rows(const Args& a, int g, int64_t& lo, int64_t& hi) {
  lo = std::min(std::max(int64_t(a.offsets[g]), int64_t(0)), a.rows);
  hi = std::min(std::max(int64_t(a.offsets[g + 1]), lo), a.rows);
}

// Finds the group holding tile t of a forward / dgrad pass, where group g has ceil(M_g / BM) *
// n_tiles tiles. The warp reads 32 groups at a time (one per lane) and scans their tile counts, so
// a search costs G/32 steps; t never decreases between calls (a block visits its tiles in
// increasing order), so the cursor resumes where the last search stopped. Every lane of every warp
// calls it with the same t and gets the same answer.
template <int BM>
struct GroupWalk {
  int g = 0;           // the group the next search starts from
  int64_t before = 0;  // tiles of the groups before g

  __device__ bool seek(const Args& a, int64_t t, int& group, int64_t& local) {
    const int lane = threadIdx.x & 31;
    while (g < a.groups) {
      const int h = g + lane;
      int64_t count = 0;
      if (h < a.groups) {
        int64_t lo, hi;
        group_rows(a, h, lo, hi);
        count = (hi - lo + BM - 1) / BM * a.n_tiles;
      }
      int64_t incl = count;  // inclusive prefix over the lanes
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      const int64_t window = __shfl_sync(0xffffffffu, incl, 31);
      if (t < before + window) {
        const unsigned hit = __ballot_sync(0xffffffffu, t < before + incl);
        const int first = __ffs(hit) - 1;
        before += __shfl_sync(0xffffffffu, incl - count, first);
        g += first;
        group = g;
        local = t - before;
        return true;
      }
      g += 32;
      before += window;
    }
    return false;
  }
};

// Tile t of pass P under BM x BN x BK tiling; false when t is past the last tile.
template <Pass P, int BM, int BN, int BK>
__device__ bool decode_tile(const Args& a, int64_t t, GroupWalk<BM>& walk, Tile& tile) {
  int g = 0;
  int64_t local = 0, lo = 0, hi = 0;
  if constexpr (P == Pass::wgrad) {
    const int64_t per_group = int64_t(a.m_tiles) * a.n_tiles;
    if (t >= per_group * a.groups) return false;
    g = int(t / per_group);
    local = t % per_group;
  } else {
    if (!walk.seek(a, t, g, local)) return false;
  }
  group_rows(a, g, lo, hi);
  tile.group = g;
  const int64_t mt = local / a.n_tiles, nt = local % a.n_tiles;
  tile.b_mn0 = nt * BN;
  tile.b_limit = a.n_size;
  if constexpr (P == Pass::wgrad) {
    tile.a_mn0 = mt * BM;
    tile.a_limit = a.m_size;
    tile.k0 = lo;
    tile.k_limit = hi;
    tile.b_off = 0;
    tile.c_off = g * a.c_group_stride;
  } else {
    tile.a_mn0 = lo + mt * BM;
    tile.a_limit = hi;
    tile.k0 = 0;
    tile.k_limit = a.k_size;
    tile.b_off = g * a.b_group_stride;
    tile.c_off = 0;
  }
  tile.num_kb = int((tile.k_limit - tile.k0 + BK - 1) / BK);
  return true;
}

// A block's walk over its tiles t = blockIdx.x, + gridDim.x, ... (a persistent grid), skipping
// tiles with nothing to reduce (wgrad of an empty group: dw[g] += 0), and over each tile's
// k-blocks. Uniform across the block: every thread holds the same cursor.
template <Pass P, int BM, int BN, int BK>
struct Cursor {
  int64_t t = 0;
  GroupWalk<BM> walk;
  Tile tile;
  int kb = 0;
  bool valid = false;

  __device__ void start(const Args& a) {
    t = blockIdx.x;
    find(a);
  }
  __device__ void next_tile(const Args& a) {
    t += gridDim.x;
    find(a);
  }
  __device__ void advance(const Args& a) {
    if (++kb == tile.num_kb) next_tile(a);
  }

 private:
  __device__ void find(const Args& a) {
    kb = 0;
    while ((valid = decode_tile<P, BM, BN, BK>(a, t, walk, tile)) && tile.num_kb == 0)
      t += gridDim.x;
  }
};

}  // namespace tessera::cuda::grouped
