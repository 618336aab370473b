// Benchmark of the MoE grouped GEMM (ops::grouped_gemm_forward / _backward, kernels/ops_moe.h) in
// bf16 at two expert shapes, each pass (forward; backward = dgrad + wgrad, dgrad derived as
// backward minus wgrad; wgrad into bf16 and into f32 dw) beside dense bf16 GEMMs of the same FLOPs
// through ops::gemm (cuBLASLt) in the same run:
//   Qwen3-30B-A3B (fine-grained): 16384 tokens x top-8 = 131072 rows over 128 experts, hidden 2048,
//     expert FFN 768: gate/up (K' 2048 -> N' 768) and down (K' 768 -> N' 2048);
//   the seeds' coarse MoE: 16 experts, top-2 of 16384 tokens (32768 rows), hidden 1024, FFN 2816.
// Routings: "balanced" (equal rows per expert) and "imbalanced" (top-k of seeded normal logits
// plus a normal per-expert bias of std 0.3, so popular experts get more rows, as before the load
// balancing loss has evened them out). FLOPs = 2 * rows * N' * K'. Median of CUDA-event-timed
// reps after warm-up; operands are 0.1-1.5 GB, far beyond the L2, so no rotation. Before timing,
// the first and last expert's rows of each pass are checked against ops::gemm on their own.
// Usage: grouped_gemm_bench [--counts FILE]   (FILE: the routings, for bench/torch/grouped_gemm.py)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/ops_moe.h"

namespace {

using tessera::Device;
using tessera::DType;
using tessera::Shape;
using tessera::Tensor;

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}

// A device tensor freed on destruction.
struct Dev {
  Tensor t;
  Dev(DType dtype, Shape shape) {
    void* p = nullptr;
    check(cudaMalloc(&p, std::max<size_t>(tessera::dtype_storage_bytes(dtype, shape.numel()), 16)),
          "cudaMalloc");
    t = Tensor(p, dtype, Device::cuda, shape);
  }
  ~Dev() { cudaFree(t.data); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

// Random bf16 (or f32) contents: a pool of uniform values on [-1, 1) uploaded once, tiled over the
// tensor from pseudo-random pool offsets (random data, not zeros, which run faster).
class Filler {
 public:
  Filler() {
    std::mt19937_64 rng(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> f(kPool);
    std::vector<uint16_t> b(kPool);
    for (size_t i = 0; i < kPool; ++i) f[i] = u(rng), b[i] = tessera::f32_to_bf16_bits(f[i]);
    check(cudaMalloc(&pool_f32_, kPool * 4), "cudaMalloc");
    check(cudaMalloc(&pool_bf16_, kPool * 2), "cudaMalloc");
    check(cudaMemcpy(pool_f32_, f.data(), kPool * 4, cudaMemcpyHostToDevice), "upload");
    check(cudaMemcpy(pool_bf16_, b.data(), kPool * 2, cudaMemcpyHostToDevice), "upload");
  }
  ~Filler() {
    cudaFree(pool_f32_);
    cudaFree(pool_bf16_);
  }
  void fill(const Tensor& t) {
    const size_t elem = t.dtype == DType::f32 ? 4 : 2, n = size_t(t.numel());
    const char* pool = static_cast<const char*>(t.dtype == DType::f32 ? pool_f32_ : pool_bf16_);
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t count = std::min(kChunk, n - i), start = (i * 7919 + 13) % (kPool - kChunk);
      check(cudaMemcpyAsync(static_cast<char*>(t.data) + i * elem, pool + start * elem,
                            count * elem, cudaMemcpyDeviceToDevice),
            "fill");
    }
  }

 private:
  static constexpr size_t kPool = size_t(1) << 24, kChunk = size_t(1) << 22;
  void* pool_f32_ = nullptr;
  void* pool_bf16_ = nullptr;
};

double median_ms(const std::function<void()>& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(start), "record");
    f();
    check(cudaEventRecord(stop), "record");
    check(cudaEventSynchronize(stop), "sync");
    float t = 0.0f;
    check(cudaEventElapsedTime(&t, start, stop), "elapsed");
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Rows per expert of a top-k routing of `tokens` over `experts`.
std::vector<int32_t> route(int64_t tokens, int experts, int topk, bool balanced, uint64_t seed) {
  std::vector<int32_t> counts(experts, 0);
  if (balanced) {
    for (int e = 0; e < experts; ++e)
      counts[e] = int32_t(tokens * topk / experts + (e < tokens * topk % experts ? 1 : 0));
    return counts;
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> bias(experts), logits(experts);
  for (float& b : bias) b = 0.3f * normal(rng);
  std::vector<int> idx(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) logits[e] = normal(rng) + bias[e];
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + topk, idx.end(),
                      [&](int a, int b) { return logits[a] > logits[b]; });
    for (int j = 0; j < topk; ++j) ++counts[idx[j]];
  }
  return counts;
}

std::vector<float> download(const Tensor& t, int64_t begin, int64_t count) {
  std::vector<float> out(count);
  if (t.dtype == DType::f32) {
    check(cudaMemcpy(out.data(), static_cast<const float*>(t.data) + begin, count * 4,
                     cudaMemcpyDeviceToHost),
          "download");
  } else {
    std::vector<uint16_t> b(count);
    check(cudaMemcpy(b.data(), static_cast<const uint16_t*>(t.data) + begin, count * 2,
                     cudaMemcpyDeviceToHost),
          "download");
    for (int64_t i = 0; i < count; ++i) out[i] = tessera::bf16_bits_to_f32(b[i]);
  }
  return out;
}

// ||a - b|| / ||b||; infinite when b is all zeros (degenerate data would prove nothing) or when
// either holds NaN/Inf.
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::isfinite(num) && den > 0.0 ? std::sqrt(num / den) : INFINITY;
}

struct Gemm {
  const char* model;
  const char* name;
  int experts, topk;
  int64_t tokens, kk, nn;  // K' in, N' out
};

int g_failures = 0;

void report_check(const char* what, const Gemm& g, const char* routing, int e, double err,
                  double limit) {
  const bool ok = err <= limit;
  g_failures += ok ? 0 : 1;
  std::printf("check %-14s %-8s %-10s %-12s expert %3d rel_l2 %.2e %s\n", g.model, g.name, routing,
              what, e, err, ok ? "ok" : "FAILED");
}

void run(const Gemm& g, const char* routing, const std::vector<int32_t>& counts, Filler& filler) {
  const int64_t groups = g.experts, nn = g.nn, kk = g.kk;
  std::vector<int32_t> off(groups + 1, 0);
  for (int64_t e = 0; e < groups; ++e) off[e + 1] = off[e] + counts[e];
  const int64_t rows = off.back();
  Dev x(DType::bf16, {rows, kk}), w(DType::bf16, {groups, nn, kk}), y(DType::bf16, {rows, nn});
  Dev dy(DType::bf16, {rows, nn}), dx(DType::bf16, {rows, kk}), dw(DType::bf16, {groups, nn, kk});
  Dev dw32(DType::f32, {groups, nn, kk}), offsets(DType::i32, {groups + 1});
  for (const Dev* d : {&x, &w, &dy, &dw, &dw32}) filler.fill(d->t);
  check(cudaMemcpy(offsets.t.data, off.data(), off.size() * 4, cudaMemcpyHostToDevice), "offsets");

  // Correctness at scale: the first and last expert's rows against ops::gemm (cuBLASLt).
  tessera::ops::grouped_gemm_forward(y.t, x.t, w.t, offsets.t);
  check(cudaMemset(dw32.t.data, 0, dw32.t.nbytes()), "memset");
  tessera::ops::grouped_gemm_backward(dx.t, dw32.t, dy.t, x.t, w.t, offsets.t);
  for (int e : {0, g.experts - 1}) {
    const int64_t r0 = off[e], m = counts[e];
    if (m == 0) continue;
    const auto at = [](const Tensor& t, int64_t row, Shape s) {
      return Tensor(static_cast<char*>(t.data) + row * t.shape[-1] * tessera::dtype_size(t.dtype),
                    t.dtype, Device::cuda, s);
    };
    const Tensor w_e = at(w.t, e * nn, {nn, kk});
    Dev ref_y(DType::bf16, {m, nn}), ref_dx(DType::bf16, {m, kk}), ref_dw(DType::f32, {nn, kk});
    tessera::ops::gemm(ref_y.t, at(x.t, r0, {m, kk}), w_e, false, true, 1.0f, 0.0f);
    tessera::ops::gemm(ref_dx.t, at(dy.t, r0, {m, nn}), w_e, false, false, 1.0f, 0.0f);
    tessera::ops::gemm(ref_dw.t, at(dy.t, r0, {m, nn}), at(x.t, r0, {m, kk}), true, false, 1.0f,
                       0.0f);
    report_check("forward", g, routing, e,
                 rel_l2(download(y.t, r0 * nn, m * nn), download(ref_y.t, 0, m * nn)), 1e-2);
    report_check("dgrad", g, routing, e,
                 rel_l2(download(dx.t, r0 * kk, m * kk), download(ref_dx.t, 0, m * kk)), 1e-2);
    report_check("wgrad f32", g, routing, e,
                 rel_l2(download(dw32.t, e * nn * kk, nn * kk), download(ref_dw.t, 0, nn * kk)),
                 1e-4);
  }

  // Dense GEMMs of the same FLOPs on the same buffers (w[0] as the weight, dw[0] as its gradient).
  // The op has no dgrad-only call (dw is required), so dgrad is timed as the whole backward
  // (dx and a bf16 dw, twice the FLOPs, against dense dgrad + wgrad) and derived as backward
  // minus wgrad.
  const Tensor w0(w.t.data, DType::bf16, Device::cuda, {nn, kk});
  const Tensor dw0(dw.t.data, DType::bf16, Device::cuda, {nn, kk});
  const double flops = 2.0 * double(rows) * double(nn) * double(kk);
  const int reps = std::clamp(int(2e15 / flops), 10, 100);
  struct Pass {
    const char* name;
    std::function<void()> grouped, dense;
  };
  namespace ops = tessera::ops;
  const Pass passes[] = {
      {"forward", [&] { ops::grouped_gemm_forward(y.t, x.t, w.t, offsets.t); },
       [&] { ops::gemm(y.t, x.t, w0, false, true, 1.0f, 0.0f); }},
      {"backward",  // dgrad + wgrad: 2x the FLOPs
       [&] { ops::grouped_gemm_backward(dx.t, dw.t, dy.t, x.t, w.t, offsets.t); },
       [&] {
         ops::gemm(dx.t, dy.t, w0, false, false, 1.0f, 0.0f);
         ops::gemm(dw0, dy.t, x.t, true, false, 1.0f, 1.0f);
       }},
      {"wgrad", [&] { ops::grouped_gemm_backward(Tensor(), dw.t, dy.t, x.t, w.t, offsets.t); },
       [&] { ops::gemm(dw0, dy.t, x.t, true, false, 1.0f, 1.0f); }},
      {"wgrad-f32dw",
       [&] { ops::grouped_gemm_backward(Tensor(), dw32.t, dy.t, x.t, w.t, offsets.t); },
       [&] { ops::gemm(dw0, dy.t, x.t, true, false, 1.0f, 1.0f); }},
  };
  double ms[4], dense_ms[4];
  const auto print = [&](const char* name, double t, double dense_t, double f) {
    std::printf(
        "%-14s %-8s %-10s %-12s R=%-6lld N'=%-5lld K'=%-5lld | grouped %7.3f ms %6.1f TFLOP/s | "
        "dense %7.3f ms %6.1f TFLOP/s | %5.1f%% of dense\n",
        g.model, g.name, routing, name, (long long)rows, (long long)nn, (long long)kk, t,
        f / t * 1e-9, dense_t, f / dense_t * 1e-9, 100.0 * dense_t / t);
  };
  for (int i = 0; i < 4; ++i) {
    ms[i] = median_ms(passes[i].grouped, 3, reps);
    dense_ms[i] = median_ms(passes[i].dense, 3, reps);
    print(passes[i].name, ms[i], dense_ms[i], i == 1 ? 2.0 * flops : flops);
  }
  print("dgrad", ms[1] - ms[2], dense_ms[1] - dense_ms[2], flops);  // backward - wgrad
  check(cudaGetLastError(), "benchmark");
}

}  // namespace

int main(int argc, char** argv) {
  const char* counts_path = nullptr;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--counts") == 0) counts_path = argv[i + 1];
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const Gemm gemms[] = {{"qwen3-30b-a3b", "gate/up", 128, 8, 16384, 2048, 768},
                        {"qwen3-30b-a3b", "down", 128, 8, 16384, 768, 2048},
                        {"coarse-16x2", "up", 16, 2, 16384, 1024, 2816},
                        {"coarse-16x2", "down", 16, 2, 16384, 2816, 1024}};
  std::FILE* out = counts_path ? std::fopen(counts_path, "w") : nullptr;
  Filler filler;
  for (const Gemm& g : gemms) {
    for (bool balanced : {false, true}) {
      const char* routing = balanced ? "balanced" : "imbalanced";
      const std::vector<int32_t> counts = route(g.tokens, g.experts, g.topk, balanced, 7);
      const auto [lo, hi] = std::minmax_element(counts.begin(), counts.end());
      const double mean = double(g.tokens * g.topk) / g.experts;
      std::printf("routing %s %s: rows per expert min %d max %d (max/mean %.2f)\n", g.model,
                  routing, *lo, *hi, *hi / mean);
      if (out) {
        std::fprintf(out, "%s %s %s %lld %lld", g.model, g.name, routing, (long long)g.kk,
                     (long long)g.nn);
        for (int32_t c : counts) std::fprintf(out, " %d", c);
        std::fprintf(out, "\n");
      }
      run(g, routing, counts, filler);
    }
  }
  if (out) std::fclose(out);
  std::printf("checks: %s\n", g_failures == 0 ? "all ok" : "FAILED");
  return g_failures == 0 ? 0 : 1;
}
