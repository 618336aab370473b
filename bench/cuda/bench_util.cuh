// Shared by the CUDA benchmark programs in bench/cuda: the CUDA-event timing loop (warm-up, timed
// reps on the op stream, median) and an owned device tensor filled with counter-hash random values.
// Benchmark support only: nothing here is used by the trainer, and the fill is reproducible, not
// statistically strong.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace tessera::cuda::bench {

// Fill amplitude giving unit variance: uniform on [-sqrt(3), sqrt(3)).
constexpr float kUnitVarianceAmp = 1.7320508f;

// Uniform values on [-amp, amp) from a counter hash of (index + seed): no RNG state.
template <class T>
__global__ void fill_uniform_kernel(T* x, int64_t n, uint64_t seed, float amp) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  x[i] = from_f32<T>((float(h >> 40) * (2.0f / 16777216.0f) - 1.0f) * amp);
}

// A device tensor (f32 or bf16) that frees its memory on destruction. With seed != 0 it is filled
// with fill_uniform_kernel values on the op stream; seed 0 leaves it as allocated (for outputs).
struct DeviceTensor {
  Tensor t;
  DeviceTensor(DType dtype, Shape shape, uint64_t seed = 0, float amp = kUnitVarianceAmp) {
    void* ptr = nullptr;
    TS_CUDA_CHECK(cudaMalloc(&ptr, dtype_storage_bytes(dtype, shape.numel())));
    t = Tensor(ptr, dtype, Device::cuda, shape);
    if (seed == 0) return;
    dispatch_float(t, "fill", [&]<class T>() {
      fill_uniform_kernel<T><<<ceil_div(shape.numel(), 256), 256, 0, cuda_stream({})>>>(
          static_cast<T*>(ptr), shape.numel(), seed, amp);
      TS_CUDA_CHECK_LAUNCH();
    });
  }
  // A destructor must not throw: a failed free is reported and the program goes on.
  ~DeviceTensor() {
    if (cudaFree(t.data) != cudaSuccess) std::fprintf(stderr, "cudaFree failed\n");
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
};

// Median milliseconds of `reps` timed calls of f after `warmup` untimed ones, timed by CUDA events
// on the op stream. f may take the repetition index (0 .. warmup + reps - 1, warm-ups first), e.g.
// to rotate through input copies so the L2 does not hold the previous call's data.
template <class F>
double median_ms(F&& f, int warmup, int reps) {
  auto call = [&](int rep_idx) {
    if constexpr (std::is_invocable_v<F&, int>)
      f(rep_idx);
    else
      f();
  };
  for (int i = 0; i < warmup; ++i) call(i);
  cudaEvent_t start, stop;
  TS_CUDA_CHECK(cudaEventCreate(&start));
  TS_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    TS_CUDA_CHECK(cudaEventRecord(start, cuda_stream({})));
    call(warmup + i);
    TS_CUDA_CHECK(cudaEventRecord(stop, cuda_stream({})));
    TS_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0.0f;
    TS_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  TS_CUDA_CHECK(cudaEventDestroy(start));
  TS_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Milliseconds of one device-to-device copy of `bytes` (median of 20 after 3 warm-ups): the
// bandwidth reference of the memory-bound benchmarks (it reads and writes 2 * bytes).
inline double copy_ms(size_t bytes) {
  void *src = nullptr, *dst = nullptr;
  TS_CUDA_CHECK(cudaMalloc(&src, bytes));
  TS_CUDA_CHECK(cudaMalloc(&dst, bytes));
  TS_CUDA_CHECK(cudaMemsetAsync(src, 0x3c, bytes, cuda_stream({})));
  const double ms = median_ms(
      [&] {
        TS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_stream({})));
      },
      3, 20);
  TS_CUDA_CHECK(cudaFree(src));
  TS_CUDA_CHECK(cudaFree(dst));
  return ms;
}

}  // namespace tessera::cuda::bench
