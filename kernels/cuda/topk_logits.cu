// CUDA per-row top-K of logits with tempered log-sum-exps (the distillation teacher cache), one
// block per row: a radix select over 64-bit keys (the value's order bits, then the complemented
// id, so every key is distinct and ties go to the lower id) finds the K + 1 largest, a bitonic
// sort in shared memory orders them, and one more pass sums the exponentials of every temperature
// over the row and over its tail. Integer counts and a total order make the ids exact and
// deterministic; the sums combine in a fixed order. Not here: the loss on the cache (kd_sparse.cu).
// Shape letters: N rows, V padded vocabulary width (>= vocab_size), K entries kept, nT
// temperatures.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/softmax_rows.cuh"

namespace tessera::cuda {

namespace {

constexpr int kTopKThreads = 512;  // threads per row (one block per row)
constexpr int kMaxTopK = 1024;     // the CUDA limit on K (ops.h)
// Sorted entries: a power of two >= kMaxTopK + 1 (the tail's first entry rides along).
constexpr int kSortSlots = 2048;
constexpr int kMaxTemperatures = 16;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
static_assert(kSortSlots >= kMaxTopK + 1, "the K + 1 selected keys fit the sort buffer");
static_assert(kRadixBins <= kTopKThreads, "one histogram bin per thread to clear");

// 1 / t for each temperature, passed by value to the kernel.
struct Temperatures {
  float inv[kMaxTemperatures];
  int count;
};

// The value's place in the contract's order as an unsigned integer: larger means earlier. NaN
// (any sign or payload) ranks above +inf; -0 and +0 tie.
__device__ __forceinline__ uint32_t value_order(float v) {
  uint32_t u = __float_as_uint(v);
  if (v != v) u = 0x7fc00000u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Distinct per column: value order, then the lower id first. Never 0 (the low half is at least
// 2^31 for an id < 2^31), so 0 pads the sort.
__device__ __forceinline__ uint64_t column_key(float v, int c) {
  return (uint64_t(value_order(v)) << 32) | uint64_t(~uint32_t(c));
}
__device__ __forceinline__ int key_column(uint64_t key) { return int(~uint32_t(key)); }

// The radix select's state: the keys whose bits under `mask` equal `prefix` are the candidates;
// `need` of them still belong to the selection; every key whose masked bits exceed prefix is in.
struct Selection {
  uint64_t prefix, mask;
  uint32_t need;
  bool done;
};

template <class T>
__global__ void __launch_bounds__(kTopKThreads)
    topk_logits_kernel(float* values, int32_t* ids, float* lse, const T* logits, int64_t num_rows,
                       int64_t width, int vocab_size, int k, Temperatures temps) {
  __shared__ uint32_t hist[kRadixBins];
  __shared__ uint64_t slots[kSortSlots];
  __shared__ Selection shared_sel;
  __shared__ int num_selected;
  __shared__ float smem[(kTopKThreads / 32) * 2 * kMaxTemperatures];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * width;
  const int lane = threadIdx.x % 32;
  const int num_keep = min(k + 1, vocab_size);  // K, and the tail's first entry if there is one

  // ---- radix select: 8 bits of the key per pass, from the top; stops as soon as the candidates
  // are exactly the ones still needed (no ties left to break) ----
  Selection sel{0, 0, uint32_t(num_keep), false};
  for (int shift = 64 - kRadixBits; shift >= 0 && !sel.done; shift -= kRadixBits) {
    if (threadIdx.x < kRadixBins) hist[threadIdx.x] = 0u;
    __syncthreads();
    for (int base = 0; base < vocab_size; base += kTopKThreads) {  // uniform trip count
      const int c = base + threadIdx.x;
      bool match = false;
      uint32_t digit = 0xffffffffu;
      if (c < vocab_size) {
        const uint64_t key = column_key(to_f32(z[c]), c);
        match = (key & sel.mask) == sel.prefix;
        if (match) digit = uint32_t(key >> shift) & (kRadixBins - 1);
      }
      // One shared-memory atomic per distinct digit of the warp, not per lane.
      const uint32_t peers = __match_any_sync(0xffffffffu, digit);
      if (match && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t above = 0;
      int d = kRadixBins - 1;
      for (; d > 0 && above + hist[d] < sel.need; --d) above += hist[d];
      sel.need -= above;
      sel.prefix |= uint64_t(d) << shift;
      sel.mask |= uint64_t(kRadixBins - 1) << shift;
      sel.done = hist[d] == sel.need;
      shared_sel = sel;
    }
    __syncthreads();
    sel = shared_sel;
  }

  // ---- collect the num_keep selected keys (in any order) and sort them, largest first ----
  if (threadIdx.x == 0) num_selected = 0;
  __syncthreads();
  for (int c = threadIdx.x; c < vocab_size; c += kTopKThreads) {
    const uint64_t key = column_key(to_f32(z[c]), c);
    if ((key & sel.mask) >= sel.prefix) {
      const int slot = atomicAdd(&num_selected, 1);
      if (slot < kSortSlots) slots[slot] = key;  // exactly num_keep of them; the test is a guard
    }
  }
  __syncthreads();
  int num_sort = 1;
  while (num_sort < num_keep) num_sort <<= 1;
  for (int i = num_keep + threadIdx.x; i < num_sort; i += kTopKThreads) slots[i] = 0;
  __syncthreads();
  for (int size = 2; size <= num_sort; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < num_sort; i += kTopKThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = slots[i], b = slots[j];
          if ((i & size) == 0 ? a < b : a > b) {
            slots[i] = b;
            slots[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += kTopKThreads) {
    const int c = key_column(slots[i]);
    values[row * k + i] = to_f32(z[c]);
    ids[row * k + i] = c;
  }

  // ---- the tempered log-sum-exps over the row and over its tail (keys below the K-th) ----
  const uint64_t kth = slots[k - 1];
  const float max_all = to_f32(z[key_column(slots[0])]);
  const bool has_tail = num_keep > k;
  const float max_tail = has_tail ? to_f32(z[key_column(slots[k])]) : -INFINITY;
  float acc[2 * kMaxTemperatures] = {};
  for (int c = threadIdx.x; c < vocab_size; c += kTopKThreads) {
    const float v = to_f32(z[c]);
    const bool in_tail = column_key(v, c) < kth;
#pragma unroll
    for (int t = 0; t < kMaxTemperatures; ++t) {
      if (t < temps.count) {
        const float scale = temps.inv[t] * kLog2e;
        acc[2 * t] += fast_exp2((v - max_all) * scale);
        if (in_tail) acc[2 * t + 1] += fast_exp2((v - max_tail) * scale);
      }
    }
  }
  row_sum<kTopKThreads, 2 * kMaxTemperatures>(acc, smem);
  if (threadIdx.x != 0) return;
    // Unrolled: constant indices keep acc in registers.
#pragma unroll
  for (int t = 0; t < kMaxTemperatures; ++t) {
    if (t >= temps.count) break;
    // A max of -inf means every term is 0 (and (v - max) would be NaN): the lse is -inf.
    const float all = max_all == -INFINITY ? -INFINITY : max_all * temps.inv[t] + logf(acc[2 * t]);
    const float tail = !has_tail || max_tail == -INFINITY
                           ? -INFINITY
                           : max_tail * temps.inv[t] + logf(acc[2 * t + 1]);
    lse[(2 * t) * num_rows + row] = all;
    lse[(2 * t + 1) * num_rows + row] = tail;
  }
}

}  // namespace

void topk_logits(Tensor values, Tensor ids, Tensor lse, Tensor logits, int vocab_size,
                 std::span<const float> temperatures, ops::Stream stream) {
  constexpr const char* kOp = "topk_logits";
  expect_compute_dtype(logits, kOp, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", kOp, logits.str());
  const int64_t num_rows = logits.dim(0), width = logits.dim(1);
  TS_CHECK(num_rows < (int64_t(1) << 31), "{}: N = {} rows is too many for one launch", kOp,
           num_rows);
  TS_CHECK(width < (int64_t(1) << 31), "{}: V = {} columns is too many for one row", kOp, width);
  TS_CHECK(vocab_size >= 1 && vocab_size <= width, "{}: vocab_size = {} outside [1, V = {}]", kOp,
           vocab_size, width);
  TS_CHECK(!values.empty() && values.ndim() == 2 && values.dim(0) == num_rows,
           "{}: values must be (N = {}, K), got {}", kOp, num_rows, values.str());
  const int64_t k = values.dim(1);
  TS_CHECK(k >= 1 && k <= vocab_size, "{}: K = {} outside [1, vocab_size = {}]", kOp, k,
           vocab_size);
  TS_CHECK(k <= kMaxTopK, "{}: K = {}, but the CUDA kernel keeps at most K = {} per row", kOp, k,
           kMaxTopK);
  expect_tensor(values, DType::f32, Shape{num_rows, k}, kOp, "values");
  expect_tensor(ids, DType::i32, Shape{num_rows, k}, kOp, "ids");
  const auto num_t = static_cast<int64_t>(temperatures.size());
  TS_CHECK(num_t >= 1 && num_t <= kMaxTemperatures,
           "{}: {} temperatures; the CUDA kernel takes 1 to {}", kOp, num_t, kMaxTemperatures);
  Temperatures temps{};
  temps.count = static_cast<int>(num_t);
  for (int64_t t = 0; t < num_t; ++t) {
    TS_CHECK(std::isfinite(temperatures[t]) && temperatures[t] > 0.0f,
             "{}: temperature = {} must be positive and finite", kOp, temperatures[t]);
    temps.inv[t] = 1.0f / temperatures[t];
  }
  expect_tensor(lse, DType::f32, Shape{num_t, 2, num_rows}, kOp, "lse");
  const Tensor* outputs[] = {&values, &ids, &lse};
  for (const Tensor* out : outputs) {
    TS_CHECK(!overlaps(*out, logits), "{}: an output aliases logits", kOp);
    for (const Tensor* other : outputs)
      TS_CHECK(out == other || !overlaps(*out, *other), "{}: values, ids and lse overlap", kOp);
  }
  if (num_rows == 0) return;
  dispatch_float(logits, kOp, [&]<class T>() {
    topk_logits_kernel<T><<<num_rows, kTopKThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(values.data), static_cast<int32_t*>(ids.data),
        static_cast<float*>(lse.data), static_cast<const T*>(logits.data), num_rows, width,
        vocab_size, static_cast<int>(k), temps);
    TS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tessera::cuda
