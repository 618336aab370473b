// CUDA RMSNorm over the last dim: out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps), and
// its backward. Shapes: N rows (leading dims flattened; N = B*T*H for QK-norm), C channels; rstd
// (N) is f32. Same structure as layernorm.cu: rows cached in registers by a warp or a block
// (16-byte packs when C and the pointers allow), a streaming kernel for rows too wide for that,
// and dweight += through per-block partial sums plus a fixed-order column sum (no float atomics).
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

// f32 values per thread cached for one row in the forward. 16, not layernorm.cu's 32: at
// C = 2048 bf16 it picks 128 threads x 2 packs per row, measured faster (84% of copy bandwidth on
// an H200) than 64 x 4 (75%).
constexpr int kForwardElems = 16;
// Values per thread in the backward: 3 bf16 packs (a warp covers C = 768) or 4 f32 packs; more
// f32 packs would spill under the 168-register cap of kBackwardMinBlocks.
template <class T> constexpr int kBackwardElems = sizeof(T) == 2 ? 24 : 16;

// ---- kernels ---------------------------------------------------------------------------------

template <class T, int kWidth, int kThreads, int kChunks>
__global__ void __launch_bounds__(kRowBlockThreads<kThreads>)
rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const T* weight, int64_t num_rows,
                       int num_c, float eps) {
  constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
  __shared__ float smem[kRowBlockThreads<kThreads> / 32];
  const int t = threadIdx.x % kThreads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const bool row_ok = row < num_rows;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;

  float x[kChunks][kWidth];
  float sum_sq[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int p = t + k * kThreads;
    if (row_ok && p < num_packs) {
      const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        x[k][j] = to_f32(v.v[j]);
        sum_sq[0] += x[k][j] * x[k][j];
      }
    }
  }
  row_sum<kThreads, 1>(sum_sq, smem);
  const float s = 1.0f / sqrtf(sum_sq[0] / num_c + eps);
  if (!row_ok) return;
  T* o_row = out + row * num_c;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int p = t + k * kThreads;
    if (p < num_packs) {
      const Pack<T, kWidth> w = load_pack<T, kWidth>(weight + p * kWidth);
      Pack<T, kWidth> y;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y.v[j] = from_f32<T>(x[k][j] * s * to_f32(w.v[j]));
      store_pack<T, kWidth>(o_row + p * kWidth, y);
    }
  }
  if (t == 0) rstd[row] = s;
}

// Rows too wide for registers: one block of kBlock threads per row, two passes over the row.
template <class T, int kWidth> __global__ void __launch_bounds__(kBlock)
rmsnorm_forward_wide_kernel(T* out, float* rstd, const T* inp, const T* weight, int num_c,
                            float eps) {
  __shared__ float smem[kBlock / 32];
  const int64_t row = blockIdx.x;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;
  float sum_sq[1] = {0.0f};
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum_sq[0] += to_f32(v.v[j]) * to_f32(v.v[j]);
  }
  row_sum<kBlock, 1>(sum_sq, smem);
  const float s = 1.0f / sqrtf(sum_sq[0] / num_c + eps);
  T* o_row = out + row * num_c;
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
    const Pack<T, kWidth> w = load_pack<T, kWidth>(weight + p * kWidth);
    Pack<T, kWidth> y;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) y.v[j] = from_f32<T>(to_f32(v.v[j]) * s * to_f32(w.v[j]));
    store_pack<T, kWidth>(o_row + p * kWidth, y);
  }
  if (threadIdx.x == 0) rstd[row] = s;
}

// dinp = rstd * (dnorm - norm * mean(dnorm * norm)), norm = x * rstd, dnorm = dout * weight.
// Block b handles row groups b, b + gridDim.x, ... and writes its column sums of dout * norm to
// partial_dw[b, :]. As in layernorm.cu: column sums in registers, rows as raw packs, the next
// row's packs loaded before the current row is worked on.
template <class T, int kWidth, int kThreads, int kChunks>
__global__ void __launch_bounds__(kBackwardBlockThreads<kThreads>, kBackwardMinBlocks<kThreads>)
rmsnorm_backward_kernel(T* dinp, float* partial_dw, const T* dout, const T* inp, const T* weight,
                        const float* rstd, int64_t num_rows, int num_c) {
  constexpr int kBlockThreads = kBackwardBlockThreads<kThreads>;
  constexpr int kRowsPerBlock = kBlockThreads / kThreads;
  __shared__ float smem[kBlockThreads / 32];
  const int t = threadIdx.x % kThreads;
  const int group = threadIdx.x / kThreads;
  const int num_packs = num_c / kWidth;

  Pack<T, kWidth> w[kChunks];
  load_row_packs<T, kWidth, kThreads>(w, weight, 0, 1, num_c, t);
  float acc_dw[kChunks][kWidth];
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int j = 0; j < kWidth; ++j) acc_dw[k][j] = 0.0f;

  const int64_t row_stride = int64_t(gridDim.x) * kRowsPerBlock;
  int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + group;
  Pack<T, kWidth> x_next[kChunks], d_next[kChunks];
  load_row_packs<T, kWidth, kThreads>(x_next, inp, row, num_rows, num_c, t);
  load_row_packs<T, kWidth, kThreads>(d_next, dout, row, num_rows, num_c, t);

  // The loop bound is uniform across the block, so row_sum's barriers are reached by all.
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < num_rows;
       base += row_stride, row += row_stride) {
    const bool row_ok = row < num_rows;
    Pack<T, kWidth> x[kChunks], d[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      x[k] = x_next[k];
      d[k] = d_next[k];
    }
    load_row_packs<T, kWidth, kThreads>(x_next, inp, row + row_stride, num_rows, num_c, t);
    load_row_packs<T, kWidth, kThreads>(d_next, dout, row + row_stride, num_rows, num_c, t);
    const float s = row_ok ? rstd[row] : 0.0f;
    float sum_dnorm_norm[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (row_ok && t + k * kThreads < num_packs) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j)
          sum_dnorm_norm[0] += to_f32(d[k].v[j]) * to_f32(w[k].v[j]) * (to_f32(x[k].v[j]) * s);
      }
    }
    row_sum<kThreads, 1>(sum_dnorm_norm, smem);
    const float mean_dnorm_norm = sum_dnorm_norm[0] / num_c;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int p = t + k * kThreads;
      if (row_ok && p < num_packs) {
        Pack<T, kWidth> out;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float dv = to_f32(d[k].v[j]), n = to_f32(x[k].v[j]) * s;
          acc_dw[k][j] += dv * n;
          out.v[j] = from_f32<T>(s * (dv * to_f32(w[k].v[j]) - n * mean_dnorm_norm));
        }
        store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
      }
    }
  }
  store_column_sums<kBlockThreads, kThreads, kChunks, kWidth>(
      acc_dw, partial_dw + int64_t(blockIdx.x) * num_c, num_c);
}

// Rows too wide for registers: one row at a time per block, two passes; the block's partial row
// (zeroed by the launcher) is updated in place: each column by one fixed thread, in row order.
template <class T, int kWidth> __global__ void __launch_bounds__(kBlock)
rmsnorm_backward_wide_kernel(T* dinp, float* partial_dw, const T* dout, const T* inp,
                             const T* weight, const float* rstd, int64_t num_rows, int num_c) {
  __shared__ float smem[kBlock / 32];
  const int num_packs = num_c / kWidth;
  float* pdw = partial_dw + int64_t(blockIdx.x) * num_c;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const float s = rstd[row];
    const T* x_row = inp + row * num_c;
    const T* d_row = dout + row * num_c;
    float sum_dnorm_norm[1] = {0.0f};
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j)
        sum_dnorm_norm[0] += to_f32(dv.v[j]) * to_f32(wv.v[j]) * (to_f32(xv.v[j]) * s);
    }
    row_sum<kBlock, 1>(sum_dnorm_norm, smem);
    const float mean_dnorm_norm = sum_dnorm_norm[0] / num_c;
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
      Pack<T, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float d = to_f32(dv.v[j]), n = to_f32(xv.v[j]) * s;
        pdw[p * kWidth + j] += d * n;
        out.v[j] = from_f32<T>(s * (d * to_f32(wv.v[j]) - n * mean_dnorm_norm));
      }
      store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
    }
  }
}

// ---- launchers ------------------------------------------------------------------------------

template <class T, int kWidth>
void forward_impl(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                  int64_t num_rows, int num_c, float eps) {
  T* o = static_cast<T*>(out.data);
  auto* rs = static_cast<float*>(rstd.data);
  const auto* x = static_cast<const T*>(inp.data);
  const auto* w = static_cast<const T*>(weight.data);
  constexpr int kMaxChunks = kForwardElems / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
    rmsnorm_forward_kernel<T, kWidth, kThreads, kChunks>
        <<<ceil_div(num_rows, kRowsPerBlock), kRowBlockThreads<kThreads>, 0, stream()>>>(
            o, rs, x, w, num_rows, num_c, eps);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits)
    rmsnorm_forward_wide_kernel<T, kWidth><<<num_rows, kBlock, 0, stream()>>>(o, rs, x, w, num_c,
                                                                              eps);
  TS_CUDA_CHECK_LAUNCH();
}

template <class T, int kWidth>
void backward_impl(const Tensor& dinp, const Tensor& dweight, const Tensor& dout,
                   const Tensor& inp, const Tensor& weight, const Tensor& rstd, int64_t num_rows,
                   int num_c) {
  T* dx = static_cast<T*>(dinp.data);
  const auto* d = static_cast<const T*>(dout.data);
  const auto* x = static_cast<const T*>(inp.data);
  const auto* w = static_cast<const T*>(weight.data);
  const auto* rs = static_cast<const float*>(rstd.data);
  auto* ws = static_cast<float*>(context().workspace);
  int num_partials = 0;
  constexpr int kMaxChunks = kBackwardElems<T> / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kBackwardBlockThreads<kThreads> / kThreads;
    auto* kernel = rmsnorm_backward_kernel<T, kWidth, kThreads, kChunks>;
    static const int blocks_per_sm =
        resident_blocks_per_sm(kernel, kBackwardBlockThreads<kThreads>);
    num_partials = num_partial_blocks(ceil_div(num_rows, kRowsPerBlock), num_c, blocks_per_sm);
    kernel<<<num_partials, kBackwardBlockThreads<kThreads>, 0, stream()>>>(dx, ws, d, x, w, rs,
                                                                      num_rows, num_c);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    static const int blocks_per_sm =
        resident_blocks_per_sm(rmsnorm_backward_wide_kernel<T, kWidth>, kBlock);
    num_partials = num_partial_blocks(num_rows, num_c, blocks_per_sm);
    TS_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * num_partials * num_c, stream()));
    rmsnorm_backward_wide_kernel<T, kWidth><<<num_partials, kBlock, 0, stream()>>>(
        dx, ws, d, x, w, rs, num_rows, num_c);
  }
  TS_CUDA_CHECK_LAUNCH();
  launch_column_sum(static_cast<T*>(dweight.data), ws, num_partials, num_c);
}

// 16-byte packs when C divides into them and every row pointer is aligned; else scalars.
bool use_packs(int64_t num_c, int width, std::initializer_list<const Tensor*> tensors) {
  if (num_c % width != 0) return false;
  for (const Tensor* t : tensors)
    if (!is_aligned(t->data)) return false;
  return true;
}

}  // namespace

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps) {
  constexpr const char* kOp = "rmsnorm_forward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(out, inp.dtype, inp.shape, kOp, "out");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(eps >= 0.0f, "{}: eps must be >= 0, got {}", kOp, eps);
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(out, inp), "{}: out must not alias inp", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    if (use_packs(num_c, kVecWidth<T>, {&out, &inp, &weight}))
      forward_impl<T, kVecWidth<T>>(out, rstd, inp, weight, num_rows, int(num_c), eps);
    else
      forward_impl<T, 1>(out, rstd, inp, weight, num_rows, int(num_c), eps);
  });
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight,
                      Tensor rstd) {
  constexpr const char* kOp = "rmsnorm_backward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(dinp, inp.dtype, inp.shape, kOp, "dinp");
  expect_tensor(dout, inp.dtype, inp.shape, kOp, "dout");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  expect_tensor(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);
  TS_CHECK(!overlaps(dinp, dout), "{}: dinp must not alias dout", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    if (use_packs(num_c, kVecWidth<T>, {&dinp, &dout, &inp, &weight}))
      backward_impl<T, kVecWidth<T>>(dinp, dweight, dout, inp, weight, rstd, num_rows,
                                     int(num_c));
    else
      backward_impl<T, 1>(dinp, dweight, dout, inp, weight, rstd, num_rows, int(num_c));
  });
}

}  // namespace tessera::cuda
