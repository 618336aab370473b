// CUDA LayerNorm over the last dim: out = (x - mean) * rstd * weight + bias, and its backward.
// Shapes: N rows (leading dims flattened), C channels; mean and rstd (N) are f32. Each row is
// cached in registers by a warp or a block (memory_bound.cuh's row layouts) with 16-byte packs
// when C and the pointers allow; rows wider than the register layouts take a streaming kernel.
// dweight/dbias accumulate (+=) deterministically: per-block partial sums in the workspace, then
// a column sum in fixed order (no float atomics). Also the out-of-contract
// fused_residual_layernorm_forward (kernels/cuda/fused.h), a template flag of the same kernel.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/fused.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

constexpr int kForwardElems = 32;  // f32 values per thread cached for one row in the forward
// Values per thread in the backward: 3 bf16 packs (a warp covers C = 768) or 4 f32 packs; more
// f32 packs would spill under the 168-register cap of kBackwardMinBlocks.
template <class T> constexpr int kBackwardElems = sizeof(T) == 2 ? 24 : 16;

// ---- kernels ---------------------------------------------------------------------------------

// Two-pass statistics (mean, then the mean of squared deviations) on the register copy. With
// kResidual, the row is first formed as inp + inp2, rounded to T and stored to `residual` (it may
// be inp or inp2: each element is read before the same thread writes it), so the statistics see
// exactly what an unfused add_forward would have written.
template <class T, int kWidth, int kThreads, int kChunks, bool kResidual = false>
__global__ void __launch_bounds__(kRowBlockThreads<kThreads>)
layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                         const T* bias, int64_t num_rows, int num_c, float eps,
                         const T* inp2 = nullptr, T* residual = nullptr) {
  constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
  __shared__ float smem[kRowBlockThreads<kThreads> / 32];
  const int t = threadIdx.x % kThreads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const bool row_ok = row < num_rows;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;

  float x[kChunks][kWidth];
  float sum[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int p = t + k * kThreads;
    if (row_ok && p < num_packs) {
      Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
      if constexpr (kResidual) {
        const Pack<T, kWidth> v2 = load_pack<T, kWidth>(inp2 + row * num_c + p * kWidth);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) v.v[j] = from_f32<T>(to_f32(v.v[j]) + to_f32(v2.v[j]));
        store_pack<T, kWidth>(residual + row * num_c + p * kWidth, v);
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        x[k][j] = to_f32(v.v[j]);
        sum[0] += x[k][j];
      }
    }
  }
  row_sum<kThreads, 1>(sum, smem);
  const float m = sum[0] / num_c;
  float sum_sq[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (row_ok && t + k * kThreads < num_packs) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) sum_sq[0] += (x[k][j] - m) * (x[k][j] - m);
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
      Pack<T, kWidth> b;
      if (bias != nullptr) b = load_pack<T, kWidth>(bias + p * kWidth);
      Pack<T, kWidth> y;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float v = (x[k][j] - m) * s * to_f32(w.v[j]);
        y.v[j] = from_f32<T>(bias != nullptr ? v + to_f32(b.v[j]) : v);
      }
      store_pack<T, kWidth>(o_row + p * kWidth, y);
    }
  }
  if (t == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// Rows too wide for registers: one block of kBlock threads per row, three passes over the row
// (the second and third mostly hit in L1/L2).
template <class T, int kWidth> __global__ void __launch_bounds__(kBlock)
layernorm_forward_wide_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                              const T* bias, int num_c, float eps) {
  __shared__ float smem[kBlock / 32];
  const int64_t row = blockIdx.x;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;
  float sum[1] = {0.0f};
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum[0] += to_f32(v.v[j]);
  }
  row_sum<kBlock, 1>(sum, smem);
  const float m = sum[0] / num_c;
  float sum_sq[1] = {0.0f};
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum_sq[0] += (to_f32(v.v[j]) - m) * (to_f32(v.v[j]) - m);
  }
  row_sum<kBlock, 1>(sum_sq, smem);
  const float s = 1.0f / sqrtf(sum_sq[0] / num_c + eps);
  T* o_row = out + row * num_c;
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
    const Pack<T, kWidth> w = load_pack<T, kWidth>(weight + p * kWidth);
    Pack<T, kWidth> b;
    if (bias != nullptr) b = load_pack<T, kWidth>(bias + p * kWidth);
    Pack<T, kWidth> y;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float n = (to_f32(v.v[j]) - m) * s * to_f32(w.v[j]);
      y.v[j] = from_f32<T>(bias != nullptr ? n + to_f32(b.v[j]) : n);
    }
    store_pack<T, kWidth>(o_row + p * kWidth, y);
  }
  if (threadIdx.x == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight.
// Block b handles row groups b, b + gridDim.x, ... and writes its column sums of dout * norm and
// dout to partial_dw[b, :] and partial_db[b, :]. Each thread owns fixed columns, so its sums stay
// in registers; rows are kept as raw packs (half the registers of f32 copies for bf16), and the
// next row's packs are loaded before the current row is worked on, so loads stay in flight
// through the reductions.
template <class T, int kWidth, int kThreads, int kChunks>
__global__ void __launch_bounds__(kBackwardBlockThreads<kThreads>, kBackwardMinBlocks<kThreads>)
layernorm_backward_kernel(T* dinp, float* partial_dw, float* partial_db, const T* dout,
                          const T* inp, const T* weight, const float* mean, const float* rstd,
                          int64_t num_rows, int num_c) {
  constexpr int kBlockThreads = kBackwardBlockThreads<kThreads>;
  constexpr int kRowsPerBlock = kBlockThreads / kThreads;
  __shared__ float smem[kBlockThreads / 32 * 2];
  const int t = threadIdx.x % kThreads;
  const int group = threadIdx.x / kThreads;
  const int num_packs = num_c / kWidth;

  Pack<T, kWidth> w[kChunks];
  load_row_packs<T, kWidth, kThreads>(w, weight, 0, 1, num_c, t);
  float acc_dw[kChunks][kWidth], acc_db[kChunks][kWidth];
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int j = 0; j < kWidth; ++j) acc_dw[k][j] = acc_db[k][j] = 0.0f;

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
    const float m = row_ok ? mean[row] : 0.0f;
    const float s = row_ok ? rstd[row] : 0.0f;
    float sums[2] = {0.0f, 0.0f};  // sum(dnorm), sum(dnorm * norm)
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (row_ok && t + k * kThreads < num_packs) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float dnorm = to_f32(d[k].v[j]) * to_f32(w[k].v[j]);
          sums[0] += dnorm;
          sums[1] += dnorm * ((to_f32(x[k].v[j]) - m) * s);
        }
      }
    }
    row_sum<kThreads, 2>(sums, smem);
    const float mean_dnorm = sums[0] / num_c, mean_dnorm_norm = sums[1] / num_c;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int p = t + k * kThreads;
      if (row_ok && p < num_packs) {
        Pack<T, kWidth> out;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float dv = to_f32(d[k].v[j]), n = (to_f32(x[k].v[j]) - m) * s;
          acc_dw[k][j] += dv * n;
          acc_db[k][j] += dv;
          out.v[j] = from_f32<T>(s * (dv * to_f32(w[k].v[j]) - mean_dnorm - n * mean_dnorm_norm));
        }
        store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
      }
    }
  }
  store_column_sums<kBlockThreads, kThreads, kChunks, kWidth>(
      acc_dw, partial_dw + int64_t(blockIdx.x) * num_c, num_c);
  store_column_sums<kBlockThreads, kThreads, kChunks, kWidth>(
      acc_db, partial_db + int64_t(blockIdx.x) * num_c, num_c);
}

// Rows too wide for registers: one row at a time per block, two passes; the block's partial rows
// (zeroed by the launcher) are updated in place: each column by one fixed thread, in row order.
template <class T, int kWidth> __global__ void __launch_bounds__(kBlock)
layernorm_backward_wide_kernel(T* dinp, float* partial_dw, float* partial_db, const T* dout,
                               const T* inp, const T* weight, const float* mean,
                               const float* rstd, int64_t num_rows, int num_c) {
  __shared__ float smem[kBlock / 32 * 2];
  const int num_packs = num_c / kWidth;
  float* pdw = partial_dw + int64_t(blockIdx.x) * num_c;
  float* pdb = partial_db + int64_t(blockIdx.x) * num_c;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const float m = mean[row], s = rstd[row];
    const T* x_row = inp + row * num_c;
    const T* d_row = dout + row * num_c;
    float sums[2] = {0.0f, 0.0f};
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float dnorm = to_f32(dv.v[j]) * to_f32(wv.v[j]);
        sums[0] += dnorm;
        sums[1] += dnorm * ((to_f32(xv.v[j]) - m) * s);
      }
    }
    row_sum<kBlock, 2>(sums, smem);
    const float mean_dnorm = sums[0] / num_c, mean_dnorm_norm = sums[1] / num_c;
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
      Pack<T, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float d = to_f32(dv.v[j]), n = (to_f32(xv.v[j]) - m) * s;
        pdw[p * kWidth + j] += d * n;
        pdb[p * kWidth + j] += d;
        out.v[j] = from_f32<T>(s * (d * to_f32(wv.v[j]) - mean_dnorm - n * mean_dnorm_norm));
      }
      store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
    }
  }
}

// ---- launchers ------------------------------------------------------------------------------

template <class T, int kWidth>
void forward_impl(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                  const Tensor& weight, const Tensor& bias, int64_t num_rows, int num_c,
                  float eps) {
  T* o = static_cast<T*>(out.data);
  auto* mu = static_cast<float*>(mean.data);
  auto* rs = static_cast<float*>(rstd.data);
  const auto* x = static_cast<const T*>(inp.data);
  const auto* w = static_cast<const T*>(weight.data);
  const auto* b = bias.empty() ? nullptr : static_cast<const T*>(bias.data);
  constexpr int kMaxChunks = kForwardElems / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
    layernorm_forward_kernel<T, kWidth, kThreads, kChunks>
        <<<ceil_div(num_rows, kRowsPerBlock), kRowBlockThreads<kThreads>, 0, stream()>>>(
            o, mu, rs, x, w, b, num_rows, num_c, eps);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    layernorm_forward_wide_kernel<T, kWidth><<<num_rows, kBlock, 0, stream()>>>(o, mu, rs, x, w, b,
                                                                                num_c, eps);
  }
  TS_CUDA_CHECK_LAUNCH();
}

template <class T, int kWidth>
void backward_impl(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                   const Tensor& dout, const Tensor& inp, const Tensor& weight, const Tensor& mean,
                   const Tensor& rstd, int64_t num_rows, int num_c) {
  T* dx = static_cast<T*>(dinp.data);
  const auto* d = static_cast<const T*>(dout.data);
  const auto* x = static_cast<const T*>(inp.data);
  const auto* w = static_cast<const T*>(weight.data);
  const auto* mu = static_cast<const float*>(mean.data);
  const auto* rs = static_cast<const float*>(rstd.data);
  auto* ws = static_cast<float*>(context().workspace);
  int num_partials = 0;
  constexpr int kMaxChunks = kBackwardElems<T> / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kBackwardBlockThreads<kThreads> / kThreads;
    auto* kernel = layernorm_backward_kernel<T, kWidth, kThreads, kChunks>;
    static const int blocks_per_sm =
        resident_blocks_per_sm(kernel, kBackwardBlockThreads<kThreads>);
    num_partials = num_partial_blocks(ceil_div(num_rows, kRowsPerBlock), 2 * int64_t(num_c),
                                      blocks_per_sm);
    kernel<<<num_partials, kBackwardBlockThreads<kThreads>, 0, stream()>>>(
        dx, ws, ws + int64_t(num_partials) * num_c, d, x, w, mu, rs, num_rows, num_c);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    static const int blocks_per_sm =
        resident_blocks_per_sm(layernorm_backward_wide_kernel<T, kWidth>, kBlock);
    num_partials = num_partial_blocks(num_rows, 2 * int64_t(num_c), blocks_per_sm);
    TS_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * 2 * num_partials * num_c, stream()));
    layernorm_backward_wide_kernel<T, kWidth><<<num_partials, kBlock, 0, stream()>>>(
        dx, ws, ws + int64_t(num_partials) * num_c, d, x, w, mu, rs, num_rows, num_c);
  }
  TS_CUDA_CHECK_LAUNCH();
  launch_column_sum(static_cast<T*>(dweight.data), ws, num_partials, num_c);
  if (!dbias.empty())
    launch_column_sum(static_cast<T*>(dbias.data), ws + int64_t(num_partials) * num_c,
                      num_partials, num_c);
}

// The fused residual + LayerNorm: the register layouts take the kResidual kernel; rows too wide
// for them fall back to the two unfused ops (same results, one more pass over memory).
template <class T, int kWidth>
void fused_impl(const Tensor& residual, const Tensor& out, const Tensor& mean, const Tensor& rstd,
                const Tensor& a, const Tensor& b, const Tensor& weight, const Tensor& bias,
                int64_t num_rows, int num_c, float eps) {
  constexpr int kMaxChunks = kForwardElems / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
    layernorm_forward_kernel<T, kWidth, kThreads, kChunks, true>
        <<<ceil_div(num_rows, kRowsPerBlock), kRowBlockThreads<kThreads>, 0, stream()>>>(
            static_cast<T*>(out.data), static_cast<float*>(mean.data),
            static_cast<float*>(rstd.data), static_cast<const T*>(a.data),
            static_cast<const T*>(weight.data),
            bias.empty() ? nullptr : static_cast<const T*>(bias.data), num_rows, num_c, eps,
            static_cast<const T*>(b.data), static_cast<T*>(residual.data));
    TS_CUDA_CHECK_LAUNCH();
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    add_forward(residual, a, b);
    layernorm_forward(out, mean, rstd, residual, weight, bias, eps);
  }
}

// 16-byte packs when C divides into them and every row pointer is aligned; else scalars.
bool use_packs(int64_t num_c, int width, std::initializer_list<const Tensor*> tensors) {
  if (num_c % width != 0) return false;
  for (const Tensor* t : tensors)
    if (!t->empty() && !is_aligned(t->data)) return false;
  return true;
}

}  // namespace

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                       Tensor bias, float eps) {
  constexpr const char* kOp = "layernorm_forward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(out, inp.dtype, inp.shape, kOp, "out");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  if (!bias.empty()) expect_tensor(bias, inp.dtype, Shape{num_c}, kOp, "bias");
  expect_tensor(mean, DType::f32, Shape{num_rows}, kOp, "mean");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(eps >= 0.0f, "{}: eps must be >= 0, got {}", kOp, eps);
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(out, inp), "{}: out must not alias inp", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    if (use_packs(num_c, kVecWidth<T>, {&out, &inp, &weight, &bias}))
      forward_impl<T, kVecWidth<T>>(out, mean, rstd, inp, weight, bias, num_rows, int(num_c), eps);
    else
      forward_impl<T, 1>(out, mean, rstd, inp, weight, bias, num_rows, int(num_c), eps);
  });
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd) {
  constexpr const char* kOp = "layernorm_backward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(dinp, inp.dtype, inp.shape, kOp, "dinp");
  expect_tensor(dout, inp.dtype, inp.shape, kOp, "dout");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  expect_tensor(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");
  if (!dbias.empty()) expect_tensor(dbias, inp.dtype, Shape{num_c}, kOp, "dbias");
  expect_tensor(mean, DType::f32, Shape{num_rows}, kOp, "mean");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);
  TS_CHECK(!overlaps(dinp, dout), "{}: dinp must not alias dout", kOp);
  TS_CHECK(!overlaps(dweight, dbias), "{}: dweight and dbias must not alias", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    if (use_packs(num_c, kVecWidth<T>, {&dinp, &dout, &inp, &weight}))
      backward_impl<T, kVecWidth<T>>(dinp, dweight, dbias, dout, inp, weight, mean, rstd,
                                     num_rows, int(num_c));
    else
      backward_impl<T, 1>(dinp, dweight, dbias, dout, inp, weight, mean, rstd, num_rows,
                          int(num_c));
  });
}

void fused_residual_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd,
                                      Tensor a, Tensor b, Tensor weight, Tensor bias, float eps) {
  constexpr const char* kOp = "fused_residual_layernorm_forward";
  expect_compute_dtype(a, kOp, "a");
  TS_CHECK(a.ndim() >= 1, "{}: a must be (..., C), got {}", kOp, a.str());
  const int64_t num_c = a.dim(-1), num_rows = num_rows_of(a);
  expect_tensor(b, a.dtype, a.shape, kOp, "b");
  expect_tensor(residual, a.dtype, a.shape, kOp, "residual");
  expect_tensor(out, a.dtype, a.shape, kOp, "out");
  expect_tensor(weight, a.dtype, Shape{num_c}, kOp, "weight");
  if (!bias.empty()) expect_tensor(bias, a.dtype, Shape{num_c}, kOp, "bias");
  expect_tensor(mean, DType::f32, Shape{num_rows}, kOp, "mean");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(eps >= 0.0f, "{}: eps must be >= 0, got {}", kOp, eps);
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(residual, a) || residual.data == a.data, "{}: residual partially overlaps a",
           kOp);
  TS_CHECK(!overlaps(residual, b) || residual.data == b.data, "{}: residual partially overlaps b",
           kOp);
  for (const Tensor* t : {&residual, &a, &b, &weight, &bias, &mean, &rstd})
    TS_CHECK(!overlaps(out, *t), "{}: out must not alias another operand", kOp);
  if (num_rows == 0 || num_c == 0) return;
  // The row layout must be the one layernorm_forward would pick for `residual` (same summation
  // order, same bits); when a or b cannot be read in packs although that layout uses them, the
  // two ops run unfused.
  dispatch_float(a, kOp, [&]<class T>() {
    const bool ln_packs = use_packs(num_c, kVecWidth<T>, {&residual, &out, &weight, &bias});
    if (!ln_packs) {
      fused_impl<T, 1>(residual, out, mean, rstd, a, b, weight, bias, num_rows, int(num_c), eps);
    } else if (use_packs(num_c, kVecWidth<T>, {&a, &b})) {
      fused_impl<T, kVecWidth<T>>(residual, out, mean, rstd, a, b, weight, bias, num_rows,
                                  int(num_c), eps);
    } else {
      add_forward(residual, a, b);
      layernorm_forward(out, mean, rstd, residual, weight, bias, eps);
    }
  });
}

}  // namespace tessera::cuda
