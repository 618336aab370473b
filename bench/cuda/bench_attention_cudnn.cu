// Benchmark of causal GQA attention through cuDNN's fused SDPA (kernels/cuda/attention_cudnn.cu)
// at GPT-2 and Llama shapes: forward and backward time (median of timed reps after warm-up, CUDA
// events on the op's stream) and TFLOP/s. FLOP convention (causal, lower triangle only): forward
// 4·B·Hq·T²·D / 2 (two GEMMs), backward 2.5x forward (five GEMMs). Inputs are 50-134 MB per
// tensor (q), past the 50-60 MB L2, and the op is compute-bound, so they are not rotated.
// bench/torch/bench_sdpa.py prints PyTorch's SDPA at the same shapes in the same format.
#include <cmath>
#include <cstdio>
#include <string>

#include "bench/cuda/bench_util.cuh"
#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {
namespace {

using bench::DeviceTensor;
using bench::median_ms;

struct Case {
  const char* name;
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
};

void run_case(const Case& c) {
  const Shape q_shape{c.num_b, c.num_t, c.num_hq, c.head_dim};
  const Shape kv_shape{c.num_b, c.num_t, c.num_hkv, c.head_dim};
  const Shape lse_shape{c.num_b, c.num_hq, c.num_t};
  DeviceTensor q(DType::bf16, q_shape, 1), k(DType::bf16, kv_shape, 2);
  DeviceTensor v(DType::bf16, kv_shape, 3), dout(DType::bf16, q_shape, 4);
  DeviceTensor out(DType::bf16, q_shape), dq(DType::bf16, q_shape);
  DeviceTensor dk(DType::bf16, kv_shape), dv(DType::bf16, kv_shape);
  DeviceTensor lse(DType::f32, lse_shape);
  const float scale = 1.0f / std::sqrt(float(c.head_dim));

  for (bool backward : {false, true})
    std::printf("[plan] %s\n", attention_cudnn_describe(c.num_b, c.num_t, c.num_hq, c.num_hkv,
                                                        c.head_dim, backward)
                                   .c_str());
  const double fwd_flop = 4.0 * c.num_b * c.num_hq * double(c.num_t) * c.num_t * c.head_dim / 2;
  const double bwd_flop = 2.5 * fwd_flop;
  std::string line = fmt::format("cudnn        {:<12} B={} T={} Hq={} Hkv={} D={}", c.name, c.num_b,
                                 c.num_t, c.num_hq, c.num_hkv, c.head_dim);
  if (!attention_cudnn_forward(out.t, lse.t, q.t, k.t, v.t, scale)) {
    std::printf("%s  fwd: no cuDNN engine\n", line.c_str());
    return;
  }
  const double fwd_ms =
      median_ms([&] { attention_cudnn_forward(out.t, lse.t, q.t, k.t, v.t, scale); }, 5, 30);
  line += fmt::format("  fwd {:.3f} ms {:6.1f} TFLOP/s", fwd_ms, fwd_flop / fwd_ms * 1e-9);
  if (!attention_cudnn_backward(dq.t, dk.t, dv.t, dout.t, q.t, k.t, v.t, out.t, lse.t, scale)) {
    std::printf("%s  bwd: no cuDNN engine\n", line.c_str());
    return;
  }
  const double bwd_ms = median_ms(
      [&] {
        attention_cudnn_backward(dq.t, dk.t, dv.t, dout.t, q.t, k.t, v.t, out.t, lse.t, scale);
      },
      5, 30);
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
