// CUDA paged attention (kernels/ops_infer.h), flash-decoding style. A block owns one query row m,
// one KV head and up to kMaxGroup of the query heads that share it, over one partition of
// kPart = ops::kPagedAttentionPartition positions of the row's context: it scores the partition's
// keys (lanes split each key row into 16-byte packs; a lane group of kTG lanes sums one token's
// dot products by a fixed butterfly), takes the partition's max and exponentials, and sums p * v.
// With one partition per row it normalizes and writes out directly; otherwise it writes
// (max, sum, unnormalized out) to the scratch and a second kernel combines the row's partitions
// in order. Partition p of a row always covers positions [p * kPart, ...), and a one-partition
// row gets the same arithmetic either way (below), so a row's output depends on its own
// context only. Scores use scale * log2(e) and exp2: the same softmax, one multiply fewer.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/infer.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {
namespace {

constexpr int kPart = ops::kPagedAttentionPartition;
constexpr int kThreadsPA = 128;   // 4 warps per block
constexpr int kMaxGroup = 8;      // query heads per block (more share a KV head: several blocks)
constexpr int kLaneElems = 8;     // head-dim elements per lane: D <= 8 * kTG <= 256
constexpr int kMaxHeadDim = 256;  // kLaneElems * 32

struct PagedArgs {
  const void* q;  // (M,Hq,D)
  const void* k_cache;
  const void* v_cache;  // (NB,BS,Hkv,D)
  void* out;            // (M,Hq,D)
  const int32_t* tables;
  const int32_t* seq;
  const int32_t* pos;
  float* partial_out;  // (M,Hq,P,D) or null (one partition: write out directly)
  float* partial_ml;   // (M,Hq,P,2) max and sum, in the log2 domain
  int num_hq, num_hkv, head_dim, block_size, num_blocks, num_seq, max_blocks, max_context;
  int max_parts, head_chunks;
  float scale_log2;  // scale * log2(e)
};

// The context length of row m and whether its indices are usable; 0 for padding.
__device__ __forceinline__ int row_context(const PagedArgs& a, int64_t m, bool* bad) {
  const int p = a.pos[m];
  if (p < 0) return 0;
  const int s = a.seq[m];
  *bad = p >= a.max_context || s < 0 || s >= a.num_seq || int64_t(p) / a.block_size >= a.max_blocks;
  return p + 1;
}

template <class T>
__device__ __forceinline__ void fill_rows(const PagedArgs& a, int64_t m, int h0, int ng, float v) {
  T* out = static_cast<T*>(a.out) + (m * a.num_hq + h0) * a.head_dim;
  for (int i = threadIdx.x; i < ng * a.head_dim; i += blockDim.x) out[i] = from_f32<T>(v);
}

// kVec elements of pack `pk` of a D-vector (kVec = 1: one element).
template <class T, int kVec>
__device__ __forceinline__ void load_vec(const T* row, int pk, float (&dst)[kVec]) {
  if constexpr (kVec == 1) {
    dst[0] = to_f32(row[pk]);
  } else {
    const Pack<T, kVec> p = load_pack<T, kVec>(row + pk * kVec);
#pragma unroll
    for (int v = 0; v < kVec; ++v) dst[v] = to_f32(p.v[v]);
  }
}

// grid (max_parts, Hkv * head_chunks, M); kTG lanes per token, kLaneElems / kVec packs per lane.
template <class T, int kVec, int kTG>
__global__ void __launch_bounds__(kThreadsPA) paged_attention_kernel(PagedArgs a) {
  constexpr int kPPL = kLaneElems / kVec;
  constexpr int kGroups = kThreadsPA / kTG;  // tokens in flight per block
  __shared__ float logits[kMaxGroup][kPart];
  __shared__ int64_t slots[kPart];  // cache row of each position, -1 for a bad block id
  // (kGroups, D): D <= kTG * kLaneElems, so kGroups * D <= kThreadsPA * kLaneElems.
  __shared__ float reduce[kThreadsPA * kLaneElems];
  __shared__ float row_max[kMaxGroup], row_sum[kMaxGroup];

  const int part = blockIdx.x;
  const int64_t m = blockIdx.z;
  const int kv_head = blockIdx.y / a.head_chunks, chunk = blockIdx.y % a.head_chunks;
  const int group = a.num_hq / a.num_hkv;
  const int h0 = kv_head * group + chunk * kMaxGroup;
  const int ng = min(kMaxGroup, group - chunk * kMaxGroup);
  const bool direct = a.partial_out == nullptr;
  const int head_dim = a.head_dim;

  bool bad = false;
  const int context = row_context(a, m, &bad);
  if (context == 0 || bad) {  // padding: zeros; a caller bug: NaN (the combine does both itself)
    if (direct) fill_rows<T>(a, m, h0, ng, context == 0 ? 0.0f : __int_as_float(0x7fc00000));
    return;
  }
  const int t0 = part * kPart;
  if (t0 >= context) return;
  const int num_tok = min(kPart, context - t0);
  const int64_t table_row = int64_t(a.seq[m]) * a.max_blocks;

  const int tg = threadIdx.x / kTG, tl = threadIdx.x % kTG;
  const int num_packs = head_dim / kVec;
  const T* q = static_cast<const T*>(a.q) + (m * a.num_hq + h0) * head_dim;
  float qr[kMaxGroup][kPPL][kVec];  // this lane's packs of each head's query, times scale*log2(e)
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int pk = tl + j * kTG;
      if (g < ng && pk < num_packs) {
        load_vec<T, kVec>(q + g * head_dim, pk, qr[g][j]);
#pragma unroll
        for (int v = 0; v < kVec; ++v) qr[g][j][v] *= a.scale_log2;
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) qr[g][j][v] = 0.0f;
      }
    }

  // Scores. Every thread runs the same number of iterations (the butterfly needs whole warps).
  const T* kc = static_cast<const T*>(a.k_cache);
  for (int tb = 0; tb < num_tok; tb += kGroups) {
    const int t = tb + tg;
    int64_t slot = -1;
    if (t < num_tok) {
      const int p = t0 + t;
      const int32_t b = a.tables[table_row + p / a.block_size];
      if (b >= 0 && b < a.num_blocks) slot = int64_t(b) * a.block_size + p % a.block_size;
    }
    float s[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) s[g] = 0.0f;
    if (slot >= 0) {
      const T* krow = kc + (slot * a.num_hkv + kv_head) * head_dim;
#pragma unroll
      for (int j = 0; j < kPPL; ++j) {
        const int pk = tl + j * kTG;
        if (pk < num_packs) {
          float kv[kVec];
          load_vec<T, kVec>(krow, pk, kv);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < ng)
#pragma unroll
              for (int v = 0; v < kVec; ++v) s[g] = __fmaf_rn(qr[g][j][v], kv[v], s[g]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int off = kTG / 2; off > 0; off /= 2) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
    if (t < num_tok && tl == 0) {
      slots[t] = slot;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g)
        if (g < ng) logits[g][t] = slot >= 0 ? s[g] : __int_as_float(0x7fc00000);
    }
  }
  __syncthreads();

  // Softmax numerators and sums of the partition, one warp per head, in a fixed order.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < ng; g += kThreadsPA / 32) {
    float mx = -INFINITY;
    for (int t = lane; t < num_tok; t += 32) mx = fmaxf(mx, logits[g][t]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.0f;
    for (int t = lane; t < num_tok; t += 32) {
      const float e = exp2f(logits[g][t] - mx);  // NaN scores (bad blocks) make the sum NaN
      logits[g][t] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) row_max[g] = mx, row_sum[g] = sum;
  }
  __syncthreads();

  // sum_t p_t v_t: each lane group over its tokens, then the groups' sums in group order.
  const T* vc = static_cast<const T*>(a.v_cache);
  float acc[kMaxGroup][kPPL][kVec];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int j = 0; j < kPPL; ++j)
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[g][j][v] = 0.0f;
  for (int t = tg; t < num_tok; t += kGroups) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // its NaN score already poisons the row
    const T* vrow = vc + (slot * a.num_hkv + kv_head) * head_dim;
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int pk = tl + j * kTG;
      if (pk < num_packs) {
        float vv[kVec];
        load_vec<T, kVec>(vrow, pk, vv);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < ng) {
            const float p = logits[g][t];
#pragma unroll
            for (int v = 0; v < kVec; ++v) acc[g][j][v] = __fmaf_rn(p, vv[v], acc[g][j][v]);
          }
      }
    }
  }
  T* out = static_cast<T*>(a.out);
  const int64_t row_head0 = m * a.num_hq + h0;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= ng) break;  // uniform over the block
#pragma unroll
    for (int j = 0; j < kPPL; ++j) {
      const int pk = tl + j * kTG;
      if (pk < num_packs)
#pragma unroll
        for (int v = 0; v < kVec; ++v) reduce[tg * head_dim + pk * kVec + v] = acc[g][j][v];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += kThreadsPA) {
      float total = 0.0f;
      for (int i = 0; i < kGroups; ++i) total += reduce[i * head_dim + d];
      if (direct)
        out[(row_head0 + g) * head_dim + d] = from_f32<T>(__fdiv_rn(total, row_sum[g]));
      else
        a.partial_out[((row_head0 + g) * a.max_parts + part) * head_dim + d] = total;
    }
    if (!direct && threadIdx.x == 0) {
      float* ml = a.partial_ml + ((row_head0 + g) * a.max_parts + part) * 2;
      ml[0] = row_max[g], ml[1] = row_sum[g];
    }
    __syncthreads();
  }
}

// out[m, h] from the row's partitions, in partition order: with maxima m_p and sums l_p,
// w_p = 2^(m_p - max_p m_p), out = sum_p w_p o_p / sum_p w_p l_p. A one-partition row takes
// o_0 / l_0, exactly what the partition kernel writes when it writes out directly.
template <class T>
__global__ void __launch_bounds__(kThreadsPA) paged_attention_combine_kernel(PagedArgs a) {
  extern __shared__ float weight[];  // (max_parts)
  __shared__ float total_sum;
  const int64_t m = blockIdx.x;
  const int h = blockIdx.y;
  const int head_dim = a.head_dim;
  T* out = static_cast<T*>(a.out) + (m * a.num_hq + h) * head_dim;
  bool bad = false;
  const int context = row_context(a, m, &bad);
  if (context == 0 || bad) {
    const float v = context == 0 ? 0.0f : __int_as_float(0x7fc00000);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out[d] = from_f32<T>(v);
    return;
  }
  const int num_parts = (context + kPart - 1) / kPart;
  const int64_t base = (m * a.num_hq + h) * a.max_parts;
  const float* ml = a.partial_ml + base * 2;
  const float* po = a.partial_out + base * head_dim;
  if (num_parts == 1) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
      out[d] = from_f32<T>(__fdiv_rn(po[d], ml[1]));
    return;
  }
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int p = 0; p < num_parts; ++p) mx = fmaxf(mx, ml[2 * p]);
    float sum = 0.0f;
    for (int p = 0; p < num_parts; ++p) {
      weight[p] = exp2f(ml[2 * p] - mx);
      sum = __fmaf_rn(weight[p], ml[2 * p + 1], sum);
    }
    total_sum = sum;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
    for (int p = 0; p < num_parts; ++p) o = __fmaf_rn(weight[p], po[int64_t(p) * head_dim + d], o);
    out[d] = from_f32<T>(__fdiv_rn(o, total_sum));
  }
}

template <class T, int kVec, int kTG>
void launch_partitions(const PagedArgs& a, int64_t num_m, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.max_parts),
                  static_cast<unsigned>(a.num_hkv * a.head_chunks), static_cast<unsigned>(num_m));
  paged_attention_kernel<T, kVec, kTG><<<grid, kThreadsPA, 0, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH();
}

// 16-byte packs when D and every pointer allow, the fewest lanes per token (>= 4) that cover a
// key row with kLaneElems elements each; else element by element with 32 lanes per token.
template <class T>
void launch_partitions(const PagedArgs& a, int64_t num_m, bool packed, cudaStream_t stream) {
  constexpr int kVec = kVecWidth<T>;
  if (!packed) return launch_partitions<T, 1, 32>(a, num_m, stream);
  const int lanes = (a.head_dim / kVec + kLaneElems / kVec - 1) / (kLaneElems / kVec);
  if (lanes <= 4) return launch_partitions<T, kVec, 4>(a, num_m, stream);
  if (lanes <= 8) return launch_partitions<T, kVec, 8>(a, num_m, stream);
  if (lanes <= 16) return launch_partitions<T, kVec, 16>(a, num_m, stream);
  launch_partitions<T, kVec, 32>(a, num_m, stream);
}

}  // namespace

void paged_attention_forward(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                             Tensor block_tables, Tensor seq, Tensor pos, float scale,
                             int max_context, Tensor scratch, ops::Stream stream) {
  constexpr const char* kOp = "paged_attention_forward";
  expect_compute_dtype(q, kOp, "q");
  TS_CHECK(q.ndim() == 3, "{}: q must be (M,Hq,D), got {}", kOp, q.str());
  expect_tensor(out, q.dtype, q.shape, kOp, "out");
  TS_CHECK(!overlaps(out, q), "{}: out overlaps q", kOp);
  expect_cuda(k_cache, "paged_attention_forward: k_cache");
  TS_CHECK(k_cache.ndim() == 4 && k_cache.dim(3) == q.dim(2),
           "{}: k_cache must be (NB,BS,Hkv,{}), got {}", kOp, q.dim(2), k_cache.str());
  expect_tensor(k_cache, q.dtype, k_cache.shape, kOp, "k_cache");
  expect_tensor(v_cache, q.dtype, k_cache.shape, kOp, "v_cache");
  const int64_t num_m = q.dim(0), num_hq = q.dim(1), head_dim = q.dim(2);
  const int64_t num_hkv = k_cache.dim(2);
  TS_CHECK(num_hkv >= 1 && num_hq % num_hkv == 0, "{}: Hq = {} is not a multiple of Hkv = {}", kOp,
           num_hq, num_hkv);
  TS_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "{}: head dim {} is outside [1, {}] on cuda",
           kOp, head_dim, kMaxHeadDim);
  TS_CHECK(block_tables.ndim() == 2, "{}: block_tables must be (S,MB), got {}", kOp,
           block_tables.str());
  expect_tensor(block_tables, DType::i32, block_tables.shape, kOp, "block_tables");
  expect_tensor(seq, DType::i32, {num_m}, kOp, "seq");
  expect_tensor(pos, DType::i32, {num_m}, kOp, "pos");
  TS_CHECK(max_context >= 1, "{}: max_context = {} must be positive", kOp, max_context);
  TS_CHECK(num_m <= 65535 && k_cache.dim(0) < (int64_t(1) << 31) &&
               k_cache.dim(1) < (int64_t(1) << 31) && block_tables.dim(0) < (int64_t(1) << 31) &&
               block_tables.dim(1) < (int64_t(1) << 31),
           "{}: shapes too large for one launch", kOp);
  if (num_m == 0 || num_hq == 0) return;

  PagedArgs a{};
  a.q = q.data, a.k_cache = k_cache.data, a.v_cache = v_cache.data, a.out = out.data;
  a.tables = static_cast<const int32_t*>(block_tables.data);
  a.seq = static_cast<const int32_t*>(seq.data);
  a.pos = static_cast<const int32_t*>(pos.data);
  a.num_hq = int(num_hq), a.num_hkv = int(num_hkv), a.head_dim = int(head_dim);
  a.block_size = int(k_cache.dim(1)), a.num_blocks = int(k_cache.dim(0));
  a.num_seq = int(block_tables.dim(0)), a.max_blocks = int(block_tables.dim(1));
  a.max_context = max_context;
  a.max_parts = (max_context + kPart - 1) / kPart;
  const int64_t group = num_hq / num_hkv;
  a.head_chunks = int((group + kMaxGroup - 1) / kMaxGroup);
  a.scale_log2 = scale * 1.4426950408889634f;
  const int64_t need = ops::paged_attention_scratch_bytes(num_m, num_hq, head_dim, max_context);
  if (need > 0) {
    expect_cuda(scratch, "paged_attention_forward: scratch");
    TS_CHECK(int64_t(scratch.nbytes()) >= need && is_aligned(scratch.data, sizeof(float)),
             "{}: scratch {} holds fewer than the {} bytes needed (or is not 4-byte aligned)", kOp,
             scratch.str(), need);
    a.partial_out = static_cast<float*>(scratch.data);
    a.partial_ml = a.partial_out + num_m * num_hq * a.max_parts * head_dim;
  }
  const cudaStream_t s = cuda_stream(stream);
  dispatch_float(q, kOp, [&]<class T>() {
    const bool packed = head_dim % kVecWidth<T> == 0 && is_aligned(q.data) &&
                        is_aligned(k_cache.data) && is_aligned(v_cache.data) &&
                        is_aligned(out.data);
    launch_partitions<T>(a, num_m, packed, s);
    if (need > 0) {
      const size_t smem = size_t(a.max_parts) * sizeof(float);
      TS_CHECK(smem <= 48 * 1024, "{}: max_context {} too long for one combine", kOp, max_context);
      paged_attention_combine_kernel<T>
          <<<dim3(static_cast<unsigned>(num_m), static_cast<unsigned>(num_hq)), kThreadsPA, smem,
             s>>>(a);
      TS_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace tessera::cuda
