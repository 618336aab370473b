// Bandwidth of the memory-bound CUDA ops (norms, activations, rope, cross-entropy, AdamW, a few
// elementwise helpers) on GPT-2 124M and Llama-1B shapes, against the device-to-device copy
// bandwidth measured in the same run. Each case counts the fewest bytes the op must move (every
// input read once, every output written once; workspace partial sums not counted), times with
// CUDA events after warm-up, takes the median, and rotates input sets so the 50 MB L2 cannot
// hold one call's data from the previous repetition. Random (never zero) data throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench/cuda/bench_util.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

using namespace tessera;

namespace {

using cuda::bench::median_ms;

constexpr double kL2Bytes = 50e6;
constexpr int kWarmup = 3;  // untimed calls before each timing
double g_copy_gbps = 0.0;

// Hash-based pseudo-random values in [lo, hi) (the bench needs variety, not quality).
template <class T>
__global__ void random_kernel(T* x, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = float(h >> 8) * (1.0f / 16777216.0f);
    x[i] = static_cast<T>(lo + (hi - lo) * u);
  }
}
__global__ void random_ints_kernel(int32_t* x, int64_t n, uint32_t seed, int32_t bound) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 2246822519u;
    x[i] = int32_t(h % uint32_t(bound));
  }
}

// A device buffer that lives for the whole program (freed at exit by the driver).
struct Buffer {
  Tensor t;
  Buffer(DType dtype, Shape shape, float lo = -2.0f, float hi = 2.0f) {
    void* p = nullptr;
    TS_CUDA_CHECK(cudaMalloc(&p, dtype_storage_bytes(dtype, shape.numel())));
    t = Tensor(p, dtype, Device::cuda, shape);
    static uint32_t seed = 12345;
    seed += 7919;
    const int64_t n = shape.numel();
    if (dtype == DType::f32)
      random_kernel<<<1024, 256, 0, cuda::cuda_stream({})>>>(static_cast<float*>(p), n, seed, lo,
                                                             hi);
    else if (dtype == DType::bf16)
      random_kernel<<<1024, 256, 0, cuda::cuda_stream({})>>>(static_cast<__nv_bfloat16*>(p), n,
                                                             seed, lo, hi);
    else
      random_ints_kernel<<<1024, 256, 0, cuda::cuda_stream({})>>>(static_cast<int32_t*>(p), n, seed,
                                                                  int32_t(hi));
    TS_CUDA_CHECK_LAUNCH();
  }
  operator Tensor() const { return t; }
};

// Copies of the inputs needed so that consecutive repetitions touch different memory.
int num_sets(double bytes_per_call) {
  return std::clamp(int(4 * kL2Bytes / bytes_per_call) + 1, 1, 8);
}

void report(const std::string& name, const std::string& shape, double bytes, double ms) {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-28s %-34s %10.1f us %8.0f GB/s %6.1f%% of copy\n", name.c_str(), shape.c_str(),
              ms * 1e3, gbps, 100.0 * gbps / g_copy_gbps);
  std::fflush(stdout);
}

std::string dims(std::initializer_list<int64_t> d, DType dtype) {
  std::string s = "(";
  for (int64_t x : d) s += (s.size() > 1 ? ", " : "") + std::to_string(x);
  return s + ") " + std::string(dtype_name(dtype));
}

void bench_copy() {
  const size_t bytes = size_t(1) << 30;
  const double ms = cuda::bench::copy_ms(bytes);
  g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
  report("d2d copy (read+write)", "1 GiB", 2.0 * bytes, ms);
}

void bench_layernorm(int64_t n, int64_t c, DType dtype) {
  const double s = double(dtype_size(dtype));
  const double fwd_bytes = 2 * n * c * s + 2 * c * s + 8.0 * n;
  const double bwd_bytes = 3 * n * c * s + c * s + 8.0 * n + 4 * c * s;
  const int sets = num_sets(fwd_bytes);
  std::vector<Buffer> x, out, mean, rstd, dout, res;
  for (int i = 0; i < sets; ++i) {
    x.emplace_back(dtype, Shape{n, c});
    out.emplace_back(dtype, Shape{n, c});
    mean.emplace_back(DType::f32, Shape{n});
    rstd.emplace_back(DType::f32, Shape{n});
    dout.emplace_back(dtype, Shape{n, c});
    res.emplace_back(dtype, Shape{n, c});
  }
  Buffer w(dtype, {c}), b(dtype, {c}), dw(dtype, {c}), db(dtype, {c});
  const double fwd = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::layernorm_forward(out[k], mean[k], rstd[k], x[k], w, b, 1e-5f);
      },
      kWarmup, 50);
  report("layernorm_forward", dims({n, c}, dtype), fwd_bytes, fwd);
  // dinp goes to out[k] (its old contents are not read).
  const double bwd = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::layernorm_backward(out[k], dw, db, dout[k], x[k], w, mean[k], rstd[k]);
      },
      kWarmup, 50);
  report("layernorm_backward", dims({n, c}, dtype), bwd_bytes, bwd);
  // Residual add + LayerNorm: fused (reads a, b; writes residual, out) and as the two ops.
  const double fused_bytes = 4 * n * c * s + 2 * c * s + 8.0 * n;
  const double fused = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::add_layernorm_forward(res[k], out[k], mean[k], rstd[k], x[k], dout[k], w, b, 1e-5f);
      },
      kWarmup, 50);
  report("fused residual+layernorm", dims({n, c}, dtype), fused_bytes, fused);
  const double unfused = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::add_forward(res[k], x[k], dout[k]);
        cuda::layernorm_forward(out[k], mean[k], rstd[k], res[k], w, b, 1e-5f);
      },
      kWarmup, 50);
  report("add + layernorm (unfused)", dims({n, c}, dtype), fused_bytes, unfused);
}

void bench_rmsnorm(int64_t n, int64_t c, DType dtype) {
  const double s = double(dtype_size(dtype));
  const double fwd_bytes = 2 * n * c * s + c * s + 4.0 * n;
  const double bwd_bytes = 3 * n * c * s + c * s + 4.0 * n + 2 * c * s;
  const int sets = num_sets(fwd_bytes);
  std::vector<Buffer> x, out, rstd, dout;
  for (int i = 0; i < sets; ++i) {
    x.emplace_back(dtype, Shape{n, c});
    out.emplace_back(dtype, Shape{n, c});
    rstd.emplace_back(DType::f32, Shape{n});
    dout.emplace_back(dtype, Shape{n, c});
  }
  Buffer w(dtype, {c}), dw(dtype, {c});
  const double fwd = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::rmsnorm_forward(out[k], rstd[k], x[k], w, 1e-6f);
      },
      kWarmup, 50);
  report("rmsnorm_forward", dims({n, c}, dtype), fwd_bytes, fwd);
  const double bwd = median_ms(
      [&](int r) {
        const int k = r % sets;
        cuda::rmsnorm_backward(out[k], dw, dout[k], x[k], w, rstd[k]);
      },
      kWarmup, 50);
  report("rmsnorm_backward", dims({n, c}, dtype), bwd_bytes, bwd);
}

void bench_rope(int64_t b, int64_t t, int64_t h, int64_t d, DType dtype) {
  const double bytes = 2.0 * b * t * h * d * dtype_size(dtype);
  const int sets = num_sets(bytes);
  std::vector<Buffer> x, out;
  for (int i = 0; i < sets; ++i) {
    x.emplace_back(dtype, Shape{b, t, h, d});
    out.emplace_back(dtype, Shape{b, t, h, d});
  }
  const double ms = median_ms(
      [&](int r) { cuda::rope_forward(out[r % sets], x[r % sets], 10000.0f, 0); }, kWarmup, 50);
  report("rope_forward", dims({b, t, h, d}, dtype), bytes, ms);
}

// kNumIn inputs and one output of n elements each, through `op`.
void bench_elementwise(const std::string& name, int64_t rows, int64_t cols, DType dtype, int num_in,
                       const std::function<void(Tensor, Tensor, Tensor)>& op) {
  const double bytes = double(num_in + 1) * rows * cols * dtype_size(dtype);
  const int sets = num_sets(bytes);
  std::vector<Buffer> a, b, out;
  for (int i = 0; i < sets; ++i) {
    a.emplace_back(dtype, Shape{rows, cols});
    b.emplace_back(dtype, Shape{rows, cols});
    out.emplace_back(dtype, Shape{rows, cols});
  }
  const double ms =
      median_ms([&](int r) { op(out[r % sets], a[r % sets], b[r % sets]); }, kWarmup, 50);
  report(name, dims({rows, cols}, dtype), bytes, ms);
}

void bench_cross_entropy(int64_t n, int64_t width, int vocab, DType dtype) {
  const double s = double(dtype_size(dtype));
  Buffer logits(dtype, {n, width}, -4.0f, 4.0f), targets(DType::i32, {n}, 0.0f, float(vocab));
  Buffer losses(DType::f32, {n}), lse(DType::f32, {n});
  const double fwd_bytes = n * vocab * s + 4.0 * n + 8.0 * n;
  const double bwd_bytes = 2.0 * n * width * s + 8.0 * n;
  // The backward overwrites the logits in place; the numbers change but stay finite and random,
  // which is all the timing needs.
  const double fwd = median_ms(
      [&](int) { cuda::cross_entropy_forward(losses, lse, logits, targets, vocab); }, kWarmup, 10);
  report("cross_entropy_forward", dims({n, width}, dtype), fwd_bytes, fwd);
  const double bwd = median_ms(
      [&](int) {
        cuda::cross_entropy_backward(logits, logits, lse, targets, vocab, 1.0f / float(n));
      },
      kWarmup, 10);
  report("cross_entropy_backward", dims({n, width}, dtype) + " in place", bwd_bytes, bwd);
  const double both = median_ms(
      [&](int) {
        cuda::cross_entropy_forward(losses, lse, logits, targets, vocab);
        cuda::cross_entropy_backward(logits, logits, lse, targets, vocab, 1.0f / float(n));
      },
      kWarmup, 10);
  report("cross_entropy fwd+bwd", dims({n, width}, dtype), fwd_bytes + bwd_bytes, both);
}

void bench_adamw(int64_t n, DType grad_dtype) {
  Buffer p(DType::f32, {n}), g(grad_dtype, {n}, -0.01f, 0.01f), m(DType::f32, {n}, -1e-3f, 1e-3f);
  Buffer v(DType::f32, {n}, 0.0f, 1e-5f);
  const double bytes = n * (6.0 * 4 + 4 + dtype_size(grad_dtype));
  ops::AdamWStep s;
  s.lr = 6e-4f;
  s.weight_decay = 0.1f;
  const double ms = median_ms(
      [&](int r) {
        s.step = r + 1;
        cuda::adamw_update(p, g, m, v, s);
      },
      kWarmup, 20);
  report("adamw_update", dims({n}, grad_dtype) + " grad", bytes, ms);
  // The same parameters as GPT-2's 148 tensors (12 layers x 12 + 4), through one multi launch.
  std::vector<int64_t> sizes = {50304 * 768, 1024 * 768, 768, 768};
  for (int layer = 0; layer < 12; ++layer)
    for (int64_t sz : {768, 768, 3 * 768 * 768, 3 * 768, 768 * 768, 768, 768, 768, 4 * 768 * 768,
                       4 * 768, 4 * 768 * 768, 768})
      sizes.push_back(sz);
  std::vector<ops::AdamWTensors> entries;
  int64_t offset = 0, total = 0;
  for (int64_t sz : sizes) total += (sz + 3) / 4 * 4;
  Buffer mp(DType::f32, {total}), mg(grad_dtype, {total}, -0.01f, 0.01f);
  Buffer mm(DType::f32, {total}, -1e-3f, 1e-3f), mv(DType::f32, {total}, 0.0f, 1e-5f);
  auto slice = [&](const Buffer& b, int64_t off, int64_t len) {
    return Tensor(static_cast<char*>(b.t.data) + off * dtype_size(b.t.dtype), b.t.dtype,
                  Device::cuda, Shape{len});
  };
  for (int64_t sz : sizes) {
    entries.push_back({slice(mp, offset, sz), slice(mg, offset, sz), slice(mm, offset, sz),
                       slice(mv, offset, sz), s});
    offset += (sz + 3) / 4 * 4;
  }
  const double multi_bytes = total * (6.0 * 4 + 4 + dtype_size(grad_dtype));
  const double multi = median_ms(
      [&](int r) {
        for (auto& e : entries) e.step.step = r + 1;
        cuda::adamw_update_multi(entries);
      },
      kWarmup, 20);
  const std::string what = std::to_string(sizes.size()) + " tensors, " + std::to_string(total) +
                           " " + std::string(dtype_name(grad_dtype));
  report("adamw_update_multi", what, multi_bytes, multi);
  const double loop = median_ms(
      [&](int r) {
        for (auto& e : entries) {
          e.step.step = r + 1;
          cuda::adamw_update(e.param, e.grad, e.m, e.v, e.step);
        }
      },
      kWarmup, 20);
  report("adamw_update x148 launches", std::to_string(sizes.size()) + " tensors", multi_bytes,
         loop);
}

void bench_cast(int64_t n) {
  Buffer src(DType::f32, {n});
  Buffer dst(DType::bf16, {n});
  const double ms = median_ms([&](int) { cuda::cast(dst, src); }, kWarmup, 20);
  report("cast f32->bf16", dims({n}, DType::f32), 6.0 * n, ms);
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  TS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  bench_copy();
  // GPT-2 124M: B*T = 32768 rows, C = 768, MLP 3072, vocabulary 50257 padded to 50304.
  for (DType dtype : {DType::bf16, DType::f32}) bench_layernorm(32768, 768, dtype);
  bench_elementwise("gelu_forward", 32768, 3072, DType::bf16, 1,
                    [](Tensor out, Tensor a, Tensor) { cuda::gelu_forward(out, a); });
  bench_elementwise("gelu_backward", 32768, 3072, DType::bf16, 2,
                    [](Tensor out, Tensor a, Tensor b) { cuda::gelu_backward(out, a, b); });
  bench_elementwise("add_forward (residual)", 32768, 768, DType::bf16, 2,
                    [](Tensor out, Tensor a, Tensor b) { cuda::add_forward(out, a, b); });
  // Llama-1B: B*T = 16384 rows (B = 8, T = 2048), C = 2048, F = 8192, 32 heads of 64.
  for (DType dtype : {DType::bf16, DType::f32}) bench_rmsnorm(16384, 2048, dtype);
  bench_rope(8, 2048, 32, 64, DType::bf16);
  bench_rope(8, 2048, 32, 64, DType::f32);
  bench_elementwise("swiglu_forward", 16384, 8192, DType::bf16, 2,
                    [](Tensor out, Tensor a, Tensor b) { cuda::swiglu_forward(out, a, b); });
  bench_cross_entropy(32 * 1024, 50304, 50257, DType::bf16);
  bench_adamw(124'000'000, DType::f32);
  bench_adamw(124'000'000, DType::bf16);
  bench_cast(124'000'000);
  cuda::sync();
  return 0;
}
