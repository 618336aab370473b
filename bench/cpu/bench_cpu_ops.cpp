// CPU kernel micro-benchmarks at the ci-tiny model's shapes (B*T = 2048 rows, C = 128, V = 4096):
// the BLAS GEMM against the plain-loop reference, and the memory-bound references. Run:
//   build/bench/cpu/bench_cpu_ops --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/gemm_reference.h"

namespace {

using namespace tessera;

struct Host {
  std::vector<float> v;
  Tensor t;
  Host(Shape s, float fill_std = 1.0f) : v(s.numel()) {
    std::mt19937 rng(1);
    std::normal_distribution<float> d(0.0f, fill_std);
    for (float& x : v) x = d(rng);
    t = Tensor(v.data(), DType::f32, Device::cpu, s);
  }
};

void BM_gemm(benchmark::State& st, bool reference) {
  const int64_t M = st.range(0), N = st.range(1), K = st.range(2);
  Host a({M, K}), b({N, K}), c({M, N});
  for (auto _ : st) {
    if (reference)
      cpu::gemm_reference(c.t, a.t, b.t, false, true, 1.0f, 0.0f);
    else
      cpu::gemm(c.t, a.t, b.t, false, true, 1.0f, 0.0f);
  }
  st.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * M * N * K, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
BENCHMARK_CAPTURE(BM_gemm, blas, false)
    ->Args({2048, 128, 128})
    ->Args({2048, 4096, 128})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_gemm, reference, true)->Args({2048, 128, 128})->Unit(benchmark::kMillisecond);

void BM_layernorm(benchmark::State& st) {
  const int64_t N = 2048, C = 128;
  Host out({N, C}), inp({N, C}), w({C}), b({C}), mean({N}), rstd({N});
  for (auto _ : st) cpu::layernorm_forward(out.t, mean.t, rstd.t, inp.t, w.t, b.t, 1e-5f);
  st.SetBytesProcessed(st.iterations() * 2 * N * C * 4);
}
BENCHMARK(BM_layernorm)->Unit(benchmark::kMicrosecond);

void BM_attention_forward(benchmark::State& st) {
  const int64_t B = 16, T = 128, H = 4, D = 32;
  Host q({B, T, H, D}), k({B, T, H, D}), v({B, T, H, D}), out({B, T, H, D}), lse({B, H, T});
  for (auto _ : st) cpu::attention_forward(out.t, lse.t, q.t, k.t, v.t, 0.17f);
  st.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * B * H * T * T * D, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::kIs1000);
}
BENCHMARK(BM_attention_forward)->Unit(benchmark::kMillisecond);

void BM_cross_entropy(benchmark::State& st) {
  const int64_t N = 2048, V = 4096;
  Host logits({N, V}), losses({N}), lse({N});
  std::vector<int32_t> tg(N, 7);
  Tensor targets(tg.data(), DType::i32, Device::cpu, {N});
  for (auto _ : st) {
    cpu::cross_entropy_forward(losses.t, lse.t, logits.t, targets, int(V));
    cpu::cross_entropy_backward(logits.t, logits.t, lse.t, targets, int(V), 1.0f / N);
  }
  st.SetBytesProcessed(st.iterations() * 3 * N * V * 4);
}
BENCHMARK(BM_cross_entropy)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
