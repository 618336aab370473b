// Benchmark of the FP8 path's pieces on Llama-1B shapes (8 x 2048 tokens): the scaled FP8 GEMMs
// (forward, dgrad, wgrad) against the bf16 GEMMs of the same shapes, with the q|k|v and gate|up
// groups also as one GEMM each, and the quantization kernels in GB/s against the device copy.
// Median of timed reps after warm-up (CUDA events); memory-bound cases rotate input sets so the
// 50 MB L2 cannot hold the previous repetition's data.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "bench/cuda/bench_util.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/fp8.h"

namespace tessera::cuda {
namespace {

using bench::DeviceTensor;
using bench::median_ms;

constexpr int64_t kTokens = 8 * 2048;
constexpr double kL2Bytes = 50e6;

// An FP8 tensor quantized from random bf16 values (scale 1: unit variance fits both formats).
struct Fp8Tensor {
  DeviceTensor t;
  Fp8Tensor(DType dtype, Shape shape, uint64_t seed, const Tensor& scale, const Tensor& amax)
      : t(dtype, shape) {
    DeviceTensor src(DType::bf16, shape, seed);
    fp8_quantize(t.t, Tensor(), amax, src.t, scale);
  }
};

struct Shapes {
  const char* name;
  int64_t k, n;   // in features, out features
  int per_layer;  // how many such linears a block has
};

double tflops(int64_t m, int64_t n, int64_t k, double ms) { return 2.0 * m * n * k / ms * 1e-9; }

// Forward, dgrad and wgrad of one linear shape in FP8 and bf16; returns the FP8 and bf16 ms of
// the three together.
std::pair<double, double> bench_linear(const Shapes& s, const Tensor& one, const Tensor& amax) {
  const int64_t M = kTokens, K = s.k, N = s.n;
  Fp8Tensor x8(DType::e4m3, {M, K}, 1, one, amax), w8(DType::e4m3, {N, K}, 2, one, amax);
  Fp8Tensor w8t(DType::e4m3, {K, N}, 3, one, amax), dy8(DType::e5m2, {M, N}, 4, one, amax);
  Fp8Tensor dy8t(DType::e5m2, {N, M}, 5, one, amax), x8t(DType::e4m3, {K, M}, 6, one, amax);
  DeviceTensor y(DType::bf16, {M, N}), dx(DType::bf16, {M, K}), dw(DType::bf16, {N, K}, 7);
  DeviceTensor x(DType::bf16, {M, K}, 8), w(DType::bf16, {N, K}, 9), dy(DType::bf16, {M, N}, 10);
  const int reps = 30;
  const double f8[3] = {
      median_ms([&] { gemm_fp8(y.t, x8.t.t, w8.t.t, one, one, false); }, 3, reps),
      median_ms([&] { gemm_fp8(dx.t, dy8.t.t, w8t.t.t, one, one, false); }, 3, reps),
      median_ms([&] { gemm_fp8(dw.t, dy8t.t.t, x8t.t.t, one, one, true); }, 3, reps)};
  const double b16[3] = {
      median_ms([&] { gemm(y.t, x.t, w.t, false, true, 1.0f, 0.0f); }, 3, reps),
      median_ms([&] { gemm(dx.t, dy.t, w.t, false, false, 1.0f, 0.0f); }, 3, reps),
      median_ms([&] { gemm(dw.t, dy.t, x.t, true, false, 1.0f, 1.0f); }, 3, reps)};
  const char* pass[3] = {"forward", "dgrad", "wgrad"};
  const int64_t mnk[3][3] = {{M, N, K}, {M, K, N}, {N, K, M}};
  for (int p = 0; p < 3; ++p)
    std::printf(
        "gemm %-8s %-8s M=%-6lld N=%-6lld K=%-6lld fp8 %7.3f ms %6.0f TFLOP/s | bf16 "
        "%7.3f ms %6.0f TFLOP/s | %4.2fx\n",
        s.name, pass[p], (long long)mnk[p][0], (long long)mnk[p][1], (long long)mnk[p][2], f8[p],
        tflops(mnk[p][0], mnk[p][1], mnk[p][2], f8[p]), b16[p],
        tflops(mnk[p][0], mnk[p][1], mnk[p][2], b16[p]), b16[p] / f8[p]);
  std::fflush(stdout);
  return {f8[0] + f8[1] + f8[2], b16[0] + b16[1] + b16[2]};
}

double g_copy_gbps = 0.0;

void report(const char* name, int64_t r, int64_t c, double bytes, double ms) {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  std::printf("mem  %-34s (%lld, %lld) %9.1f us %6.0f GB/s %5.1f%% of copy\n", name, (long long)r,
              (long long)c, ms * 1e3, gbps, 100.0 * gbps / g_copy_gbps);
  std::fflush(stdout);
}

void bench_copy() {
  const size_t bytes = size_t(1) << 30;
  const double ms = bench::copy_ms(bytes);
  g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
  report("d2d copy (read+write)", int64_t(bytes), 1, 2.0 * bytes, ms);
}

// Input sets for one memory-bound case: enough copies that consecutive reps miss the L2.
std::vector<std::unique_ptr<DeviceTensor>> inputs(int per_set, Shape shape, double bytes) {
  const int sets = std::clamp(int(4 * kL2Bytes / bytes) + 1, 1, 4);
  std::vector<std::unique_ptr<DeviceTensor>> v;
  for (int i = 0; i < sets * per_set; ++i)
    v.push_back(std::make_unique<DeviceTensor>(DType::bf16, shape, 100 + i));
  return v;
}

void bench_quantize(int64_t r, int64_t c, bool transpose, const Tensor& one, const Tensor& amax) {
  const double bytes = 2.0 * r * c + (transpose ? 2.0 : 1.0) * r * c;
  auto in = inputs(1, {r, c}, bytes);
  DeviceTensor out(DType::e4m3, {r, c}), out_t(DType::e4m3, {c, r});
  const double ms = median_ms(
      [&](int i) {
        fp8_quantize(out.t, transpose ? out_t.t : Tensor(), amax, in[i % in.size()]->t, one);
      },
      3, 30);
  report(transpose ? "fp8_quantize bf16->e4m3 +transpose" : "fp8_quantize bf16->e4m3", r, c, bytes,
         ms);
}

void bench_swiglu(int64_t r, int64_t c, const Tensor& one, const Tensor& amax) {
  const double fwd_bytes = 3.0 * 2 * r * c;
  auto fin = inputs(2, {r, c}, fwd_bytes);
  DeviceTensor h(DType::bf16, {r, c});
  const size_t nf = fin.size() / 2;
  report(
      "swiglu_forward bf16", r, c, fwd_bytes,
      median_ms([&](int i) { swiglu_forward(h.t, fin[2 * (i % nf)]->t, fin[2 * (i % nf) + 1]->t); },
                3, 30));
  const double bwd_bytes = 3.0 * 2 * r * c + 4.0 * r * c;
  auto bin = inputs(3, {r, c}, bwd_bytes);
  const size_t nb = bin.size() / 3;
  DeviceTensor g8(DType::e5m2, {r, c}), g8t(DType::e5m2, {c, r}), u8(DType::e5m2, {r, c}),
      u8t(DType::e5m2, {c, r});
  report("swiglu_backward_fp8 (both layouts)", r, c, bwd_bytes,
         median_ms(
             [&](int i) {
               const size_t s = 3 * (i % nb);
               swiglu_backward_fp8(g8.t, g8t.t, u8.t, u8t.t, amax, amax, bin[s]->t, bin[s + 1]->t,
                                   bin[s + 2]->t, one, one);
             },
             3, 30));
  DeviceTensor dg(DType::bf16, {r, c}), du(DType::bf16, {r, c});
  report("swiglu_backward bf16", r, c, 5.0 * 2 * r * c,
         median_ms(
             [&](int i) {
               const size_t s = 3 * (i % nb);
               swiglu_backward(dg.t, du.t, bin[s]->t, bin[s + 1]->t, bin[s + 2]->t);
             },
             3, 30));
}

}  // namespace
}  // namespace tessera::cuda

int main() {
  using namespace tessera;
  using namespace tessera::cuda;
  try {
    cudaDeviceProp prop{};
    TS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf(
        "bench_fp8 on %s: Llama-1B linears at %lld tokens; gemm_fp8 (bf16 out, scales "
        "1) vs cuda::gemm bf16; last column = bf16 time / fp8 time\n",
        prop.name, (long long)kTokens);
    bench::DeviceTensor one(DType::f32, {1}), amax(DType::f32, {1});
    const float h_one = 1.0f;
    TS_CUDA_CHECK(cudaMemcpy(one.t.data, &h_one, 4, cudaMemcpyHostToDevice));
    TS_CUDA_CHECK(cudaMemset(amax.t.data, 0, 4));
    // The block's linears as the model runs them, then the q|k|v and gate|up groups fused.
    const Shapes block[] = {{"q", 2048, 2048, 1},
                            {"k/v", 2048, 512, 2},
                            {"o", 2048, 2048, 1},
                            {"gate/up", 2048, 8192, 2},
                            {"down", 8192, 2048, 1}};
    const Shapes fused[] = {{"qkv", 2048, 3072, 1}, {"gate|up", 2048, 16384, 1}};
    double f8 = 0, b16 = 0, f8_qkv = 0, b16_qkv = 0, f8_gu = 0, b16_gu = 0;
    for (const Shapes& s : block) {
      const auto [a, b] = bench_linear(s, one.t, amax.t);
      f8 += s.per_layer * a, b16 += s.per_layer * b;
      const bool qkv = s.name[0] == 'q' || s.name[0] == 'k', gate_up = s.name[0] == 'g';
      if (qkv) f8_qkv += s.per_layer * a, b16_qkv += s.per_layer * b;
      if (gate_up) f8_gu += s.per_layer * a, b16_gu += s.per_layer * b;
    }
    std::printf(
        "block linears, 3 passes, per layer: fp8 %.3f ms, bf16 %.3f ms (%.2fx); x16 "
        "layers: fp8 %.1f ms, bf16 %.1f ms\n",
        f8, b16, b16 / f8, 16 * f8, 16 * b16);
    const auto [qf, qb] = bench_linear(fused[0], one.t, amax.t);
    const auto [gf, gb] = bench_linear(fused[1], one.t, amax.t);
    std::printf("fused q|k|v: fp8 %.3f ms vs %.3f separate; bf16 %.3f vs %.3f\n", qf, f8_qkv, qb,
                b16_qkv);
    std::printf("fused gate|up: fp8 %.3f ms vs %.3f separate; bf16 %.3f vs %.3f\n", gf, f8_gu, gb,
                b16_gu);
    bench_copy();
    for (const auto& [r, c] : {std::pair<int64_t, int64_t>{kTokens, 2048},
                               {kTokens, 8192},
                               {2048, 2048},
                               {8192, 2048}}) {
      bench_quantize(r, c, true, one.t, amax.t);
      bench_quantize(r, c, false, one.t, amax.t);
    }
    bench_swiglu(kTokens, 8192, one.t, amax.t);
    tessera::cuda::sync();
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_fp8: %s\n", e.what());
    return 1;
  }
  return 0;
}
