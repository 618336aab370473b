// Native causal GQA attention (flash-attention-2 style), declared in attention_native.h. Kernels:
// bf16/f16 tensor-core kernels (mma.sync m16n8k16, f32 accumulation) for D = 64 and 128, FMA
// kernels for f32 and every other D (multiple of 8, <= 128), the rowsum(dO*O) pass; launchers at
// the end. 16-bit inputs are rounded values of their type; P and dS enter their second GEMM
// rounded to the input type (f16: dS may overflow to Inf under a too-large loss scale, which the
// loss scaler then sees in the gradients).
// Backward is three passes: Drow = rowsum(dO*O); dK,dV with one block per key tile looping over
// the query tiles and query heads of its group; dQ with one block per query tile looping over key
// tiles. Each output element has one writer, so results are deterministic (no atomics).
// Shape letters: B batch, T time, Hq/Hkv query/key-value heads, G = Hq/Hkv, D head dim.
#include <cmath>
#include <type_traits>

#include "kernels/cuda/attention_native.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {

namespace {

// Bytes of one element of the tensor-core kernels' 16-bit types (bf16, f16).
constexpr size_t kMmaElemBytes = 2;
static_assert(sizeof(__nv_bfloat16) == kMmaElemBytes && sizeof(__half) == kMmaElemBytes);

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Arguments shared by every kernel. Row (b, t, h) of q/out/dout starts at ((b*T + t)*Hq + h)*D,
// of k/v/dk/dv at ((b*T + t)*Hkv + h)*D; lse and drow are (B, Hq, T).
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;   // backward: the forward output
  const void* dout = nullptr;  // backward
  void* o = nullptr;           // forward output
  float* lse = nullptr;        // written by forward, read by backward
  float* drow = nullptr;       // rowsum(dO*O), backward scratch in the workspace
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int t = 0, hq = 0, hkv = 0, group = 1, d = 0;
  float scale = 1.0f;       // softmax scale
  float scale_log2 = 1.0f;  // scale * log2(e): the tensor-core kernels work in base 2
};

__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_allmax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- tensor-core helpers ------------------------------------------------------------------
// mma.m16n8k16 fragments (g = lane/4, q = lane%4): A (16x16) a0 (g, 2q..2q+1), a1 (g+8, 2q..),
// a2 (g, 2q+8..), a3 (g+8, 2q+8..); B (16x8) b0 (k 2q..2q+1, n g), b1 (k 2q+8.., n g);
// C (16x8) c0,c1 (g, 2q..2q+1), c2,c3 (g+8, 2q..2q+1). Shared tiles are row-major with rows padded
// by kPad elements (16 bytes), so the 8 rows an ldmatrix reads fall in different banks.
constexpr int kPad = 8;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// c (16x8 f32) += a (16x16) * b (16x8), operands of the 16-bit type T (bf16 or f16).
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "tensor-core attention takes bf16 or f16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two f32 -> one register of two T, lo in the low half (the lower column index), each rounded to
// nearest even (f16: overflow to Inf).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// 16-byte asynchronous copy global -> shared; zero-fills when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kN>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kN));
}

// Rows [row0, row0 + kRows) of a (T, row_stride) matrix -> tile (kRows, kD + kPad); rows >= t
// are zero-filled (zeros, not garbage: 0 * NaN would poison the products).
template <int kRows, int kD, int kThreads, class T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t row_stride,
                                                int row0, int t) {
  constexpr int kChunks = kD / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks, row = row0 + r;
    const bool valid = row < t;
    cp_async_16(tile + r * (kD + kPad) + c * 8, valid ? base + row * row_stride + c * 8 : base,
                valid);
  }
}

// A fragment (16 rows x 16 cols at column col0) of a padded row-major tile.
template <int kD, class T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* tile, int row0, int col0,
                                            int lane) {
  ldmatrix_x4(a, tile + (row0 + lane % 16) * (kD + kPad) + col0 + (lane / 16) * 8);
}
// B fragments of two n-tiles where B[k][n] = tile[n][k] (tile rows are the n index): rows
// n0..n0+15, columns k0..k0+15. r[0], r[1] = b0, b1 of rows n0..n0+7; r[2], r[3] of n0+8..15.
template <int kD, class T>
__device__ __forceinline__ void load_b_frag_nk(uint32_t (&r)[4], const T* tile, int n0, int k0,
                                               int lane) {
  ldmatrix_x4(r,
              tile + (n0 + lane % 8 + (lane / 16) * 8) * (kD + kPad) + k0 + ((lane / 8) % 2) * 8);
}
// B fragments of two n-tiles where B[k][n] = tile[k][n] (tile rows are the k index): rows
// k0..k0+15, columns n0..n0+15. r[0], r[1] = b0, b1 of columns n0..n0+7; r[2], r[3] of n0+8..15.
template <int kD, class T>
__device__ __forceinline__ void load_b_frag_kn(uint32_t (&r)[4], const T* tile, int k0, int n0,
                                               int lane) {
  ldmatrix_x4_trans(
      r, tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * (kD + kPad) + n0 + (lane / 16) * 8);
}

// A fragment of k-step kk from a (16 x 8*kN) accumulator: the C layout of n-tiles 2kk, 2kk+1 is
// the A layout of one 16x16 block.
template <class T, int kN>
__device__ __forceinline__ void acc_to_a_frag(uint32_t (&a)[4], const float (&acc)[kN][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc (16 x 8*kN) += A (16 x 16*kK, fragments a) * B, with B[k][n] = tile[n][k] (rows n0..).
template <int kD, int kK, int kN, class T>
__device__ __forceinline__ void mma_a_regs_b_nk(float (&acc)[kN][4], const uint32_t (&a)[kK][4],
                                                const T* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK; ++kk)
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t b[4];
      load_b_frag_nk<kD>(b, tile, np * 16, kk * 16, lane);
      mma16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
}

// out (16 x kD) += P (16 x 8*kN accumulator, rounded to T) * tile (8*kN rows (k) x kD).
template <int kD, int kN, class T>
__device__ __forceinline__ void mma_acc_b_kn(float (&out)[kD / 8][4], const float (&p)[kN][4],
                                             const T* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < kN / 2; ++kk) {
    uint32_t a[4];
    acc_to_a_frag<T, kN>(a, p, kk);
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      load_b_frag_kn<kD>(b, tile, kk * 16, dp * 16, lane);
      mma16816<T>(out[2 * dp], a, b[0], b[1]);
      mma16816<T>(out[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// ---- forward, tensor cores: one block per (query tile of 16*kWarps rows, head, batch) ---------
constexpr int kMmaWarps = 4;
constexpr int kFwdKeys = 64;  // key tile

template <int kD>
constexpr size_t fwd_mma_smem() {
  return size_t(16 * kMmaWarps + 4 * kFwdKeys) * (kD + kPad) * kMmaElemBytes;
}

template <class T, int kD>
__global__ void __launch_bounds__(kMmaWarps * 32) attn_fwd_mma_kernel(const AttnParams p) {
  constexpr int kBr = 16 * kMmaWarps, kBc = kFwdKeys, kS = kD + kPad, kThreads = kMmaWarps * 32;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);            // (kBr, kS)
  T* k_s = q_s + kBr * kS;                        // 2 buffers of (kBc, kS)
  T* v_s = k_s + 2 * kBc * kS;                    // 2 buffers of (kBc, kS)
  const int q_tile = gridDim.x - 1 - blockIdx.x;  // longest (last) query tiles first
  const int h = blockIdx.y, b = blockIdx.z, kv_h = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int q_start = q_tile * kBr, row_base = q_start + warp * 16;
  const int64_t q_rs = int64_t(p.hq) * kD, kv_rs = int64_t(p.hkv) * kD;
  const T* qb = static_cast<const T*>(p.q) + (int64_t(b) * p.t * p.hq + h) * kD;
  const T* kb = static_cast<const T*>(p.k) + (int64_t(b) * p.t * p.hkv + kv_h) * kD;
  const T* vb = static_cast<const T*>(p.v) + (int64_t(b) * p.t * p.hkv + kv_h) * kD;
  const int num_tiles = min((p.t + kBc - 1) / kBc, (q_start + kBr - 1) / kBc + 1);

  load_tile_async<kBr, kD, kThreads>(q_s, qb, q_rs, q_start, p.t);
  load_tile_async<kBc, kD, kThreads>(k_s, kb, kv_rs, 0, p.t);
  load_tile_async<kBc, kD, kThreads>(v_s, vb, kv_rs, 0, p.t);
  cp_async_commit();

  uint32_t qf[kD / 16][4];
  float o[kD / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g, g+8 (base-2 units)
  float l_run[2] = {0.0f, 0.0f};            // this thread's share of the running sums
  for (int j = 0; j < num_tiles; ++j) {
    // Prefetch tile j+1 into the other buffer (freed by the barrier ending iteration j-1).
    if (j + 1 < num_tiles) {
      const int nb = (j + 1) & 1;
      load_tile_async<kBc, kD, kThreads>(k_s + nb * kBc * kS, kb, kv_rs, (j + 1) * kBc, p.t);
      load_tile_async<kBc, kD, kThreads>(v_s + nb * kBc * kS, vb, kv_rs, (j + 1) * kBc, p.t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) load_a_frag<kD>(qf[kk], q_s, warp * 16, kk * 16, lane);
    const T* ks = k_s + (j & 1) * kBc * kS;
    const T* vs = v_s + (j & 1) * kBc * kS;

    float s[kBc / 8][4] = {};  // (16, kBc) scores of this warp's rows
    mma_a_regs_b_nk<kD, kD / 16, kBc / 8>(s, qf, ks, lane);

    const bool diagonal = j * kBc + kBc - 1 > row_base;  // some key after some row: mask
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_base + g + 8 * half;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float x = s[nt][2 * half + c] * p.scale_log2;
          if (diagonal && j * kBc + nt * 8 + 2 * tq + c > row) x = -INFINITY;
          s[nt][2 * half + c] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[half], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a fully masked row stays 0
      const float corr = exp2f(m_run[half] - m_use);
      m_run[half] = m_new;
      float row_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float e = exp2f(s[nt][2 * half + c] - m_use);
          s[nt][2 * half + c] = e;
          row_sum += e;
        }
      l_run[half] = l_run[half] * corr + row_sum;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[dt][2 * half] *= corr;
        o[dt][2 * half + 1] *= corr;
      }
    }
    mma_acc_b_kn<kD, kBc / 8>(o, s, vs, lane);
    __syncthreads();  // buffer j&1 is refilled in iteration j+1
  }

  T* ob = static_cast<T*>(p.o) + (int64_t(b) * p.t * p.hq + h) * kD;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half] + __shfl_xor_sync(0xffffffffu, l_run[half], 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row_base + g + 8 * half;
    if (row >= p.t) continue;
    const float inv = 1.0f / l;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(ob + row * q_rs + dt * 8 + 2 * tq) =
          pack2<T>(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
    if (tq == 0) p.lse[(int64_t(b) * p.hq + h) * p.t + row] = (m_run[half] + log2f(l)) * kLn2;
  }
}

// ---- backward dK, dV, tensor cores: one block per (key tile of 16*kMmaWarps, kv head, batch) --
// Loops over the G query heads of the kv head and the query tiles at or after the key tile.
template <int kD>
constexpr int dkdv_query_tile() {
  return kD > 64 ? 32 : 64;
}  // bounds registers at D = 128

template <int kD>
constexpr size_t dkdv_mma_smem() {
  constexpr int kBq = dkdv_query_tile<kD>();
  return size_t(2 * 16 * kMmaWarps + 4 * kBq) * (kD + kPad) * kMmaElemBytes +
         4 * kBq * sizeof(float);
}

template <class T, int kD>
__global__ void __launch_bounds__(kMmaWarps * 32) attn_bwd_dkdv_mma_kernel(const AttnParams p) {
  constexpr int kBc = 16 * kMmaWarps, kBq = dkdv_query_tile<kD>(), kS = kD + kPad;
  constexpr int kThreads = kMmaWarps * 32;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);                           // (kBc, kS)
  T* v_s = k_s + kBc * kS;                                       // (kBc, kS)
  T* q_s = v_s + kBc * kS;                                       // 2 buffers of (kBq, kS)
  T* do_s = q_s + 2 * kBq * kS;                                  // 2 buffers of (kBq, kS)
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * kBq * kS);  // 2 x (kBq), base-2 units
  float* drow_s = lse_s + 2 * kBq;                               // 2 x (kBq)
  const int key_start = blockIdx.x * kBc, kv_h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int key_base = key_start + warp * 16;
  const int64_t q_rs = int64_t(p.hq) * kD, kv_rs = int64_t(p.hkv) * kD;
  const int64_t kv_off = (int64_t(b) * p.t * p.hkv + kv_h) * kD;
  const int first_qt = key_start / kBq;
  const int per_head = (p.t + kBq - 1) / kBq - first_qt;
  const int num_iters = per_head * p.group;

  // Iteration it covers query head kv_h*G + it/per_head, query tile first_qt + it%per_head.
  auto load_queries = [&](int it, int buf) {
    const int h = kv_h * p.group + it / per_head, q0 = (first_qt + it % per_head) * kBq;
    const int64_t off = (int64_t(b) * p.t * p.hq + h) * kD;
    load_tile_async<kBq, kD, kThreads>(q_s + buf * kBq * kS, static_cast<const T*>(p.q) + off, q_rs,
                                       q0, p.t);
    load_tile_async<kBq, kD, kThreads>(do_s + buf * kBq * kS, static_cast<const T*>(p.dout) + off,
                                       q_rs, q0, p.t);
    for (int i = threadIdx.x; i < kBq; i += kThreads) {
      const int row = q0 + i;
      const int64_t idx = (int64_t(b) * p.hq + h) * p.t + row;
      // Rows past T get lse = +inf, so their P is exactly 0.
      lse_s[buf * kBq + i] = row < p.t ? p.lse[idx] * kLog2e : INFINITY;
      drow_s[buf * kBq + i] = row < p.t ? p.drow[idx] : 0.0f;
    }
  };

  load_tile_async<kBc, kD, kThreads>(k_s, static_cast<const T*>(p.k) + kv_off, kv_rs, key_start,
                                     p.t);
  load_tile_async<kBc, kD, kThreads>(v_s, static_cast<const T*>(p.v) + kv_off, kv_rs, key_start,
                                     p.t);
  if (num_iters > 0) load_queries(0, 0);
  cp_async_commit();

  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};  // (16 keys, kD) of this warp
  for (int it = 0; it < num_iters; ++it) {
    if (it + 1 < num_iters) {
      load_queries(it + 1, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = it & 1, q_start = (first_qt + it % per_head) * kBq;
    const T* qs = q_s + buf * kBq * kS;
    const T* dos = do_s + buf * kBq * kS;
    const float* lse_t = lse_s + buf * kBq;
    const float* drow_t = drow_s + buf * kBq;

    // S^T (16 keys, kBq queries) = K Q^T, then P^T = exp2(S^T * scale_log2 - lse).
    float s[kBq / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      load_a_frag<kD>(a, k_s, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBq / 16; ++np) {
        uint32_t bq[4];
        load_b_frag_nk<kD>(bq, qs, np * 16, kk * 16, lane);
        mma16816<T>(s[2 * np], a, bq[0], bq[1]);
        mma16816<T>(s[2 * np + 1], a, bq[2], bq[3]);
      }
    }
    const bool need_mask = q_start < key_base + 15;  // some query before some key of the warp
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_base + g + 8 * (e / 2), ql = nt * 8 + 2 * tq + e % 2;
        float x = exp2f(s[nt][e] * p.scale_log2 - lse_t[ql]);
        if (need_mask && q_start + ql < key) x = 0.0f;
        s[nt][e] = x;
      }
    // dV += P^T dO.
    mma_acc_b_kn<kD, kBq / 8>(dv, s, dos, lane);
    // dP^T (16 keys, kBq) = V dO^T.
    float dpt[kBq / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      load_a_frag<kD>(a, v_s, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBq / 16; ++np) {
        uint32_t bo[4];
        load_b_frag_nk<kD>(bo, dos, np * 16, kk * 16, lane);
        mma16816<T>(dpt[2 * np], a, bo[0], bo[1]);
        mma16816<T>(dpt[2 * np + 1], a, bo[2], bo[3]);
      }
    }
    // dS^T = P^T * (dP^T - Drow), then dK += dS^T Q (scaled once at the end).
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dpt[nt][e] - drow_t[nt * 8 + 2 * tq + e % 2];
    mma_acc_b_kn<kD, kBq / 8>(dk, s, qs, lane);
    __syncthreads();  // buffer `buf` is refilled in iteration it+1
  }

  T* dkb = static_cast<T*>(p.dk) + kv_off;
  T* dvb = static_cast<T*>(p.dv) + kv_off;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key_base + g + 8 * half;
    if (key >= p.t) continue;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int64_t at = key * kv_rs + dt * 8 + 2 * tq;
      *reinterpret_cast<uint32_t*>(dkb + at) =
          pack2<T>(dk[dt][2 * half] * p.scale, dk[dt][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvb + at) = pack2<T>(dv[dt][2 * half], dv[dt][2 * half + 1]);
    }
  }
}

// ---- backward dQ, tensor cores: one block per (query tile of 16*kMmaWarps, head, batch) -------
template <int kD>
constexpr int dq_key_tile() {
  return kD > 64 ? 32 : 64;
}  // bounds registers at D = 128

template <int kD>
constexpr size_t dq_mma_smem() {
  return size_t(2 * 16 * kMmaWarps + 4 * dq_key_tile<kD>()) * (kD + kPad) * kMmaElemBytes;
}

template <class T, int kD>
__global__ void __launch_bounds__(kMmaWarps * 32) attn_bwd_dq_mma_kernel(const AttnParams p) {
  constexpr int kBr = 16 * kMmaWarps, kBc = dq_key_tile<kD>(), kS = kD + kPad;
  constexpr int kThreads = kMmaWarps * 32;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);  // (kBr, kS)
  T* do_s = q_s + kBr * kS;             // (kBr, kS)
  T* k_s = do_s + kBr * kS;             // 2 buffers of (kBc, kS)
  T* v_s = k_s + 2 * kBc * kS;          // 2 buffers of (kBc, kS)
  const int q_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kv_h = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int q_start = q_tile * kBr, row_base = q_start + warp * 16;
  const int64_t q_rs = int64_t(p.hq) * kD, kv_rs = int64_t(p.hkv) * kD;
  const int64_t q_off = (int64_t(b) * p.t * p.hq + h) * kD;
  const T* kb = static_cast<const T*>(p.k) + (int64_t(b) * p.t * p.hkv + kv_h) * kD;
  const T* vb = static_cast<const T*>(p.v) + (int64_t(b) * p.t * p.hkv + kv_h) * kD;
  const int num_tiles = min((p.t + kBc - 1) / kBc, (q_start + kBr - 1) / kBc + 1);

  load_tile_async<kBr, kD, kThreads>(q_s, static_cast<const T*>(p.q) + q_off, q_rs, q_start, p.t);
  load_tile_async<kBr, kD, kThreads>(do_s, static_cast<const T*>(p.dout) + q_off, q_rs, q_start,
                                     p.t);
  load_tile_async<kBc, kD, kThreads>(k_s, kb, kv_rs, 0, p.t);
  load_tile_async<kBc, kD, kThreads>(v_s, vb, kv_rs, 0, p.t);
  cp_async_commit();

  float lse2[2], drow[2];  // rows g, g+8; rows past T get lse = +inf (P = 0)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + g + 8 * half;
    const int64_t idx = (int64_t(b) * p.hq + h) * p.t + row;
    lse2[half] = row < p.t ? p.lse[idx] * kLog2e : INFINITY;
    drow[half] = row < p.t ? p.drow[idx] : 0.0f;
  }
  uint32_t qf[kD / 16][4], dof[kD / 16][4];
  float dq[kD / 8][4] = {};
  for (int j = 0; j < num_tiles; ++j) {
    if (j + 1 < num_tiles) {
      const int nb = (j + 1) & 1;
      load_tile_async<kBc, kD, kThreads>(k_s + nb * kBc * kS, kb, kv_rs, (j + 1) * kBc, p.t);
      load_tile_async<kBc, kD, kThreads>(v_s + nb * kBc * kS, vb, kv_rs, (j + 1) * kBc, p.t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        load_a_frag<kD>(qf[kk], q_s, warp * 16, kk * 16, lane);
        load_a_frag<kD>(dof[kk], do_s, warp * 16, kk * 16, lane);
      }
    const T* ks = k_s + (j & 1) * kBc * kS;
    const T* vs = v_s + (j & 1) * kBc * kS;

    float s[kBc / 8][4] = {};
    mma_a_regs_b_nk<kD, kD / 16, kBc / 8>(s, qf, ks, lane);
    float dp[kBc / 8][4] = {};
    mma_a_regs_b_nk<kD, kD / 16, kBc / 8>(dp, dof, vs, lane);
    const bool diagonal = j * kBc + kBc - 1 > row_base;
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, row = row_base + g + 8 * half;
        float x = exp2f(s[nt][e] * p.scale_log2 - lse2[half]);
        if (diagonal && j * kBc + nt * 8 + 2 * tq + e % 2 > row) x = 0.0f;
        s[nt][e] = x * (dp[nt][e] - drow[half]);  // dS
      }
    mma_acc_b_kn<kD, kBc / 8>(dq, s, ks, lane);  // dQ += dS K
    __syncthreads();
  }

  T* dqb = static_cast<T*>(p.dq) + q_off;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + g + 8 * half;
    if (row >= p.t) continue;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dqb + row * q_rs + dt * 8 + 2 * tq) =
          pack2<T>(dq[dt][2 * half] * p.scale, dq[dt][2 * half + 1] * p.scale);
  }
}

// ---- FMA kernels (f32, and bf16/f16 with D other than 64/128): any D <= 128, multiple of 8 ----
// A warp owns kFmaRows rows (queries, or keys in dK/dV) and a lane owns one of kFmaTile columns of
// the other side per tile; per-row values are broadcast with shuffles. Shared rows of the tiles
// read one row per lane are padded to D+1 floats (conflict-free); lane i holds dims i, i+32, ...
constexpr int kFmaWarps = 4;
constexpr int kFmaRows = 4;
constexpr int kFmaBlockRows = kFmaWarps * kFmaRows;
constexpr int kFmaTile = 32;
constexpr int kFmaDimsPerLane = 4;  // D <= 128

template <class T>
__device__ __forceinline__ void load_rows_f32(float* dst, int dst_stride, const T* base,
                                              int64_t row_stride, int row0, int num_rows, int t,
                                              int d) {
  for (int idx = threadIdx.x; idx < num_rows * d; idx += blockDim.x) {
    const int r = idx / d, c = idx % d, row = row0 + r;
    dst[r * dst_stride + c] = row < t ? to_f32(base[row * row_stride + c]) : 0.0f;
  }
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int c = 0; c < d; ++c) s = fmaf(a[c], b[c], s);
  return s;
}

size_t fwd_fma_smem(int d) {
  return (size_t(kFmaBlockRows) * d + 2 * kFmaTile * (d + 1)) * sizeof(float);
}

template <class T>
__global__ void __launch_bounds__(kFmaWarps * 32) attn_fwd_fma_kernel(const AttnParams p) {
  extern __shared__ float fsm[];
  const int d = p.d, ds = d + 1;
  float* q_s = fsm;                      // (kFmaBlockRows, D)
  float* k_s = q_s + kFmaBlockRows * d;  // (kFmaTile, D+1)
  float* v_s = k_s + kFmaTile * ds;      // (kFmaTile, D+1)
  const int q_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kv_h = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q_start = q_tile * kFmaBlockRows, row_base = q_start + warp * kFmaRows;
  const int64_t q_rs = int64_t(p.hq) * d, kv_rs = int64_t(p.hkv) * d;
  const int64_t q_off = (int64_t(b) * p.t * p.hq + h) * d;
  const int64_t kv_off = (int64_t(b) * p.t * p.hkv + kv_h) * d;
  const T* qb = static_cast<const T*>(p.q) + q_off;
  const T* kb = static_cast<const T*>(p.k) + kv_off;
  const T* vb = static_cast<const T*>(p.v) + kv_off;
  const int num_tiles =
      min((p.t + kFmaTile - 1) / kFmaTile, (q_start + kFmaBlockRows - 1) / kFmaTile + 1);

  load_rows_f32(q_s, d, qb, q_rs, q_start, kFmaBlockRows, p.t, d);
  float acc[kFmaRows][kFmaDimsPerLane] = {};
  float m_run[kFmaRows], l_run[kFmaRows];
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r) m_run[r] = -INFINITY, l_run[r] = 0.0f;
  for (int kt = 0; kt < num_tiles; ++kt) {
    __syncthreads();  // the previous tile is consumed
    load_rows_f32(k_s, ds, kb, kv_rs, kt * kFmaTile, kFmaTile, p.t, d);
    load_rows_f32(v_s, ds, vb, kv_rs, kt * kFmaTile, kFmaTile, p.t, d);
    __syncthreads();
    const int key = kt * kFmaTile + lane;
    float prob[kFmaRows];
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
      const int row = row_base + r;
      float s = dot_smem(q_s + (warp * kFmaRows + r) * d, k_s + lane * ds, d) * p.scale;
      if (key > row || key >= p.t) s = -INFINITY;
      const float m_new = fmaxf(m_run[r], warp_allmax(s));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float corr = expf(m_run[r] - m_use);
      prob[r] = expf(s - m_use);
      l_run[r] = l_run[r] * corr + warp_allsum(prob[r]);
      m_run[r] = m_new;
#pragma unroll
      for (int i = 0; i < kFmaDimsPerLane; ++i) acc[r][i] *= corr;
    }
    for (int jj = 0; jj < kFmaTile; ++jj) {
      float pj[kFmaRows];
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r) pj[r] = __shfl_sync(0xffffffffu, prob[r], jj);
#pragma unroll
      for (int i = 0; i < kFmaDimsPerLane; ++i) {
        const int c = lane + 32 * i;
        const float vv = c < d ? v_s[jj * ds + c] : 0.0f;
#pragma unroll
        for (int r = 0; r < kFmaRows; ++r) acc[r][i] = fmaf(pj[r], vv, acc[r][i]);
      }
    }
  }
  T* ob = static_cast<T*>(p.o) + q_off;
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r) {
    const int row = row_base + r;
    if (row >= p.t) continue;
    const float inv = 1.0f / l_run[r];
#pragma unroll
    for (int i = 0; i < kFmaDimsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) ob[row * q_rs + c] = from_f32<T>(acc[r][i] * inv);
    }
    if (lane == 0) p.lse[(int64_t(b) * p.hq + h) * p.t + row] = m_run[r] + logf(l_run[r]);
  }
}

size_t dq_fma_smem(int d) {
  return (size_t(2 * kFmaBlockRows) * d + 2 * kFmaTile * (d + 1)) * sizeof(float);
}

template <class T>
__global__ void __launch_bounds__(kFmaWarps * 32) attn_bwd_dq_fma_kernel(const AttnParams p) {
  extern __shared__ float fsm[];
  const int d = p.d, ds = d + 1;
  float* q_s = fsm;                       // (kFmaBlockRows, D)
  float* do_s = q_s + kFmaBlockRows * d;  // (kFmaBlockRows, D)
  float* k_s = do_s + kFmaBlockRows * d;  // (kFmaTile, D+1)
  float* v_s = k_s + kFmaTile * ds;       // (kFmaTile, D+1)
  const int q_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kv_h = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q_start = q_tile * kFmaBlockRows, row_base = q_start + warp * kFmaRows;
  const int64_t q_rs = int64_t(p.hq) * d, kv_rs = int64_t(p.hkv) * d;
  const int64_t q_off = (int64_t(b) * p.t * p.hq + h) * d;
  const int64_t kv_off = (int64_t(b) * p.t * p.hkv + kv_h) * d;
  const T* kb = static_cast<const T*>(p.k) + kv_off;
  const T* vb = static_cast<const T*>(p.v) + kv_off;
  const int num_tiles =
      min((p.t + kFmaTile - 1) / kFmaTile, (q_start + kFmaBlockRows - 1) / kFmaTile + 1);

  load_rows_f32(q_s, d, static_cast<const T*>(p.q) + q_off, q_rs, q_start, kFmaBlockRows, p.t, d);
  load_rows_f32(do_s, d, static_cast<const T*>(p.dout) + q_off, q_rs, q_start, kFmaBlockRows, p.t,
                d);
  float lse[kFmaRows], drow[kFmaRows];
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r) {
    const int row = row_base + r;
    const int64_t idx = (int64_t(b) * p.hq + h) * p.t + row;
    lse[r] = row < p.t ? p.lse[idx] : 0.0f;
    drow[r] = row < p.t ? p.drow[idx] : 0.0f;
  }
  float acc[kFmaRows][kFmaDimsPerLane] = {};
  for (int kt = 0; kt < num_tiles; ++kt) {
    __syncthreads();
    load_rows_f32(k_s, ds, kb, kv_rs, kt * kFmaTile, kFmaTile, p.t, d);
    load_rows_f32(v_s, ds, vb, kv_rs, kt * kFmaTile, kFmaTile, p.t, d);
    __syncthreads();
    const int key = kt * kFmaTile + lane;
    float dsc[kFmaRows];  // dS of (row r, this lane's key)
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
      const int row = row_base + r;
      const float* q_r = q_s + (warp * kFmaRows + r) * d;
      const float* do_r = do_s + (warp * kFmaRows + r) * d;
      const bool valid = key <= row && row < p.t;
      const float prob = valid ? expf(dot_smem(q_r, k_s + lane * ds, d) * p.scale - lse[r]) : 0.0f;
      dsc[r] = prob * (dot_smem(do_r, v_s + lane * ds, d) - drow[r]);
    }
    for (int jj = 0; jj < kFmaTile; ++jj) {
      float dj[kFmaRows];
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r) dj[r] = __shfl_sync(0xffffffffu, dsc[r], jj);
#pragma unroll
      for (int i = 0; i < kFmaDimsPerLane; ++i) {
        const int c = lane + 32 * i;
        const float kv = c < d ? k_s[jj * ds + c] : 0.0f;
#pragma unroll
        for (int r = 0; r < kFmaRows; ++r) acc[r][i] = fmaf(dj[r], kv, acc[r][i]);
      }
    }
  }
  T* dqb = static_cast<T*>(p.dq) + q_off;
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r) {
    const int row = row_base + r;
    if (row >= p.t) continue;
#pragma unroll
    for (int i = 0; i < kFmaDimsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) dqb[row * q_rs + c] = from_f32<T>(acc[r][i] * p.scale);
    }
  }
}

size_t dkdv_fma_smem(int d) {
  return (size_t(2 * kFmaBlockRows) * d + 2 * kFmaTile * (d + 1) + 2 * kFmaTile) * sizeof(float);
}

// One block per (kFmaBlockRows keys, kv head, batch); a lane owns one query of each tile.
template <class T>
__global__ void __launch_bounds__(kFmaWarps * 32) attn_bwd_dkdv_fma_kernel(const AttnParams p) {
  extern __shared__ float fsm[];
  const int d = p.d, ds = d + 1;
  float* k_s = fsm;                      // (kFmaBlockRows, D)
  float* v_s = k_s + kFmaBlockRows * d;  // (kFmaBlockRows, D)
  float* q_s = v_s + kFmaBlockRows * d;  // (kFmaTile, D+1)
  float* do_s = q_s + kFmaTile * ds;     // (kFmaTile, D+1)
  float* lse_s = do_s + kFmaTile * ds;   // (kFmaTile)
  float* drow_s = lse_s + kFmaTile;      // (kFmaTile)
  const int key_start = blockIdx.x * kFmaBlockRows, kv_h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_base = key_start + warp * kFmaRows;
  const int64_t q_rs = int64_t(p.hq) * d, kv_rs = int64_t(p.hkv) * d;
  const int64_t kv_off = (int64_t(b) * p.t * p.hkv + kv_h) * d;
  const int num_q_tiles = (p.t + kFmaTile - 1) / kFmaTile;

  load_rows_f32(k_s, d, static_cast<const T*>(p.k) + kv_off, kv_rs, key_start, kFmaBlockRows, p.t,
                d);
  load_rows_f32(v_s, d, static_cast<const T*>(p.v) + kv_off, kv_rs, key_start, kFmaBlockRows, p.t,
                d);
  float dk[kFmaRows][kFmaDimsPerLane] = {}, dv[kFmaRows][kFmaDimsPerLane] = {};
  for (int hh = 0; hh < p.group; ++hh) {
    const int h = kv_h * p.group + hh;
    const int64_t q_off = (int64_t(b) * p.t * p.hq + h) * d;
    for (int qt = key_start / kFmaTile; qt < num_q_tiles; ++qt) {
      const int q0 = qt * kFmaTile;
      __syncthreads();  // the previous tile is consumed (and k_s, v_s written on the first pass)
      load_rows_f32(q_s, ds, static_cast<const T*>(p.q) + q_off, q_rs, q0, kFmaTile, p.t, d);
      load_rows_f32(do_s, ds, static_cast<const T*>(p.dout) + q_off, q_rs, q0, kFmaTile, p.t, d);
      if (threadIdx.x < kFmaTile) {
        const int row = q0 + threadIdx.x;
        const int64_t idx = (int64_t(b) * p.hq + h) * p.t + row;
        lse_s[threadIdx.x] = row < p.t ? p.lse[idx] : 0.0f;
        drow_s[threadIdx.x] = row < p.t ? p.drow[idx] : 0.0f;
      }
      __syncthreads();
      const int query = q0 + lane;
      float prob[kFmaRows], dsc[kFmaRows];  // P and dS of (key r, this lane's query)
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r) {
        const int key = key_base + r;
        const float* k_r = k_s + (warp * kFmaRows + r) * d;
        const float* v_r = v_s + (warp * kFmaRows + r) * d;
        const bool valid = query >= key && query < p.t && key < p.t;
        prob[r] = valid ? expf(dot_smem(q_s + lane * ds, k_r, d) * p.scale - lse_s[lane]) : 0.0f;
        dsc[r] = prob[r] * (dot_smem(do_s + lane * ds, v_r, d) - drow_s[lane]);
      }
      for (int jj = 0; jj < kFmaTile; ++jj) {
        float pj[kFmaRows], dj[kFmaRows];
#pragma unroll
        for (int r = 0; r < kFmaRows; ++r) {
          pj[r] = __shfl_sync(0xffffffffu, prob[r], jj);
          dj[r] = __shfl_sync(0xffffffffu, dsc[r], jj);
        }
#pragma unroll
        for (int i = 0; i < kFmaDimsPerLane; ++i) {
          const int c = lane + 32 * i;
          const float qv = c < d ? q_s[jj * ds + c] : 0.0f;
          const float dov = c < d ? do_s[jj * ds + c] : 0.0f;
#pragma unroll
          for (int r = 0; r < kFmaRows; ++r) {
            dv[r][i] = fmaf(pj[r], dov, dv[r][i]);
            dk[r][i] = fmaf(dj[r], qv, dk[r][i]);
          }
        }
      }
    }
  }
  T* dkb = static_cast<T*>(p.dk) + kv_off;
  T* dvb = static_cast<T*>(p.dv) + kv_off;
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r) {
    const int key = key_base + r;
    if (key >= p.t) continue;
#pragma unroll
    for (int i = 0; i < kFmaDimsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c >= d) continue;
      dkb[key * kv_rs + c] = from_f32<T>(dk[r][i] * p.scale);
      dvb[key * kv_rs + c] = from_f32<T>(dv[r][i]);
    }
  }
}

// Drow (B,Hq,T) = rowsum(dO * O): one warp per (b, t, h) row, rows in memory order.
template <class T>
__global__ void attn_drow_kernel(const AttnParams p, int64_t num_rows) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) return;  // whole warps leave together
  const T* o = static_cast<const T*>(p.out) + row * p.d;
  const T* g = static_cast<const T*>(p.dout) + row * p.d;
  float s = 0.0f;
  for (int c = lane; c < p.d; c += 32) s = fmaf(to_f32(o[c]), to_f32(g[c]), s);
  s = warp_allsum(s);
  if (lane != 0) return;
  const int64_t h = row % p.hq, t = (row / p.hq) % p.t, b = row / (int64_t(p.hq) * p.t);
  p.drow[(b * p.hq + h) * p.t + t] = s;
}

// ---- launchers ---------------------------------------------------------------------------------

struct AttnDims {
  int64_t b = 0, t = 0, hq = 0, hkv = 0, d = 0;
};

bool overlap(const Tensor& a, const Tensor& b) {
  if (a.empty() || b.empty()) return false;
  const char* a0 = static_cast<const char*>(a.data);
  const char* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

void check_same(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                const char* name) {
  TS_CHECK(t.device == Device::cuda, "{}: {} must be on cuda, got {}", op, name, t.str());
  TS_CHECK(t.dtype == dtype, "{}: {} must be {}, got {}", op, name, dtype_name(dtype), t.str());
  TS_CHECK(t.shape == shape, "{}: {} must be {}, got {}", op, name, shape.str(), t.str());
}

AttnDims check_attention(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, const char* op) {
  TS_CHECK(q.device == Device::cuda, "{}: q must be on cuda, got {}", op, q.str());
  TS_CHECK(is_compute_dtype(q.dtype), "{}: q must be f32, bf16 or f16, got {}", op, q.str());
  TS_CHECK(q.ndim() == 4, "{}: q must be (B, T, Hq, D), got {}", op, q.str());
  TS_CHECK(k.ndim() == 4, "{}: k must be (B, T, Hkv, D), got {}", op, k.str());
  const AttnDims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  TS_CHECK(d.hkv >= 1 && d.hq % d.hkv == 0, "{}: Hq = {} must be a multiple of Hkv = {}", op, d.hq,
           d.hkv);
  TS_CHECK(d.d % 8 == 0 && d.d >= 8 && d.d <= 128,
           "{}: head dim D = {} is not supported by the native kernels (a multiple of 8, at "
           "most 128)",
           op, d.d);
  TS_CHECK(d.t <= INT32_MAX / 2 && d.hq <= 65535 && d.b <= 65535, "{}: sizes too large: {}", op,
           q.str());
  check_same(k, q.dtype, Shape{d.b, d.t, d.hkv, d.d}, op, "k");
  check_same(v, q.dtype, k.shape, op, "v");
  check_same(out, q.dtype, q.shape, op, "out");
  check_same(lse, DType::f32, Shape{d.b, d.hq, d.t}, op, "lse");
  return d;
}

AttnParams make_params(const AttnDims& d, float scale) {
  AttnParams p;
  p.t = int(d.t), p.hq = int(d.hq), p.hkv = int(d.hkv), p.group = int(d.hq / d.hkv);
  p.d = int(d.d), p.scale = scale, p.scale_log2 = scale * kLog2e;
  return p;
}

template <class Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem_bytes, const AttnParams& p, cudaStream_t stream) {
  TS_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
  kernel<<<grid, kMmaWarps * 32, smem_bytes, stream>>>(p);
  TS_CUDA_CHECK_LAUNCH();
}
static_assert(kMmaWarps == kFmaWarps, "launch() uses one block size for both kernel families");

// bf16 or f16, D = 64 or 128, 16-byte aligned rows: the tensor-core kernels apply.
bool use_mma(const AttnDims& d, DType dtype, std::initializer_list<const Tensor*> tensors) {
  if ((dtype != DType::bf16 && dtype != DType::f16) || (d.d != 64 && d.d != 128)) return false;
  for (const Tensor* t : tensors)
    if (!aligned16(*t)) return false;
  return true;
}

template <class T, int kD>
void forward_mma(const AttnParams& p, const AttnDims& d, cudaStream_t stream) {
  const dim3 grid(ceil_div(d.t, 16 * kMmaWarps), unsigned(d.hq), unsigned(d.b));
  launch(attn_fwd_mma_kernel<T, kD>, grid, fwd_mma_smem<kD>(), p, stream);
}

template <class T, int kD>
void backward_mma(const AttnParams& p, const AttnDims& d, cudaStream_t stream) {
  launch(attn_bwd_dkdv_mma_kernel<T, kD>,
         dim3(ceil_div(d.t, 16 * kMmaWarps), unsigned(d.hkv), unsigned(d.b)), dkdv_mma_smem<kD>(),
         p, stream);
  launch(attn_bwd_dq_mma_kernel<T, kD>,
         dim3(ceil_div(d.t, 16 * kMmaWarps), unsigned(d.hq), unsigned(d.b)), dq_mma_smem<kD>(), p,
         stream);
}

// Runs f.template operator()<T>() with T the 16-bit type of dtype (bf16 or f16).
template <class F>
void dispatch_mma_type(DType dtype, F&& f) {
  if (dtype == DType::f16)
    f.template operator()<__half>();
  else
    f.template operator()<__nv_bfloat16>();
}

}  // namespace

void attention_native_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale,
                              ops::Stream stream) {
  const cudaStream_t s = cuda_stream(stream);
  constexpr const char* kOp = "attention_native_forward";
  const AttnDims d = check_attention(out, lse, q, k, v, kOp);
  for (const Tensor* input : {&q, &k, &v})
    TS_CHECK(!overlap(out, *input) && !overlap(lse, *input), "{}: outputs overlap {}", kOp,
             input->str());
  TS_CHECK(!overlap(out, lse), "{}: out and lse overlap", kOp);
  if (d.b == 0 || d.t == 0 || d.hq == 0) return;
  AttnParams p = make_params(d, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.o = out.data, p.lse = lse.ptr<float>();
  if (use_mma(d, q.dtype, {&q, &k, &v, &out})) {
    dispatch_mma_type(q.dtype, [&]<class T>() {
      if (d.d == 64)
        forward_mma<T, 64>(p, d, s);
      else
        forward_mma<T, 128>(p, d, s);
    });
    return;
  }
  const dim3 grid(ceil_div(d.t, kFmaBlockRows), unsigned(d.hq), unsigned(d.b));
  dispatch_float(q, kOp,
                 [&]<class T>() { launch(attn_fwd_fma_kernel<T>, grid, fwd_fma_smem(p.d), p, s); });
}

void attention_native_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                               Tensor v, Tensor out, Tensor lse, float scale, ops::Stream stream) {
  const cudaStream_t s = cuda_stream(stream);
  constexpr const char* kOp = "attention_native_backward";
  const AttnDims d = check_attention(out, lse, q, k, v, kOp);
  check_same(dout, q.dtype, q.shape, kOp, "dout");
  check_same(dq, q.dtype, q.shape, kOp, "dq");
  check_same(dk, q.dtype, k.shape, kOp, "dk");
  check_same(dv, q.dtype, k.shape, kOp, "dv");
  for (const Tensor* grad : {&dq, &dk, &dv}) {
    for (const Tensor* input : {&dout, &q, &k, &v, &out, &lse})
      TS_CHECK(!overlap(*grad, *input), "{}: gradient {} overlaps input {}", kOp, grad->str(),
               input->str());
  }
  TS_CHECK(!overlap(dq, dk) && !overlap(dq, dv) && !overlap(dk, dv), "{}: gradients overlap", kOp);
  if (d.b == 0 || d.t == 0 || d.hq == 0) return;
  const Context& ctx = context();
  const int64_t num_rows = d.b * d.t * d.hq;
  TS_CHECK(size_t(num_rows) * sizeof(float) <= ctx.workspace_bytes,
           "{}: B*T*Hq = {} rows need {} bytes of workspace for rowsum(dO*O), have {}", kOp,
           num_rows, num_rows * sizeof(float), ctx.workspace_bytes);
  AttnParams p = make_params(d, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out = out.data, p.dout = dout.data;
  p.lse = lse.ptr<float>(), p.drow = static_cast<float*>(ctx.workspace);
  p.dq = dq.data, p.dk = dk.data, p.dv = dv.data;
  dispatch_float(q, kOp, [&]<class T>() {
    attn_drow_kernel<T><<<ceil_div(num_rows * 32, 256), 256, 0, s>>>(p, num_rows);
    TS_CUDA_CHECK_LAUNCH();
  });
  if (use_mma(d, q.dtype, {&q, &k, &v, &out, &dout, &dq, &dk, &dv})) {
    dispatch_mma_type(q.dtype, [&]<class T>() {
      if (d.d == 64)
        backward_mma<T, 64>(p, d, s);
      else
        backward_mma<T, 128>(p, d, s);
    });
    return;
  }
  dispatch_float(q, kOp, [&]<class T>() {
    launch(attn_bwd_dkdv_fma_kernel<T>,
           dim3(ceil_div(d.t, kFmaBlockRows), unsigned(d.hkv), unsigned(d.b)), dkdv_fma_smem(p.d),
           p, s);
    launch(attn_bwd_dq_fma_kernel<T>,
           dim3(ceil_div(d.t, kFmaBlockRows), unsigned(d.hq), unsigned(d.b)), dq_fma_smem(p.d), p,
           s);
  });
}

}  // namespace tessera::cuda
