// Benchmark of the native causal GQA attention (kernels/cuda/attention_native.cu) at GPT-2 and
// Llama shapes: forward and backward time (median of timed reps after warm-up, CUDA events on the
// op's stream) and TFLOP/s. FLOP convention (causal, lower triangle only, as in
// bench_attention_cudnn): forward 4·B·Hq·T²·D / 2 (two GEMMs), backward 2.5x forward (five
// GEMMs; the recomputation of S in our two backward passes is not counted). bf16 runs the
// tensor-core kernels; one f32 line shows the FMA kernels. Inputs are 25-270 MB per tensor and
// compute-bound, so they are not rotated through the L2.
#include <cmath>
#include <cstdio>

#include "bench/cuda/bench_util.cuh"
#include "kernels/cuda/attention_native.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {
namespace {

using bench::DeviceTensor;
using bench::median_ms;

struct Case {
  const char* name;
  DType dtype;
  int64_t b, t, hq, hkv, d;
  int reps;
};

void run_case(const Case& c) {
  const Shape sq{c.b, c.t, c.hq, c.d}, skv{c.b, c.t, c.hkv, c.d}, sl{c.b, c.hq, c.t};
  DeviceTensor q(c.dtype, sq, 1), k(c.dtype, skv, 2), v(c.dtype, skv, 3), dout(c.dtype, sq, 4);
  DeviceTensor out(c.dtype, sq), lse(DType::f32, sl), dq(c.dtype, sq), dk(c.dtype, skv),
      dv(c.dtype, skv);
  const float scale = 1.0f / std::sqrt(float(c.d));
  const double fwd_ms =
      median_ms([&] { attention_native_forward(out.t, lse.t, q.t, k.t, v.t, scale); }, 2, c.reps);
  const double bwd_ms = median_ms(
      [&] {
        attention_native_backward(dq.t, dk.t, dv.t, dout.t, q.t, k.t, v.t, out.t, lse.t, scale);
      },
      2, c.reps);
  const double fwd_flops = 4.0 * c.b * c.hq * double(c.t) * c.t * c.d / 2.0;
  std::printf(
      "%-10s %-4s B=%-3lld T=%-5lld Hq=%-3lld Hkv=%-3lld D=%-4lld fwd %8.3f ms %6.1f "
      "TFLOP/s | bwd %8.3f ms %6.1f TFLOP/s\n",
      c.name, c.dtype == DType::f32 ? "f32" : "bf16", (long long)c.b, (long long)c.t,
      (long long)c.hq, (long long)c.hkv, (long long)c.d, fwd_ms, fwd_flops / fwd_ms * 1e-9, bwd_ms,
      2.5 * fwd_flops / bwd_ms * 1e-9);
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
