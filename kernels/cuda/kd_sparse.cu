// CUDA sparse (top-K) knowledge distillation: T^2 KL between the K + 1 buckets (the teacher's
// top-K ids and the tail) of a teacher given by its top-K and of the student's tempered softmax
// (kernels/ops.h), forward or reverse KL, one block per row. The student's tail sum is taken over
// the tail columns themselves: each chunk of a row marks the row's ids in a shared-memory bitmask.
// The forward reads the row once (online max and two sums in f32); the backward writes dstudent
// in one pass (in place if asked), then overwrites the id columns with gradients computed from
// the logits before the pass. Shard pieces as in kd_loss.cu; all reductions in a fixed order.
//
// A one-column vocabulary (K = vocab_size = 1) gives exactly KL = 0, as the CPU reference does.
// The student's tempered logit us = z inv_t is rounded once, with an explicit __fmul_rn (never
// contracted), everywhere: in the row's max m, in the exponents us - m (explicit __fsub_rn) and
// at the ids. The max column then has us - m = 0 (2^0 = 1), the one-column row has lse_s =
// m + log 1 = us and log qs = us - lse_s = 0; the teacher's log pt = ut - lse_t is 0 likewise
// where lse_t comes from topk_logits (its lse of one column is the same product). The online
// statistics are kept in natural units for this: a max in the log2 domain, a = z log2(e) / T,
// gave lse_s = a_max ln(2) + log(sum), which is not the id's us (off by ~1e-7 |us|), and an
// exponent contracted to fma(z, s, -max) left the product's rounding error instead of 0.
// Shape letters: N rows, V padded vocabulary width (>= vocab_size), Vl shard width, K ids per row.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/softmax_rows.cuh"

namespace tessera::cuda {

namespace {

// Threads per row (one block per row): 512 for wide rows; 128 for rows of at most kNarrowWidth
// columns, where 512 threads would hold one pack each and the block's barriers and its row
// constants would set the pace (a 4096-column bf16 row: 112 us for 8192 rows with 512, H100).
constexpr int kRowThreads = 512;
constexpr int kNarrowRowThreads = 128;
constexpr int64_t kNarrowWidth = 8192;
constexpr int kWarps = kRowThreads / 32;
// Columns whose id marks one bitmask holds (one word per thread); longer rows are walked in
// chunks of this many columns, the mask rebuilt for each.
template <int kThreads>
constexpr int kMaskColumns = 32 * kThreads;
// The most ids per row: the backward keeps one float per id in shared memory (32 KiB).
constexpr int kMaxSparseK = 8192;
// The floor of log qs_tail (kernels/ops.h): log(2^-126).
constexpr float kLogTailFloor = -87.33654475f;

// ---- the bitmask of a row's ids -----------------------------------------------------------------

// Marks, in mask, the ids of a row that fall in the shard's columns [begin, end) (local columns,
// the shard starting at global column vocab_start). All threads of the block must call it; the
// mask is complete on return. Ids outside the window (other shards, or bad ids) are skipped.
template <int kThreads>
__device__ __forceinline__ void mark_chunk(uint32_t* mask, const int32_t* ids, int k,
                                           int64_t vocab_start, int begin, int end) {
  __syncthreads();  // the previous chunk's readers are done with mask
  mask[threadIdx.x] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t c = int64_t(ids[i]) - vocab_start - begin;
    if (c >= 0 && c < end - begin) atomicOr(&mask[c / 32], 1u << (c % 32));
  }
  __syncthreads();
}

__device__ __forceinline__ bool is_marked(const uint32_t* mask, int c) {
  return (mask[c / 32] >> (c % 32)) & 1u;
}

// Walks the local columns [begin, end) of one row: f(c, x) gets kN consecutive columns starting
// at local column c, as stored: 16-byte packs in the body, scalars in the head and tail.
template <int kThreads, class T, class F>
__device__ __forceinline__ void for_each_column(const T* row, int begin, int end, F&& f) {
  constexpr int kVec = kVecWidth<T>;
  const T* first = row + begin;
  const int count = end - begin;
  const int head = head_elems(first, count);
  const int num_packs = (count - head) / kVec;
  for (int c = threadIdx.x; c < head; c += kThreads) {
    const T x[1] = {first[c]};
    f(begin + c, x);
  }
  for_each_pack<kThreads, 1>(
      num_packs, [&](int64_t c, const T(&x)[kVec]) { f(begin + head + int(c), x); }, first + head);
  for (int c = head + num_packs * kVec + threadIdx.x; c < count; c += kThreads) {
    const T x[1] = {first[c]};
    f(begin + c, x);
  }
}

// Runs walk(begin, end) for the chunks of a row's num_real real columns, with mask holding the
// chunk's ids. All threads of the block must call it.
template <int kThreads, class F>
__device__ __forceinline__ void for_each_chunk(uint32_t* mask, const int32_t* ids, int k,
                                               int64_t vocab_start, int num_real, F&& walk) {
  for (int begin = 0; begin < num_real; begin += kMaskColumns<kThreads>) {
    const int end = min(num_real, begin + kMaskColumns<kThreads>);
    mark_chunk<kThreads>(mask, ids, k, vocab_start, begin, end);
    walk(begin, end);
  }
}

// ---- one row's loss from its statistics
// -----------------------------------------------------------

// The buckets' log-probabilities of one row: the student's lse_s and floored log qs_tail, the
// teacher's lse_t and log pt_tail; tail_empty when teacher_lse[1] = -inf. Formed and used in
// f64, as the CPU reference does: the KL's terms are differences of lse-sized values that
// cancel, and in f32 the reverse KL at T 4 over 50k columns came 2.1e-5 from the CPU's.
struct SparseRow {
  double lse_s, log_qs_tail, lse_t, log_pt_tail;
  bool tail_empty;
};

// m: the row's max of us (natural units); sum_all, sum_tail: sums of exp(us - m).
__device__ __forceinline__ SparseRow make_row(float m, float sum_all, float sum_tail, float lse_t,
                                              float tail_lse_t) {
  SparseRow r;
  r.lse_s = double(m) + log(double(sum_all));
  r.tail_empty = tail_lse_t == -INFINITY;
  // A NaN sum stays NaN (the comparison is false); an underflowed one (log 0 = -inf) is floored.
  const double log_tail = log(double(sum_tail)) - log(double(sum_all));
  r.log_qs_tail = r.tail_empty               ? -INFINITY
                  : log_tail < kLogTailFloor ? double(kLogTailFloor)
                                             : log_tail;
  r.lse_t = lse_t;
  r.log_pt_tail = r.tail_empty ? -INFINITY : double(tail_lse_t) - double(lse_t);
  return r;
}

// p (log p - log q) with 0 log 0 = 0.
__device__ __forceinline__ double kl_term(double log_p, double log_q) {
  const double p = exp(log_p);
  return p == 0.0 ? 0.0 : p * (log_p - log_q);
}

// The KL term of id i: us the tempered student logit at the id, ut = zt / T the teacher's.
__device__ __forceinline__ float id_term(const SparseRow& r, float us, float ut, bool reverse) {
  const double log_q = double(us) - r.lse_s, log_p = double(ut) - r.lse_t;
  return float(reverse ? kl_term(log_q, log_p) : kl_term(log_p, log_q));
}

__device__ __forceinline__ float tail_term(const SparseRow& r, bool reverse) {
  if (r.tail_empty) return 0.0f;
  return float(reverse ? kl_term(r.log_qs_tail, r.log_pt_tail)
                       : kl_term(r.log_pt_tail, r.log_qs_tail));
}

__device__ __forceinline__ void store_row(float* losses, float* stats, int64_t row,
                                          int64_t num_rows, const SparseRow& r, float kl,
                                          bool ignored, float temperature) {
  stats[row] = float(r.lse_s);
  stats[num_rows + row] = float(r.log_qs_tail);
  stats[2 * num_rows + row] = kl;
  losses[row] = ignored ? 0.0f : temperature * temperature * kl;
}

// ---- the unsharded forward --------------------------------------------------------------------

// Running statistics of a row in natural units, u = z / T: the max of u and the sums of
// exp(u - max) over all columns and over the tail columns (u rounded once: file comment).
struct SparseOnline {
  float m = -INFINITY, all = 0.0f, tail = 0.0f;

  // kN more columns starting at local column c of the current chunk (mask: its ids). The max of
  // the raw logits times inv_t is the largest of the products (rounding is monotonic).
  template <class T, int kN>
  __device__ __forceinline__ void add(const T (&z)[kN], int c, const uint32_t* mask, float inv_t) {
    float pack_max = to_f32(z[0]);
#pragma unroll
    for (int j = 1; j < kN; ++j) pack_max = fmaxf(pack_max, to_f32(z[j]));
    const float nm = fmaxf(m, __fmul_rn(pack_max, inv_t));
    // While every value so far is -inf the base is 0, so each term is 2^-inf = 0, not NaN.
    const float base = nm == -INFINITY ? 0.0f : nm;
    float sum_all = 0.0f, sum_tail = 0.0f;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const float e = fast_exp2(__fsub_rn(__fmul_rn(to_f32(z[j]), inv_t), base) * kLog2e);
      sum_all += e;
      if (!is_marked(mask, c + j)) sum_tail += e;
    }
    const float r = fast_exp2((m - base) * kLog2e);
    all = fmaf(all, r, sum_all);
    tail = fmaf(tail, r, sum_tail);
    m = nm;
  }

  __device__ __forceinline__ void merge(const SparseOnline& o) {
    const float nm = fmaxf(m, o.m);
    const float base = nm == -INFINITY ? 0.0f : nm;
    const float r = fast_exp2((m - base) * kLog2e), ro = fast_exp2((o.m - base) * kLog2e);
    all = fmaf(all, r, o.all * ro);
    tail = fmaf(tail, r, o.tail * ro);
    m = nm;
  }

  __device__ __forceinline__ SparseOnline shfl_xor(int offset) const {
    SparseOnline o;
    o.m = __shfl_xor_sync(0xffffffffu, m, offset);
    o.all = __shfl_xor_sync(0xffffffffu, all, offset);
    o.tail = __shfl_xor_sync(0xffffffffu, tail, offset);
    return o;
  }
};

// One block per row: online statistics per thread over the chunks of the row, merged in a fixed
// order (butterfly in each warp, then warp order), then the K ids' terms summed across the block.
template <class T, bool kReverse, int kThreads>
__global__ void __launch_bounds__(kThreads)
    kd_sparse_forward_kernel(float* losses, float* stats, const T* student,
                             const float* topk_logits, const int32_t* topk_ids,
                             const float* teacher_lse, const int32_t* targets, int64_t num_rows,
                             int64_t width, int vocab_size, int k, float temperature) {
  constexpr int kBlockWarps = kThreads / 32;
  __shared__ uint32_t mask[kThreads];
  __shared__ float smem[3][kBlockWarps];
  __shared__ float row_stats[3];
  const int64_t row = blockIdx.x;
  const T* zs = student + row * width;
  const int32_t* ids = topk_ids + row * k;
  const float inv_t = 1.0f / temperature;
  SparseOnline acc;
  for_each_chunk<kThreads>(mask, ids, k, 0, vocab_size, [&](int begin, int end) {
    for_each_column<kThreads>(zs, begin, end, [&]<int kN>(int c, const T(&z)[kN]) {
      acc.add(z, c - begin, mask, inv_t);
    });
  });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc.merge(acc.shfl_xor(offset));
  if (threadIdx.x % 32 == 0) {
    smem[0][threadIdx.x / 32] = acc.m;
    smem[1][threadIdx.x / 32] = acc.all;
    smem[2][threadIdx.x / 32] = acc.tail;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    SparseOnline total;
    for (int w = 0; w < kBlockWarps; ++w) {
      SparseOnline warp;
      warp.m = smem[0][w];
      warp.all = smem[1][w];
      warp.tail = smem[2][w];
      total.merge(warp);
    }
    row_stats[0] = total.m;
    row_stats[1] = total.all;
    row_stats[2] = total.tail;
  }
  __syncthreads();
  const SparseRow r = make_row(row_stats[0], row_stats[1], row_stats[2], teacher_lse[row],
                               teacher_lse[num_rows + row]);
  float term[1] = {0.0f};
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int32_t id = ids[i];
    if (id < 0 || id >= vocab_size) continue;  // a broken precondition: never read out of bounds
    term[0] += id_term(r, __fmul_rn(to_f32(zs[id]), inv_t),
                       __fmul_rn(topk_logits[row * k + i], inv_t), kReverse);
  }
  __shared__ float term_smem[kBlockWarps];
  row_sum<kThreads, 1>(term, term_smem);
  if (threadIdx.x == 0) {
    store_row(losses, stats, row, num_rows, r, term[0] + tail_term(r, kReverse), targets[row] < 0,
              temperature);
  }
}

// ---- the backward ---------------------------------------------------------------------------

// d loss / d zs (ops.h), times dloss, for a tail column (tail) and for id i (id):
//   forward KL: T (qs - pt_i);  T qs (1 - pt_tail / qs_tail), the ratio as exp of a log ratio;
//   reverse KL: T qs ((log qs - log pt) - KL), log pt = log pt_tail at a tail column.
// As in kd_loss.cu, the reverse brackets are formed in f64, as the CPU reference does: the
// bracket at an id, (zs - zt) / T - (lse_s - lse_t + KL), is a small difference of lse-sized
// values where qs is large, and the tail's, (log qs_tail - log pt_tail) - KL, one per row, can
// cancel too (f32 left ~2^-24 |lse| absolute in each term). The per-row constants (the shift,
// the tail bracket, the forward log ratio) are formed in f64 from the f32 statistics and rounded
// once. log qs = zs / T - lse_s is one explicit FMA; qs stays f32 (~2e-6 relative).
template <bool kReverse>
struct SparseGrad {
  float inv_t, lse_s, lse_t, scale;  // scale = dloss T
  float log_ratio;                   // forward: log(pt_tail / qs_tail); -inf with an empty tail
  float tail_bracket;                // reverse: g_tail - KL, g_tail = 0 with an empty tail
  double inv_t_f64, shift;           // reverse: 1 / T and lse_s - lse_t + KL
  __device__ __forceinline__ float tail(float zs) const {
    const float log_q = __fmaf_rn(zs, inv_t, -lse_s);
    const float q = fast_exp2(log_q * kLog2e);
    if constexpr (kReverse) return scale * q * tail_bracket;
    return scale * (q - fast_exp2((log_q + log_ratio) * kLog2e));
  }
  __device__ __forceinline__ float id(float zs, float zt) const {
    const float q = fast_exp2(__fmaf_rn(zs, inv_t, -lse_s) * kLog2e);
    if constexpr (kReverse) {
      const double bracket = __fma_rn(double(zs) - double(zt), inv_t_f64, -shift);
      return scale * q * static_cast<float>(bracket);
    }
    return scale * (q - fast_exp2(__fmaf_rn(zt, inv_t, -lse_t) * kLog2e));
  }
};

// Three phases per row: (1) the gradients of the ids in this shard, from the logits as they are,
// into shared memory; (2) every column with the tail's formula (padding: 0), each element read
// before it is written by the same thread, so dstudent may be student; (3) the id columns
// overwritten with (1). The barriers order (1) before (2) overwrites an id's logit and (2)
// before (3). Ignored rows are written with zeros without reading the logits.
template <class T, bool kReverse, int kThreads>
__global__ void __launch_bounds__(kThreads)
    kd_sparse_backward_kernel(T* dstudent, const T* student, const float* topk_logits,
                              const int32_t* topk_ids, const float* teacher_lse, const float* stats,
                              const float* losses, const int32_t* targets, int64_t num_rows,
                              int64_t width, int64_t vocab_start, int num_real, int k,
                              float temperature, float dloss) {
  extern __shared__ float id_grads[];  // k floats
  constexpr int kVec = kVecWidth<T>;
  const int64_t row = blockIdx.x;
  const T* zs = student + row * width;
  T* dzs = dstudent + row * width;
  const int32_t* ids = topk_ids + row * k;
  const int head = head_elems(dzs, width);
  const bool packs_ok = head_elems(zs, width) == head;
  const int num_packs = packs_ok ? static_cast<int>((width - head) / kVec) : 0;
  const int64_t tail_begin = packs_ok ? head + int64_t(num_packs) * kVec : 0;
  if (targets[row] < 0) {
    Pack<T, kVec> zero;
#pragma unroll
    for (int j = 0; j < kVec; ++j) zero.v[j] = from_f32<T>(0.0f);
    if (packs_ok)
      for (int c = threadIdx.x; c < head; c += kThreads) dzs[c] = from_f32<T>(0.0f);
    for (int p = threadIdx.x; p < num_packs; p += kThreads)
      store_pack<T, kVec>(dzs + head + int64_t(p) * kVec, zero);
    for (int64_t c = tail_begin + threadIdx.x; c < width; c += kThreads) dzs[c] = from_f32<T>(0.0f);
    return;
  }
  SparseGrad<kReverse> grad;
  grad.inv_t = 1.0f / temperature;
  grad.lse_s = stats[row];
  const float log_qs_tail = stats[num_rows + row];
  grad.lse_t = teacher_lse[row];
  const float tail_lse_t = teacher_lse[num_rows + row];
  const bool tail_empty = tail_lse_t == -INFINITY;
  grad.scale = dloss * temperature;
  // The per-row constants in f64 from the f32 statistics, as the CPU reference forms them.
  const double t = temperature;
  const double kl = double(losses[row]) / (t * t);
  const double log_pt_tail = double(tail_lse_t) - double(grad.lse_t);
  const double g_tail = tail_empty ? 0.0 : double(log_qs_tail) - log_pt_tail;
  grad.log_ratio = tail_empty ? -INFINITY : static_cast<float>(log_pt_tail - double(log_qs_tail));
  grad.tail_bracket = static_cast<float>(g_tail - kl);
  grad.inv_t_f64 = 1.0 / t;
  grad.shift = (double(grad.lse_s) - double(grad.lse_t)) + kl;

  // (1)
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t c = int64_t(ids[i]) - vocab_start;
    if (c >= 0 && c < num_real) id_grads[i] = grad.id(to_f32(zs[c]), topk_logits[row * k + i]);
  }
  __syncthreads();
  // (2)
  auto tail_at = [&](float x, int64_t c) { return c < num_real ? grad.tail(x) : 0.0f; };
  if (packs_ok) {
    for (int c = threadIdx.x; c < head; c += kThreads)
      dzs[c] = from_f32<T>(tail_at(to_f32(zs[c]), c));
  }
  for_each_pack<kThreads, 2>(
      num_packs,
      [&](int64_t c, const T(&x)[kVec]) {
        const int64_t c0 = head + c;
        Pack<T, kVec> out;
#pragma unroll
        for (int j = 0; j < kVec; ++j) out.v[j] = from_f32<T>(tail_at(to_f32(x[j]), c0 + j));
        store_pack<T, kVec>(dzs + c0, out);
      },
      zs + head);
  for (int64_t c = tail_begin + threadIdx.x; c < width; c += kThreads)
    dzs[c] = from_f32<T>(tail_at(to_f32(zs[c]), c));
  __syncthreads();
  // (3)
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t c = int64_t(ids[i]) - vocab_start;
    if (c >= 0 && c < num_real) dzs[c] = from_f32<T>(id_grads[i]);
  }
}

// ---- vocabulary-parallel pieces ---------------------------------------------------------------

// row_max = the max of us over the row's num_real real columns; -inf when there are none.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    kd_sparse_shard_max_kernel(float* row_max, const T* student, int64_t width, int num_real,
                               float inv_t) {
  __shared__ float smem[kWarps];
  const int64_t row = blockIdx.x;
  float m = -INFINITY;
  for_each_in_rows<kRowThreads, 2>(
      num_real,
      [&]<int kN>(const T(&z)[kN]) {
#pragma unroll
        for (int j = 0; j < kN; ++j) m = fmaxf(m, to_f32(z[j]));
      },
      student + row * width);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, smem[w]);
  row_max[row] = __fmul_rn(m, inv_t);  // the largest of the products us (file comment)
}

// sums rows 0 and 1: exp(us - m) over the real columns and over the tail columns, with the
// GLOBAL max m; rows 2 + i: us at id_i when it falls in this shard, else 0. us = z inv_t is
// rounded once, as in the forward kernel (file comment).
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    kd_sparse_shard_sums_kernel(float* sums, const T* student, const int32_t* topk_ids,
                                const float* row_max, int64_t num_rows, int64_t width,
                                int64_t vocab_start, int num_real, int k, float inv_t) {
  __shared__ uint32_t mask[kRowThreads];
  __shared__ float smem[kWarps * 2];
  const int64_t row = blockIdx.x;
  const T* zs = student + row * width;
  const int32_t* ids = topk_ids + row * k;
  const float m = row_max[row];
  float s[2] = {0.0f, 0.0f};
  for_each_chunk<kRowThreads>(mask, ids, k, vocab_start, num_real, [&](int begin, int end) {
    for_each_column<kRowThreads>(zs, begin, end, [&]<int kN>(int c, const T(&z)[kN]) {
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float e = fast_exp2(__fsub_rn(__fmul_rn(to_f32(z[j]), inv_t), m) * kLog2e);
        s[0] += e;
        if (!is_marked(mask, c - begin + j)) s[1] += e;
      }
    });
  });
  row_sum<kRowThreads, 2>(s, smem);
  if (threadIdx.x == 0) {
    sums[row] = s[0];
    sums[num_rows + row] = s[1];
  }
  for (int i = threadIdx.x; i < k; i += kRowThreads) {
    const int64_t c = int64_t(ids[i]) - vocab_start;
    sums[(2 + int64_t(i)) * num_rows + row] =
        c >= 0 && c < num_real ? __fmul_rn(to_f32(zs[c]), inv_t) : 0.0f;
  }
}

// One warp per row: the K ids' terms over the lanes, a butterfly sum, lane 0 writes.
constexpr int kFinishRowsPerBlock = kBlock / 32;
template <bool kReverse>
__global__ void __launch_bounds__(kBlock)
    kd_sparse_shard_finish_kernel(float* losses, float* stats, const float* row_max,
                                  const float* sums, const float* topk_logits,
                                  const float* teacher_lse, const int32_t* targets,
                                  int64_t num_rows, int k, float temperature) {
  const int64_t row = int64_t(blockIdx.x) * kFinishRowsPerBlock + threadIdx.x / 32;
  if (row >= num_rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const SparseRow r = make_row(row_max[row], sums[row], sums[num_rows + row], teacher_lse[row],
                               teacher_lse[num_rows + row]);
  const float inv_t = 1.0f / temperature;
  float term = 0.0f;
  for (int i = lane; i < k; i += 32)
    term += id_term(r, sums[(2 + int64_t(i)) * num_rows + row],
                    __fmul_rn(topk_logits[row * k + i], inv_t), kReverse);
  term = warp_sum(term);
  if (lane == 0)
    store_row(losses, stats, row, num_rows, r, term + tail_term(r, kReverse), targets[row] < 0,
              temperature);
}

// ---- launchers ------------------------------------------------------------------------------

void check_temperature(float temperature, const char* op) {
  TS_CHECK(std::isfinite(temperature) && temperature > 0.0f,
           "{}: temperature = {} must be positive and finite", op, temperature);
}

// Checks the student logits (N, V) (f32, bf16 or f16), the vocabulary size and the temperature;
// returns N. A shard (sharded = true) cannot check vocab_size against its width.
int64_t check_student(const Tensor& student, int vocab_size, int64_t vocab_start, bool sharded,
                      float temperature, const char* op) {
  expect_compute_dtype(student, op, "student");
  TS_CHECK(student.ndim() == 2, "{}: student must be (N, V), got {}", op, student.str());
  const int64_t num_rows = student.dim(0), width = student.dim(1);
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= width),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, width);
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  TS_CHECK(num_rows < (int64_t(1) << 31), "{}: N = {} rows is too many for one launch", op,
           num_rows);
  TS_CHECK(width < (int64_t(1) << 31), "{}: V = {} columns is too many for one row", op, width);
  check_temperature(temperature, op);
  return num_rows;
}

// topk_ids (N, K) i32 with 1 <= K <= min(vocab_size, kMaxSparseK); returns K. The ids' values
// stay on the device (the CPU reference checks them).
int check_ids(const Tensor& topk_ids, int64_t num_rows, int vocab_size, const char* op) {
  TS_CHECK(!topk_ids.empty() && topk_ids.ndim() == 2 && topk_ids.dim(0) == num_rows,
           "{}: topk_ids must be (N = {}, K), got {}", op, num_rows, topk_ids.str());
  const int64_t k = topk_ids.dim(1);
  TS_CHECK(k >= 1 && k <= vocab_size, "{}: K = {} outside [1, vocab_size = {}]", op, k, vocab_size);
  TS_CHECK(k <= kMaxSparseK, "{}: K = {} ids per row; the CUDA kernels take at most {}", op, k,
           kMaxSparseK);
  expect_tensor(topk_ids, DType::i32, Shape{num_rows, k}, op, "topk_ids");
  return static_cast<int>(k);
}

// Runs f.template operator()<kReverse>() with the compile-time reverse flag.
template <class F>
void dispatch_reverse(bool reverse, F&& f) {
  if (reverse)
    f.template operator()<true>();
  else
    f.template operator()<false>();
}

// Runs f.template operator()<kThreads>() with the row's thread count (kRowThreads above).
template <class F>
void dispatch_row_threads(int64_t width, F&& f) {
  if (width <= kNarrowWidth)
    f.template operator()<kNarrowRowThreads>();
  else
    f.template operator()<kRowThreads>();
}

template <class T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.data);
}

}  // namespace

void kd_sparse_forward(Tensor losses, Tensor stats, Tensor student, Tensor topk_logits,
                       Tensor topk_ids, Tensor teacher_lse, Tensor targets, int vocab_size,
                       float temperature, bool reverse, ops::Stream stream) {
  constexpr const char* kOp = "kd_sparse_forward";
  const int64_t num_rows = check_student(student, vocab_size, 0, false, temperature, kOp);
  const int k = check_ids(topk_ids, num_rows, vocab_size, kOp);
  expect_tensor(topk_logits, DType::f32, Shape{num_rows, k}, kOp, "topk_logits");
  expect_tensor(teacher_lse, DType::f32, Shape{2, num_rows}, kOp, "teacher_lse");
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(stats, DType::f32, Shape{3, num_rows}, kOp, "stats");
  TS_CHECK(!overlaps(losses, stats), "{}: losses and stats overlap", kOp);
  for (const Tensor* out : {&losses, &stats})
    for (const Tensor* in : {&student, &topk_logits, &topk_ids, &teacher_lse, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and stats must not alias an input", kOp);
  if (num_rows == 0) return;
  dispatch_float(student, kOp, [&]<class T>() {
    dispatch_reverse(reverse, [&]<bool kReverse>() {
      dispatch_row_threads(student.dim(1), [&]<int kThreads>() {
        kd_sparse_forward_kernel<T, kReverse, kThreads>
            <<<num_rows, kThreads, 0, cuda_stream(stream)>>>(
                static_cast<float*>(losses.data), static_cast<float*>(stats.data), cptr<T>(student),
                cptr<float>(topk_logits), cptr<int32_t>(topk_ids), cptr<float>(teacher_lse),
                cptr<int32_t>(targets), num_rows, student.dim(1), vocab_size, k, temperature);
        TS_CUDA_CHECK_LAUNCH();
      });
    });
  });
}

void kd_sparse_backward(Tensor dstudent, Tensor student, Tensor topk_logits, Tensor topk_ids,
                        Tensor teacher_lse, Tensor stats, Tensor losses, Tensor targets,
                        int vocab_size, float temperature, bool reverse, float dloss,
                        int64_t vocab_start, ops::Stream stream) {
  constexpr const char* kOp = "kd_sparse_backward";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, temperature, kOp);
  const int k = check_ids(topk_ids, num_rows, vocab_size, kOp);
  expect_tensor(topk_logits, DType::f32, Shape{num_rows, k}, kOp, "topk_logits");
  expect_tensor(teacher_lse, DType::f32, Shape{2, num_rows}, kOp, "teacher_lse");
  expect_tensor(stats, DType::f32, Shape{3, num_rows}, kOp, "stats");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  expect_tensor(dstudent, student.dtype, student.shape, kOp, "dstudent");
  TS_CHECK(!overlaps(dstudent, student) || dstudent.data == student.data,
           "{}: dstudent partially overlaps student; only exact aliasing (in place) is supported",
           kOp);
  for (const Tensor* in : {&topk_logits, &topk_ids, &teacher_lse, &stats, &losses, &targets})
    TS_CHECK(!overlaps(dstudent, *in),
             "{}: dstudent overlaps a teacher input, stats, losses or targets (only student may "
             "alias it)",
             kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  const size_t smem_bytes = size_t(k) * sizeof(float);  // <= 32 KiB: no opt-in needed
  dispatch_float(student, kOp, [&]<class T>() {
    dispatch_reverse(reverse, [&]<bool kReverse>() {
      dispatch_row_threads(width, [&]<int kThreads>() {
        kd_sparse_backward_kernel<T, kReverse, kThreads>
            <<<num_rows, kThreads, smem_bytes, cuda_stream(stream)>>>(
                static_cast<T*>(dstudent.data), cptr<T>(student), cptr<float>(topk_logits),
                cptr<int32_t>(topk_ids), cptr<float>(teacher_lse), cptr<float>(stats),
                cptr<float>(losses), cptr<int32_t>(targets), num_rows, width, vocab_start,
                num_real_columns(vocab_start, width, vocab_size), k, temperature, dloss);
        TS_CUDA_CHECK_LAUNCH();
      });
    });
  });
}

void kd_sparse_shard_max(Tensor row_max, Tensor student, int64_t vocab_start, int vocab_size,
                         float temperature, ops::Stream stream) {
  constexpr const char* kOp = "kd_sparse_shard_max";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, temperature, kOp);
  expect_tensor(row_max, DType::f32, Shape{num_rows}, kOp, "row_max");
  TS_CHECK(!overlaps(row_max, student), "{}: row_max must not alias student", kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  dispatch_float(student, kOp, [&]<class T>() {
    kd_sparse_shard_max_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(row_max.data), cptr<T>(student), width,
        num_real_columns(vocab_start, width, vocab_size), 1.0f / temperature);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void kd_sparse_shard_sums(Tensor sums, Tensor student, Tensor topk_ids, Tensor row_max,
                          int64_t vocab_start, int vocab_size, float temperature,
                          ops::Stream stream) {
  constexpr const char* kOp = "kd_sparse_shard_sums";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, temperature, kOp);
  const int k = check_ids(topk_ids, num_rows, vocab_size, kOp);
  expect_tensor(row_max, DType::f32, Shape{num_rows}, kOp, "row_max");
  expect_tensor(sums, DType::f32, Shape{2 + int64_t(k), num_rows}, kOp, "sums");
  for (const Tensor* in : {&student, &topk_ids, &row_max})
    TS_CHECK(!overlaps(sums, *in), "{}: sums must not alias an input", kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  dispatch_float(student, kOp, [&]<class T>() {
    kd_sparse_shard_sums_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(sums.data), cptr<T>(student), cptr<int32_t>(topk_ids),
        cptr<float>(row_max), num_rows, width, vocab_start,
        num_real_columns(vocab_start, width, vocab_size), k, 1.0f / temperature);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void kd_sparse_shard_finish(Tensor losses, Tensor stats, Tensor row_max, Tensor sums,
                            Tensor topk_logits, Tensor teacher_lse, Tensor targets,
                            float temperature, bool reverse, ops::Stream stream) {
  constexpr const char* kOp = "kd_sparse_shard_finish";
  check_temperature(temperature, kOp);
  TS_CHECK(!row_max.empty() && row_max.ndim() == 1, "{}: row_max must be (N), got {}", kOp,
           row_max.str());
  const int64_t num_rows = row_max.dim(0);
  TS_CHECK(!topk_logits.empty() && topk_logits.ndim() == 2 && topk_logits.dim(0) == num_rows &&
               topk_logits.dim(1) >= 1 && topk_logits.dim(1) <= kMaxSparseK,
           "{}: topk_logits must be (N = {}, K) with 1 <= K <= {}, got {}", kOp, num_rows,
           kMaxSparseK, topk_logits.str());
  const int64_t k = topk_logits.dim(1);
  expect_tensor(row_max, DType::f32, Shape{num_rows}, kOp, "row_max");
  expect_tensor(sums, DType::f32, Shape{2 + k, num_rows}, kOp, "sums");
  expect_tensor(topk_logits, DType::f32, Shape{num_rows, k}, kOp, "topk_logits");
  expect_tensor(teacher_lse, DType::f32, Shape{2, num_rows}, kOp, "teacher_lse");
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(stats, DType::f32, Shape{3, num_rows}, kOp, "stats");
  for (const Tensor* out : {&losses, &stats})
    for (const Tensor* in : {&row_max, &sums, &topk_logits, &teacher_lse, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and stats must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, stats), "{}: losses and stats overlap", kOp);
  if (num_rows == 0) return;
  dispatch_reverse(reverse, [&]<bool kReverse>() {
    kd_sparse_shard_finish_kernel<kReverse>
        <<<ceil_div(num_rows, kFinishRowsPerBlock), kBlock, 0, cuda_stream(stream)>>>(
            static_cast<float*>(losses.data), static_cast<float*>(stats.data), cptr<float>(row_max),
            cptr<float>(sums), cptr<float>(topk_logits), cptr<float>(teacher_lse),
            cptr<int32_t>(targets), num_rows, static_cast<int>(k), temperature);
    TS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tessera::cuda
