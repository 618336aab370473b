// Row walks and helpers shared by the softmax-over-a-row loss kernels (cross_entropy.cu,
// kd_loss.cu): fast exp2, the 16-byte head of a row, real columns of a shard, packed row walks.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the special-function unit (one instruction; relative error ~2^-22, results below
// 2^-126 flushed to zero, which no sum here can notice). 2^-inf = 0 and 2^NaN = NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Elements of a row before the first 16-byte boundary (the row's scalar head).
template <class T>
__device__ __forceinline__ int head_elems(const T* row, int64_t width) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % kPackBytes);
  return static_cast<int>(
      std::min<int64_t>(width, ((kPackBytes - misalign) % kPackBytes) / int(sizeof(T))));
}

// Real (non-padding) columns of a shard `width` wide that starts at global column vocab_start.
inline int num_real_columns(int64_t vocab_start, int64_t width, int vocab_size) {
  return static_cast<int>(std::clamp<int64_t>(int64_t(vocab_size) - vocab_start, 0, width));
}

// The packed body of a row walk over one or more rows that sit alike against the 16-byte grid:
// thread t takes packs t, t + kThreads, ... of kVecWidth<T> columns, loads kPacks of them from
// every row before the first is used, then calls f(c, x0, x1, ...) for each, with c the pack's
// first column (counted from the row pointers) and xk row k's pack as stored (const T (&)[kVec]).
template <int kThreads, int kPacks, class F, class T, class... Ts>
__device__ __forceinline__ void for_each_pack(int num_packs, F&& f, const T* first,
                                              const Ts*... rest) {
  static_assert((std::is_same_v<T, Ts> && ...), "rows of one walk share a type");
  constexpr int kVec = kVecWidth<T>;
  constexpr int kRows = 1 + sizeof...(Ts);
  const T* const rows[kRows] = {first, rest...};
  for (int p0 = threadIdx.x; p0 < num_packs; p0 += kPacks * kThreads) {
    Pack<T, kVec> v[kPacks][kRows];
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      const int p = p0 + u * kThreads;
      if (p < num_packs) {
#pragma unroll
        for (int k = 0; k < kRows; ++k) v[u][k] = load_pack<T, kVec>(rows[k] + int64_t(p) * kVec);
      }
    }
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      const int p = p0 + u * kThreads;
      if (p < num_packs) {
        [&]<size_t... k>(std::index_sequence<k...>) { f(int64_t(p) * kVec, v[u][k].v...); }
        (std::make_index_sequence<kRows>{});
      }
    }
  }
}

// Walks the first `count` columns of one or more rows together: f.template operator()<kN>(x0,
// x1, ...) gets kN consecutive columns of each row, as stored (the caller widens them, so a pack
// stays 16 bytes of registers rather than kN floats), with kN = the 16-byte pack width for the
// body (for_each_pack, kPacks packs of each row in flight per thread) and kN = 1 for the scalar
// head and tail. When the rows sit differently against the 16-byte grid, every column is a scalar
// one.
template <int kThreads, int kPacks, class F, class T, class... Ts>
__device__ __forceinline__ void for_each_in_rows(int count, F&& f, const T* first,
                                                 const Ts*... rest) {
  constexpr int kVec = kVecWidth<T>;
  constexpr int kRows = 1 + sizeof...(Ts);
  const T* const rows[kRows] = {first, rest...};
  const int first_head = head_elems(first, count);
  const int head = ((head_elems(rest, count) == first_head) && ...) ? first_head : count;
  const int num_packs = (count - head) / kVec;
  auto scalar = [&](int c) {
    [&]<size_t... k>(std::index_sequence<k...>) {
      const T x[kRows][1] = {{rows[k][c]}...};
      f(x[k]...);
    }
    (std::make_index_sequence<kRows>{});
  };
  for (int c = threadIdx.x; c < head; c += kThreads) scalar(c);
  for_each_pack<kThreads, kPacks>(
      num_packs, [&](int64_t, const auto&... x) { f(x...); }, first + head, (rest + head)...);
  for (int c = head + num_packs * kVec + threadIdx.x; c < count; c += kThreads) scalar(c);
}

}  // namespace tessera::cuda
