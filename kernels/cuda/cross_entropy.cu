// CUDA softmax cross-entropy over a padded vocabulary, fused with the softmax: one block per row.
// The forward keeps an online (max, sum of exp) over the real columns [0, vocab_size) in f32 and
// saves lse; the backward writes dlogits = dloss * (softmax - onehot) in place if asked (dlogits
// may be logits), zeros in padding columns and on ignored rows (target < 0). Rows need not be
// 16-byte aligned (V = 50257 is fine): each row is walked as a scalar head, 16-byte packs, and a
// scalar tail. Shape letters: N rows, V padded vocabulary width (>= vocab_size).
// Targets stay on the device and are not checked on the host (that would synchronize): a target
// >= vocab_size gives a NaN loss and a NaN gradient row, so the step fails loudly downstream.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

constexpr int kRowThreads = 512;  // threads per row (one block per row)
constexpr int kUnroll = 4;        // packs loaded before the first is used

// exp(a - b) for b >= a, with an empty running max (a = -inf) contributing exactly 0; NaN inputs
// stay NaN so they reach the loss.
__device__ __forceinline__ float exp_below(float a, float b) {
  return a == -INFINITY ? 0.0f : __expf(a - b);
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the special-function unit (one instruction; relative error ~2^-22, results below
// 2^-126 flushed to zero, which no sum here can notice). 2^-inf = 0 and 2^NaN = NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
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

// Elements of a row before the first 16-byte boundary (the row's scalar head).
template <class T> __device__ __forceinline__ int head_elems(const T* row, int64_t width) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % kPackBytes);
  return static_cast<int>(std::min<int64_t>(width, ((kPackBytes - misalign) % kPackBytes) /
                                                       int(sizeof(T))));
}

// ---- kernels ---------------------------------------------------------------------------------

template <class T> __global__ void __launch_bounds__(kRowThreads)
cross_entropy_forward_kernel(float* losses, float* lse, const T* logits, const int32_t* targets,
                             int64_t width, int vocab_size) {
  constexpr int kVec = kVecWidth<T>;
  __shared__ float smem_m[kRowThreads / 32], smem_s[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * width;
  const int head = head_elems(x, vocab_size);
  const int num_packs = (vocab_size - head) / kVec;
  const T* body = x + head;

  OnlineSum acc;
  for (int c = threadIdx.x; c < head; c += kRowThreads) acc.add(to_f32(x[c]));
  for (int p0 = threadIdx.x; p0 < num_packs; p0 += kUnroll * kRowThreads) {
    Pack<T, kVec> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = p0 + u * kRowThreads;
      if (p < num_packs) v[u] = load_pack<T, kVec>(body + int64_t(p) * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + u * kRowThreads < num_packs) {
        float pack_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kVec; ++j) pack_max = fmaxf(pack_max, to_f32(v[u].v[j]));
        const float nm = fmaxf(acc.m, pack_max);
        // exp(x - nm) = 2^(x log2e - nm log2e), one FFMA and one ex2 per element. While every
        // value so far is -inf (nm = -inf) the base is 0, so each term is 2^-inf = 0, not NaN.
        const float base = nm == -INFINITY ? 0.0f : nm * kLog2e;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum += fast_exp2(fmaf(to_f32(v[u].v[j]), kLog2e, -base));
        acc.s = acc.s * fast_exp2(fmaf(acc.m, kLog2e, -base)) + sum;
        acc.m = nm;
      }
    }
  }
  for (int c = head + num_packs * kVec + threadIdx.x; c < vocab_size; c += kRowThreads)
    acc.add(to_f32(x[c]));

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

// dloss * (p - onehot) on real columns, 0 on padding columns.
__device__ __forceinline__ float ce_grad(float x, int64_t c, int32_t y, int vocab_size,
                                         float row_lse, float dloss) {
  if (c >= vocab_size) return 0.0f;
  return dloss * (__expf(x - row_lse) - (c == y ? 1.0f : 0.0f));
}

// Every element is read before it is written, by the same thread: dlogits may be logits.
template <class T> __global__ void __launch_bounds__(kRowThreads)
cross_entropy_backward_kernel(T* dlogits, const T* logits, const float* lse,
                              const int32_t* targets, int64_t width, int vocab_size,
                              float dloss) {
  constexpr int kVec = kVecWidth<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * width;
  T* dx = dlogits + row * width;
  const int32_t y = targets[row];
  // Ignored rows get zeros everywhere; rows with an invalid target get NaN (see the header).
  const bool ignored = y < 0, invalid = y >= vocab_size;
  const float row_lse = lse[row];
  auto grad = [&](float v, int64_t c) {
    if (ignored) return 0.0f;
    if (invalid) return NAN;
    return ce_grad(v, c, y, vocab_size, row_lse, dloss);
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
  for (int p0 = threadIdx.x; p0 < num_packs; p0 += kUnroll * kRowThreads) {
    Pack<T, kVec> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = p0 + u * kRowThreads;
      if (p < num_packs) v[u] = load_pack<T, kVec>(x + head + int64_t(p) * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = p0 + u * kRowThreads;
      if (p < num_packs) {
        const int64_t c0 = head + int64_t(p) * kVec;
        Pack<T, kVec> out;
#pragma unroll
        for (int j = 0; j < kVec; ++j) out.v[j] = from_f32<T>(grad(to_f32(v[u].v[j]), c0 + j));
        store_pack<T, kVec>(dx + c0, out);
      }
    }
  }
  for (int64_t c = tail_begin + threadIdx.x; c < width; c += kRowThreads)
    dx[c] = from_f32<T>(grad(to_f32(x[c]), c));
}

// ---- launchers ------------------------------------------------------------------------------

// Checks logits (N, V) and targets (N); returns N.
int64_t check_ce_args(const Tensor& logits, const Tensor& targets, int vocab_size,
                      const char* op) {
  expect_compute_dtype(logits, op, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", op, logits.str());
  const int64_t num_rows = logits.dim(0);
  TS_CHECK(vocab_size >= 1 && vocab_size <= logits.dim(1),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, logits.dim(1));
  expect_tensor(targets, DType::i32, Shape{num_rows}, op, "targets");
  TS_CHECK(num_rows < (int64_t(1) << 31), "{}: N = {} rows is too many for one launch", op,
           num_rows);
  return num_rows;
}

}  // namespace

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets,
                           int vocab_size) {
  constexpr const char* kOp = "cross_entropy_forward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, kOp);
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(lse, DType::f32, Shape{num_rows}, kOp, "lse");
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  TS_CHECK(!overlaps(losses, logits) && !overlaps(lse, logits),
           "{}: losses and lse must not alias logits", kOp);
  if (num_rows == 0) return;
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_forward_kernel<T><<<num_rows, kRowThreads, 0, stream()>>>(
        static_cast<float*>(losses.data), static_cast<float*>(lse.data),
        static_cast<const T*>(logits.data), static_cast<const int32_t*>(targets.data),
        logits.dim(1), vocab_size);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                            int vocab_size, float dloss) {
  constexpr const char* kOp = "cross_entropy_backward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, kOp);
  expect_tensor(lse, DType::f32, Shape{num_rows}, kOp, "lse");
  expect_tensor(dlogits, logits.dtype, logits.shape, kOp, "dlogits");
  TS_CHECK(!overlaps(dlogits, logits) || dlogits.data == logits.data,
           "{}: dlogits partially overlaps logits; only exact aliasing (in place) is supported",
           kOp);
  TS_CHECK(!overlaps(dlogits, lse), "{}: dlogits overlaps lse", kOp);
  TS_CHECK(!overlaps(dlogits, targets), "{}: dlogits overlaps targets", kOp);
  if (num_rows == 0) return;
  dispatch_float(logits, kOp, [&]<class T>() {
    cross_entropy_backward_kernel<T><<<num_rows, kRowThreads, 0, stream()>>>(
        static_cast<T*>(dlogits.data), static_cast<const T*>(logits.data),
        static_cast<const float*>(lse.data), static_cast<const int32_t*>(targets.data),
        logits.dim(1), vocab_size, dloss);
    TS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tessera::cuda
