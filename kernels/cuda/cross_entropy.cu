// CUDA softmax cross-entropy over a padded vocabulary, fused with the softmax: one block per row.
// The forward keeps an online (max, sum of exp) over the real columns [0, vocab_size) in f32 and
// saves lse; the backward writes dlogits = dloss * (softmax - onehot) in place if asked (dlogits
// may be logits), zeros in padding columns and on ignored rows (target < 0). Rows need not be
// 16-byte aligned (V = 50257 is fine): each row is walked as a scalar head, 16-byte packs, and a
// scalar tail. The vocabulary-parallel pieces (shard max, shard sums: one block per row over the
// shard's real columns; finish: elementwise) and the sharded backward (vocab_start) follow the
// same layout. Shape letters: N rows, V padded vocabulary width (>= vocab_size), Vl shard width.
// Targets stay on the device and are not checked on the host (that would synchronize): a target
// >= vocab_size gives a NaN loss and a NaN gradient row (on every shard), so the step fails
// loudly downstream.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/softmax_rows.cuh"

namespace tessera::cuda {

namespace {

constexpr int kRowThreads = 512;  // threads per row (one block per row)
constexpr int kUnroll = 4;        // packs loaded before the first is used

// exp(a - b) for b >= a, with an empty running max (a = -inf) contributing exactly 0; NaN inputs
// stay NaN so they reach the loss.
__device__ __forceinline__ float exp_below(float a, float b) {
  return a == -INFINITY ? 0.0f : __expf(a - b);
}

// Running (max, sum of exp(x - max)) of the values seen so far.
struct OnlineSum {
  float m = -INFINITY;
  float s = 0.0f;
  __device__ void add(float x) {
    const float nm = fmaxf(m, x);
    s = s * exp_below(m, nm) + exp_below(x, nm);
    m = nm;
  }
  __device__ void merge(float m2, float s2) {
    const float nm = fmaxf(m, m2);
    s = s * exp_below(m, nm) + s2 * exp_below(m2, nm);
    m = nm;
  }
};

// ---- kernels ---------------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_forward_kernel(float* losses, float* lse, const T* logits, const int32_t* targets,
                                 int64_t width, int vocab_size) {
  __shared__ float smem_m[kRowThreads / 32], smem_s[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * width;

  OnlineSum acc;
  for_each_in_rows<kRowThreads, kUnroll>(
      vocab_size,
      [&]<int kN>(const T(&v)[kN]) {
        if constexpr (kN == 1) {  // the scalar head and tail
          acc.add(to_f32(v[0]));
        } else {
          float pack_max = -INFINITY;
#pragma unroll
          for (int j = 0; j < kN; ++j) pack_max = fmaxf(pack_max, to_f32(v[j]));
          const float nm = fmaxf(acc.m, pack_max);
          // exp(x - nm) = 2^(x log2e - nm log2e), one FFMA and one ex2 per element. While every
          // value so far is -inf (nm = -inf) the base is 0, so each term is 2^-inf = 0, not NaN.
          const float base = nm == -INFINITY ? 0.0f : nm * kLog2e;
          float sum = 0.0f;
#pragma unroll
          for (int j = 0; j < kN; ++j) sum += fast_exp2(fmaf(to_f32(v[j]), kLog2e, -base));
          acc.s = acc.s * fast_exp2(fmaf(acc.m, kLog2e, -base)) + sum;
          acc.m = nm;
        }
      },
      x);

  // Merge the threads' partial sums in a fixed order: butterfly in each warp, then warp order.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, acc.m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, acc.s, offset);
    acc.merge(m2, s2);
  }
  if (threadIdx.x % 32 == 0) {
    smem_m[threadIdx.x / 32] = acc.m;
    smem_s[threadIdx.x / 32] = acc.s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  OnlineSum total;
  for (int w = 0; w < kRowThreads / 32; ++w) total.merge(smem_m[w], smem_s[w]);
  const float row_lse = total.m + logf(total.s);
  lse[row] = row_lse;
  const int32_t y = targets[row];
  losses[row] = y < 0 ? 0.0f : y < vocab_size ? row_lse - to_f32(x[y]) : NAN;
}

// dloss * (p - onehot) on real columns (local column c < num_real), 0 on padding columns; y is
// the target's local column (outside [0, width) when another shard holds it).
__device__ __forceinline__ float ce_grad(float x, int64_t c, int64_t y, int64_t num_real,
                                         float row_lse, float dloss) {
  if (c >= num_real) return 0.0f;
  return dloss * (__expf(x - row_lse) - (c == y ? 1.0f : 0.0f));
}

// Every element is read before it is written, by the same thread: dlogits may be logits.
// The row is the global columns [vocab_start, vocab_start + width); num_real of them are real.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_backward_kernel(T* dlogits, const T* logits, const float* lse,
                                  const int32_t* targets, int64_t width, int vocab_size,
                                  int64_t vocab_start, int64_t num_real, float dloss,
                                  const T* addend) {
  constexpr int kVec = kVecWidth<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * width;
  T* dx = dlogits + row * width;
  const T* add = addend == nullptr ? nullptr : addend + row * width;
  const int32_t y = targets[row];
  // Ignored rows get zeros everywhere; rows with an invalid target get NaN (see the header).
  const bool ignored = y < 0, invalid = y >= vocab_size;
  const int64_t local_y = int64_t(y) - vocab_start;
  const float row_lse = lse[row];
  auto ce = [&](float v, int64_t c) {
    if (ignored) return 0.0f;
    if (invalid) return NAN;
    return ce_grad(v, c, local_y, num_real, row_lse, dloss);
  };
  // The addend joins in f32, before the one rounding to T.
  auto grad = [&](float v, int64_t c) {
    return add == nullptr ? ce(v, c) : ce(v, c) + to_f32(add[c]);
  };
  // dx and x have the same misalignment (same row offset, both tensors 2-byte aligned or not).
  const int head = head_elems(dx, width);
  const bool packs_ok = head_elems(x, width) == head;
  const int num_packs = packs_ok ? static_cast<int>((width - head) / kVec) : 0;
  const int64_t tail_begin = packs_ok ? head + int64_t(num_packs) * kVec : 0;

  if (packs_ok) {
    for (int c = threadIdx.x; c < head; c += kRowThreads)
      dx[c] = from_f32<T>(grad(to_f32(x[c]), c));
  }
  for_each_pack<kRowThreads, kUnroll>(
      num_packs,
      [&](int64_t c, const T(&v)[kVec]) {
        const int64_t c0 = head + c;
        Pack<T, kVec> out;
        if (add == nullptr) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) out.v[j] = from_f32<T>(ce(to_f32(v[j]), c0 + j));
        } else {
          const Pack<T, kVec> a = load_pack<T, kVec>(add + c0);
#pragma unroll
          for (int j = 0; j < kVec; ++j)
            out.v[j] = from_f32<T>(ce(to_f32(v[j]), c0 + j) + to_f32(a.v[j]));
        }
        store_pack<T, kVec>(dx + c0, out);
      },
      x + head);
  for (int64_t c = tail_begin + threadIdx.x; c < width; c += kRowThreads)
    dx[c] = from_f32<T>(grad(to_f32(x[c]), c));
}

// ---- vocabulary-parallel pieces ---------------------------------------------------------------

// Calls f(x) for each of the first `count` elements of row x (in f32), walked as the forward
// walks a row: a scalar head up to the first 16-byte boundary, kUnroll packs in flight per
// thread, then a scalar tail.
template <class T, class F>
__device__ __forceinline__ void for_each_in_row(const T* x, int count, F&& f) {
  for_each_in_rows<kRowThreads, kUnroll>(
      count,
      [&]<int kN>(const T(&v)[kN]) {
#pragma unroll
        for (int j = 0; j < kN; ++j) f(to_f32(v[j]));
      },
      x);
}

// Max over the kRowThreads threads of the block, valid in thread 0. fmaxf skips NaN, like the
// CPU reference's std::max; a NaN logit poisons the sums instead.
__device__ __forceinline__ float block_max(float v, float* smem /*kRowThreads / 32*/) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float m = -INFINITY;
  if (threadIdx.x == 0)
    for (int w = 0; w < kRowThreads / 32; ++w) m = fmaxf(m, smem[w]);
  return m;
}

// row_max[row] = max of the row's num_real real columns; -inf when num_real = 0.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_shard_max_kernel(float* row_max, const T* logits, int64_t width, int num_real) {
  __shared__ float smem[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  float m = -INFINITY;
  for_each_in_row(logits + row * width, num_real, [&](float x) { m = fmaxf(m, x); });
  m = block_max(m, smem);
  if (threadIdx.x == 0) row_max[row] = m;
}

// sum_exp[row] = sum of exp(x - row_max[row]) over the real columns (summed per thread, then in
// a fixed order across the block); target_logit[row] = the target's logit when this shard holds
// it, 0 when another shard does or the row is ignored, NaN for a target >= vocab_size.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_shard_sums_kernel(float* sum_exp, float* target_logit, const T* logits,
                                    const float* row_max, const int32_t* targets, int64_t width,
                                    int num_real, int64_t vocab_start, int vocab_size) {
  __shared__ float smem[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * width;
  const float m = row_max[row];
  // The exact difference x - m keeps large logits accurate (the forward's single FFMA would
  // round m * log2e first); the extra FADD is free in this memory-bound loop.
  float s[1] = {0.0f};
  for_each_in_row(x, num_real, [&](float v) { s[0] += fast_exp2((v - m) * kLog2e); });
  row_sum<kRowThreads, 1>(s, smem);
  if (threadIdx.x != 0) return;
  sum_exp[row] = s[0];
  const int32_t y = targets[row];
  const int64_t local = int64_t(y) - vocab_start;
  float t = 0.0f;
  if (y >= vocab_size)
    t = NAN;
  else if (y >= 0 && local >= 0 && local < width)
    t = to_f32(x[local]);
  target_logit[row] = t;
}

// lse = row_max + log(sum_exp); losses = lse - target_logit, 0 on ignored rows.
__global__ void __launch_bounds__(kBlock)
    cross_entropy_shard_finish_kernel(float* losses, float* lse, const float* row_max,
                                      const float* sum_exp, const float* target_logit,
                                      const int32_t* targets, int64_t num_rows) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < num_rows;
       n += int64_t(gridDim.x) * blockDim.x) {
    const float row_lse = row_max[n] + logf(sum_exp[n]);
    lse[n] = row_lse;
    losses[n] = targets[n] < 0 ? 0.0f : row_lse - target_logit[n];
  }
}

// ---- launchers ------------------------------------------------------------------------------

// Checks logits (N, V) and the vocabulary size; returns N. A shard (sharded = true) cannot check
// vocab_size against its width: only the caller knows the whole padded vocabulary.
int64_t check_logits(const Tensor& logits, int vocab_size, int64_t vocab_start, bool sharded,
                     const char* op) {
  expect_compute_dtype(logits, op, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", op, logits.str());
  const int64_t num_rows = logits.dim(0);
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= logits.dim(1)),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, logits.dim(1));
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  TS_CHECK(num_rows < (int64_t(1) << 31), "{}: N = {} rows is too many for one launch", op,
           num_rows);
  return num_rows;
}

// check_logits plus targets (N) i32.
int64_t check_ce_args(const Tensor& logits, const Tensor& targets, int vocab_size,
                      int64_t vocab_start, bool sharded, const char* op) {
  const int64_t num_rows = check_logits(logits, vocab_size, vocab_start, sharded, op);
  expect_tensor(targets, DType::i32, Shape{num_rows}, op, "targets");
  return num_rows;
}

}  // namespace

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets, int vocab_size,
                           ops::Stream stream) {
  constexpr const char* kOp = "cross_entropy_forward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, 0, false, kOp);
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(lse, DType::f32, Shape{num_rows}, kOp, "lse");
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  TS_CHECK(!overlaps(losses, logits) && !overlaps(lse, logits),
           "{}: losses and lse must not alias logits", kOp);
  if (num_rows == 0) return;
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_forward_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(losses.data), static_cast<float*>(lse.data),
        static_cast<const T*>(logits.data), static_cast<const int32_t*>(targets.data),
        logits.dim(1), vocab_size);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                            int vocab_size, float dloss, int64_t vocab_start, Tensor addend,
                            ops::Stream stream) {
  constexpr const char* kOp = "cross_entropy_backward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, vocab_start, true, kOp);
  expect_tensor(lse, DType::f32, Shape{num_rows}, kOp, "lse");
  expect_tensor(dlogits, logits.dtype, logits.shape, kOp, "dlogits");
  TS_CHECK(!overlaps(dlogits, logits) || dlogits.data == logits.data,
           "{}: dlogits partially overlaps logits; only exact aliasing (in place) is supported",
           kOp);
  TS_CHECK(!overlaps(dlogits, lse), "{}: dlogits overlaps lse", kOp);
  TS_CHECK(!overlaps(dlogits, targets), "{}: dlogits overlaps targets", kOp);
  if (!addend.empty()) {
    expect_tensor(addend, logits.dtype, logits.shape, kOp, "addend");
    TS_CHECK(!overlaps(addend, dlogits), "{}: addend overlaps dlogits", kOp);
  }
  if (num_rows == 0) return;
  const int64_t width = logits.dim(1);
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_backward_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<T*>(dlogits.data), static_cast<const T*>(logits.data),
        static_cast<const float*>(lse.data), static_cast<const int32_t*>(targets.data), width,
        vocab_size, vocab_start, num_real_columns(vocab_start, width, vocab_size), dloss,
        addend.empty() ? nullptr : static_cast<const T*>(addend.data));
    TS_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_shard_max(Tensor row_max, Tensor logits, int64_t vocab_start, int vocab_size,
                             ops::Stream stream) {
  constexpr const char* kOp = "cross_entropy_shard_max";
  const int64_t num_rows = check_logits(logits, vocab_size, vocab_start, true, kOp);
  expect_tensor(row_max, DType::f32, Shape{num_rows}, kOp, "row_max");
  TS_CHECK(!overlaps(row_max, logits), "{}: row_max must not alias logits", kOp);
  if (num_rows == 0) return;
  const int64_t width = logits.dim(1);
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_shard_max_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(row_max.data), static_cast<const T*>(logits.data), width,
        num_real_columns(vocab_start, width, vocab_size));
    TS_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_shard_sums(Tensor sum_exp, Tensor target_logit, Tensor logits, Tensor row_max,
                              Tensor targets, int64_t vocab_start, int vocab_size,
                              ops::Stream stream) {
  constexpr const char* kOp = "cross_entropy_shard_sums";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, vocab_start, true, kOp);
  const Shape rows{num_rows};
  expect_tensor(sum_exp, DType::f32, rows, kOp, "sum_exp");
  expect_tensor(target_logit, DType::f32, rows, kOp, "target_logit");
  expect_tensor(row_max, DType::f32, rows, kOp, "row_max");
  for (const Tensor* out : {&sum_exp, &target_logit})
    for (const Tensor* in : {&logits, &row_max, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: sum_exp and target_logit must not alias an input", kOp);
  TS_CHECK(!overlaps(sum_exp, target_logit), "{}: sum_exp and target_logit overlap", kOp);
  if (num_rows == 0) return;
  const int64_t width = logits.dim(1);
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_shard_sums_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(sum_exp.data), static_cast<float*>(target_logit.data),
        static_cast<const T*>(logits.data), static_cast<const float*>(row_max.data),
        static_cast<const int32_t*>(targets.data), width,
        num_real_columns(vocab_start, width, vocab_size), vocab_start, vocab_size);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sum_exp,
                                Tensor target_logit, Tensor targets, ops::Stream stream) {
  constexpr const char* kOp = "cross_entropy_shard_finish";
  TS_CHECK(!row_max.empty() && row_max.ndim() == 1, "{}: row_max must be (N), got {}", kOp,
           row_max.str());
  const int64_t num_rows = row_max.dim(0);
  const Shape rows{num_rows};
  expect_tensor(row_max, DType::f32, rows, kOp, "row_max");
  expect_tensor(sum_exp, DType::f32, rows, kOp, "sum_exp");
  expect_tensor(target_logit, DType::f32, rows, kOp, "target_logit");
  expect_tensor(losses, DType::f32, rows, kOp, "losses");
  expect_tensor(lse, DType::f32, rows, kOp, "lse");
  expect_tensor(targets, DType::i32, rows, kOp, "targets");
  for (const Tensor* out : {&losses, &lse})
    for (const Tensor* in : {&row_max, &sum_exp, &target_logit, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and lse must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  if (num_rows == 0) return;
  cross_entropy_shard_finish_kernel<<<grid_for(num_rows), kBlock, 0, cuda_stream(stream)>>>(
      static_cast<float*>(losses.data), static_cast<float*>(lse.data),
      static_cast<const float*>(row_max.data), static_cast<const float*>(sum_exp.data),
      static_cast<const float*>(target_logit.data), static_cast<const int32_t*>(targets.data),
      num_rows);
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace tessera::cuda
