// Benchmark of the bf16 GEMMs of the two model families through cuda::gemm (cuBLASLt with cached
// heuristics, kernels/cuda/matmul.cu), against cuBLAS alone (cublasGemmEx, default algorithm, f32
// compute) in the same run: forward out = inp·W^T, backward dinp = dout·W and dW += dout^T·inp.
// FLOPs = 2·M·N·K. Median of
// timed reps after warm-up (CUDA events). Operands are 25 MB to 8 GB and the GEMMs compute-bound,
// so inputs are not rotated through the L2.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>

#include "bench/cuda/bench_util.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace tessera::cuda {
namespace {

using bench::DeviceTensor;
using bench::median_ms;

// Operands are uniform on [-1, 1) (variance 1/3): random data, not zeros, which run faster.
constexpr float kFillAmp = 1.0f;

// Row-major c (M,N) = alpha op(a) op(b) + beta c by plain cublasGemmEx (c^T = op(b)^T op(a)^T).
void cublas_gemm(cublasHandle_t handle, Tensor c, Tensor a, Tensor b, bool ta, bool tb, float alpha,
                 float beta) {
  const int m = int(c.dim(0)), n = int(c.dim(1)), k = int(ta ? a.dim(0) : a.dim(1));
  TS_CUBLAS_CHECK(cublasGemmEx(handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                               ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b.data, CUDA_R_16BF,
                               tb ? k : n, a.data, CUDA_R_16BF, ta ? m : k, &beta, c.data,
                               CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct Layer {
  const char* model;
  const char* name;
  int64_t m, k, n;  // tokens, in features, out features
};

void print_row(const char* model, const char* layer, const char* pass, int64_t m, int64_t n,
               int64_t k, double ms, double ref_ms, const char* ref_name) {
  const double flops = 2.0 * double(m) * double(n) * double(k);
  std::printf(
      "%-8s %-8s %-9s M=%-6lld N=%-6lld K=%-6lld %8.3f ms %7.1f TFLOP/s | %s %8.3f ms "
      "%7.1f TFLOP/s | %5.1f%%\n",
      model, layer, pass, (long long)m, (long long)n, (long long)k, ms, flops / ms * 1e-9, ref_name,
      ref_ms, flops / ref_ms * 1e-9, 100.0 * ref_ms / ms);
}

void run_layer(cublasHandle_t handle, const Layer& l) {
  const DType bf16 = DType::bf16;
  DeviceTensor inp(bf16, {l.m, l.k}, 1, kFillAmp), w(bf16, {l.n, l.k}, 2, kFillAmp);
  DeviceTensor out(bf16, {l.m, l.n}, 3, kFillAmp), dout(bf16, {l.m, l.n}, 4, kFillAmp);
  DeviceTensor dinp(bf16, {l.m, l.k}, 5, kFillAmp), dw(bf16, {l.n, l.k}, 6, kFillAmp);
  const double gemm_ms = 2.0 * l.m * l.n * l.k / 700e12 * 1e3;  // at ~700 TFLOP/s
  const int reps = std::clamp(int(300.0 / std::max(gemm_ms, 1e-3)), 10, 200);
  struct Pass {
    const char* name;
    Tensor c, a, b;
    bool ta, tb;
    float beta;
  };
  const Pass passes[] = {{"forward", out.t, inp.t, w.t, false, true, 0.0f},
                         {"bwd-dinp", dinp.t, dout.t, w.t, false, false, 0.0f},
                         {"bwd-dW", dw.t, dout.t, inp.t, true, false, 1.0f}};
  for (const Pass& p : passes) {
    const double ms = median_ms([&] { gemm(p.c, p.a, p.b, p.ta, p.tb, 1.0f, p.beta); }, 3, reps);
    const double ref_ms =
        median_ms([&] { cublas_gemm(handle, p.c, p.a, p.b, p.ta, p.tb, 1.0f, p.beta); }, 3, reps);
    const int64_t k = p.ta ? p.a.dim(0) : p.a.dim(1);
    print_row(l.model, l.name, p.name, p.c.dim(0), p.c.dim(1), k, ms, ref_ms, "cuBLAS");
  }
}

}  // namespace
}  // namespace tessera::cuda

int main() {
  using namespace tessera::cuda;
  try {
    cudaDeviceProp prop{};
    TS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf(
        "bench_gemm on %s: bf16 in/out, f32 accumulation; last column = cuBLAS time / "
        "ours\n",
        prop.name);
    cublasHandle_t handle;
    TS_CUBLAS_CHECK(cublasCreate(&handle));
    TS_CUBLAS_CHECK(cublasSetStream(handle, cuda_stream({})));
    TS_CUBLAS_CHECK(cublasSetWorkspace(handle, context().workspace, context().workspace_bytes));
    const int64_t gpt_m = 32 * 1024, llama_m = 8 * 2048;
    const Layer layers[] = {{"gpt2", "q/k/v", gpt_m, 768, 768},
                            {"gpt2", "o", gpt_m, 768, 768},
                            {"gpt2", "fc", gpt_m, 768, 3072},
                            {"gpt2", "proj", gpt_m, 3072, 768},
                            {"gpt2", "lm_head", gpt_m, 768, 50304},
                            {"llama1b", "q", llama_m, 2048, 2048},
                            {"llama1b", "k/v", llama_m, 2048, 512},
                            {"llama1b", "o", llama_m, 2048, 2048},
                            {"llama1b", "gate/up", llama_m, 2048, 8192},
                            {"llama1b", "down", llama_m, 8192, 2048},
                            {"llama1b", "lm_head", llama_m, 2048, 128256}};
    for (const Layer& l : layers) run_layer(handle, l);
    TS_CUBLAS_CHECK(cublasDestroy(handle));
    tessera::cuda::sync();
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "bench_gemm: %s\n", e.what());
    return 1;
  }
  return 0;
}
