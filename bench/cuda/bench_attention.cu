// Benchmark of the native causal GQA attention (kernels/cuda/attention_native.cu) at GPT-2 and
// Llama shapes: forward and backward time (median of timed reps after warm-up, CUDA events on the
// op's stream) and TFLOP/s. FLOP convention (causal, lower triangle only, as in
// bench_attention_cudnn): forward 4·B·Hq·T²·D / 2 (two GEMMs), backward 2.5x forward (five
// GEMMs; the recomputation of S in our two backward passes is not counted). bf16 runs the tensor-core
// kernels; one f32 line shows the FMA kernels. Inputs are 25-270 MB per tensor and compute-bound,
// so they are not rotated through the L2.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/cuda/attention_native.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {
namespace {

// Uniform values of unit variance from a counter hash (random data, not zeros).
template <class T>
__global__ void fill_kernel(T* x, int64_t n, uint64_t seed) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  x[i] = from_f32<T>((float(h >> 40) * (2.0f / 16777216.0f) - 1.0f) * 1.7320508f);
}

struct Buffer {
  void* ptr = nullptr;
  Tensor t;
  Buffer(DType dtype, Shape s, uint64_t seed) {
    TS_CUDA_CHECK(cudaMalloc(&ptr, size_t(s.numel()) * (dtype == DType::f32 ? 4 : 2)));
    t = Tensor(ptr, dtype, Device::cuda, s);
    if (seed == 0) return;  // an output: left as allocated
    dispatch_float(t, "fill", [&]<class T>() {
      fill_kernel<T><<<ceil_div(s.numel(), 256), 256, 0, stream()>>>(static_cast<T*>(ptr),
                                                                      s.numel(), seed);
      TS_CUDA_CHECK_LAUNCH();
    });
  }
  ~Buffer() {
    if (cudaFree(ptr) != cudaSuccess) std::fprintf(stderr, "cudaFree failed\n");
  }
};

template <class F> double median_ms(F&& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t start, stop;
  TS_CUDA_CHECK(cudaEventCreate(&start));
  TS_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    TS_CUDA_CHECK(cudaEventRecord(start, stream()));
    f();
    TS_CUDA_CHECK(cudaEventRecord(stop, stream()));
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

struct Case {
  const char* name;
  DType dtype;
  int64_t b, t, hq, hkv, d;
  int reps;
};

void run_case(const Case& c) {
  const Shape sq{c.b, c.t, c.hq, c.d}, skv{c.b, c.t, c.hkv, c.d}, sl{c.b, c.hq, c.t};
  Buffer q(c.dtype, sq, 1), k(c.dtype, skv, 2), v(c.dtype, skv, 3), dout(c.dtype, sq, 4);
  Buffer out(c.dtype, sq, 0), lse(DType::f32, sl, 0), dq(c.dtype, sq, 0), dk(c.dtype, skv, 0),
      dv(c.dtype, skv, 0);
  const float scale = 1.0f / std::sqrt(float(c.d));
  const double fwd_ms = median_ms(
      [&] { attention_native_forward(out.t, lse.t, q.t, k.t, v.t, scale); }, 2, c.reps);
  const double bwd_ms = median_ms(
      [&] {
        attention_native_backward(dq.t, dk.t, dv.t, dout.t, q.t, k.t, v.t, out.t, lse.t, scale);
      },
      2, c.reps);
  const double fwd_flops = 4.0 * c.b * c.hq * double(c.t) * c.t * c.d / 2.0;
  std::printf("%-10s %-4s B=%-3lld T=%-5lld Hq=%-3lld Hkv=%-3lld D=%-4lld fwd %8.3f ms %6.1f "
              "TFLOP/s | bwd %8.3f ms %6.1f TFLOP/s\n",
              c.name, c.dtype == DType::f32 ? "f32" : "bf16", (long long)c.b, (long long)c.t,
              (long long)c.hq, (long long)c.hkv, (long long)c.d, fwd_ms,
              fwd_flops / fwd_ms * 1e-9, bwd_ms, 2.5 * fwd_flops / bwd_ms * 1e-9);
}

}  // namespace
}  // namespace tessera::cuda

int main() {
  using namespace tessera::cuda;
  using tessera::DType;
  try {
    cudaDeviceProp prop{};
    TS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("bench_attention (native) on %s; causal FLOPs: fwd 4*B*Hq*T^2*D/2, bwd 2.5x\n",
                prop.name);
    const Case cases[] = {
        {"gpt2", DType::bf16, 32, 1024, 12, 12, 64, 20},
        {"d128", DType::bf16, 8, 2048, 16, 16, 128, 20},
        {"d128-gqa", DType::bf16, 8, 2048, 16, 4, 128, 20},
        {"llama1b", DType::bf16, 8, 2048, 32, 8, 64, 20},
        {"gpt2", DType::f32, 32, 1024, 12, 12, 64, 3},
    };
    for (const Case& c : cases) run_case(c);
    tessera::cuda::sync();
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}
