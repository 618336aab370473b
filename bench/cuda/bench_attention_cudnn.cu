// Benchmark of causal GQA attention through cuDNN's fused SDPA (kernels/cuda/attention_cudnn.cu)
// at GPT-2 and Llama shapes: forward and backward time (median of timed reps after warm-up, CUDA
// events on the op's stream) and TFLOP/s. FLOP convention (causal, lower triangle only): forward
// 4·B·Hq·T²·D / 2 (two GEMMs), backward 2.5x forward (five GEMMs). Inputs are 50-134 MB per
// tensor (q), past the 50-60 MB L2, and the op is compute-bound, so they are not rotated.
// bench/torch/bench_sdpa.py prints PyTorch's SDPA at the same shapes in the same format.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {
namespace {

// Uniform values of unit variance from a counter hash (no RNG state; reproducible).
__global__ void fill_uniform_kernel(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  const float u = float(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  x[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * 1.7320508f);
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { TS_CUDA_CHECK(cudaMalloc(&ptr, bytes)); }
  ~DeviceBuffer() {
    if (cudaFree(ptr) != cudaSuccess) std::fprintf(stderr, "cudaFree failed\n");
  }
};

Tensor make(DeviceBuffer& b, DType dtype, Shape s) { return Tensor(b.ptr, dtype, Device::cuda, s); }

void fill(Tensor t, uint64_t seed) {
  const int64_t n = t.numel();
  fill_uniform_kernel<<<ceil_div(n, 256), 256, 0, stream()>>>(
      static_cast<__nv_bfloat16*>(t.data), n, seed);
  TS_CUDA_CHECK_LAUNCH();
}

// Median milliseconds of `reps` timed runs of f, after `warmup` untimed ones.
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
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
};

void run_case(const Case& c) {
  const Shape q_shape{c.num_b, c.num_t, c.num_hq, c.head_dim};
  const Shape kv_shape{c.num_b, c.num_t, c.num_hkv, c.head_dim};
  const Shape lse_shape{c.num_b, c.num_hq, c.num_t};
  const size_t q_bytes = q_shape.numel() * 2, kv_bytes = kv_shape.numel() * 2;
  DeviceBuffer q_b(q_bytes), k_b(kv_bytes), v_b(kv_bytes), out_b(q_bytes), dout_b(q_bytes);
  DeviceBuffer dq_b(q_bytes), dk_b(kv_bytes), dv_b(kv_bytes), lse_b(lse_shape.numel() * 4);
  Tensor q = make(q_b, DType::bf16, q_shape), k = make(k_b, DType::bf16, kv_shape);
  Tensor v = make(v_b, DType::bf16, kv_shape), out = make(out_b, DType::bf16, q_shape);
  Tensor dout = make(dout_b, DType::bf16, q_shape), dq = make(dq_b, DType::bf16, q_shape);
  Tensor dk = make(dk_b, DType::bf16, kv_shape), dv = make(dv_b, DType::bf16, kv_shape);
  Tensor lse = make(lse_b, DType::f32, lse_shape);
  fill(q, 1);
  fill(k, 2);
  fill(v, 3);
  fill(dout, 4);
  const float scale = 1.0f / std::sqrt(float(c.head_dim));

  for (bool backward : {false, true})
    std::printf("[plan] %s\n", attention_cudnn_describe(c.num_b, c.num_t, c.num_hq, c.num_hkv,
                                                         c.head_dim, backward).c_str());
  const double fwd_flop = 4.0 * c.num_b * c.num_hq * double(c.num_t) * c.num_t * c.head_dim / 2;
  const double bwd_flop = 2.5 * fwd_flop;
  std::string line = fmt::format("cudnn        {:<12} B={} T={} Hq={} Hkv={} D={}", c.name,
                                 c.num_b, c.num_t, c.num_hq, c.num_hkv, c.head_dim);
  if (!attention_cudnn_forward(out, lse, q, k, v, scale)) {
    std::printf("%s  fwd: no cuDNN engine\n", line.c_str());
    return;
  }
  const double fwd_ms =
      median_ms([&] { attention_cudnn_forward(out, lse, q, k, v, scale); }, 5, 30);
  line += fmt::format("  fwd {:.3f} ms {:6.1f} TFLOP/s", fwd_ms, fwd_flop / fwd_ms * 1e-9);
  if (!attention_cudnn_backward(dq, dk, dv, dout, q, k, v, out, lse, scale)) {
    std::printf("%s  bwd: no cuDNN engine\n", line.c_str());
    return;
  }
  const double bwd_ms = median_ms(
      [&] { attention_cudnn_backward(dq, dk, dv, dout, q, k, v, out, lse, scale); }, 5, 30);
  line += fmt::format("  bwd {:.3f} ms {:6.1f} TFLOP/s", bwd_ms, bwd_flop / bwd_ms * 1e-9);
  std::printf("%s\n", line.c_str());
}

}  // namespace
}  // namespace tessera::cuda

int main() {
  using tessera::cuda::Case;
  const Case cases[] = {
      {"gpt2", 32, 1024, 12, 12, 64},        // GPT-2 small, MHA
      {"llama1b", 8, 2048, 32, 8, 128},      // Llama-3.2-1B heads, GQA 4
      {"llama_t4096", 8, 4096, 16, 4, 128},  // long context, GQA 4
  };
  try {
    std::printf("FLOP convention: causal fwd = 4*B*Hq*T^2*D/2, bwd = 2.5 x fwd\n");
    for (const Case& c : cases) tessera::cuda::run_case(c);
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "bench_attention_cudnn: %s\n", e.what());
    return 1;
  }
  return 0;
}
