// The row-norm kernels shared by layernorm.cu (kHasMean: norm = (x - mean) * rstd, a bias) and
// rmsnorm.cu (norm = x * rstd, no bias): forward and backward, each a register-row kernel, a
// streaming kernel for wide rows and a launcher. Each kHasMean branch keeps its norm's own
// expressions in its own order, so results are those of two separate kernels, bit for bit. Not a
// public API: included by those two files only; their entry points check the arguments.
#pragma once
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

// norm = (x - mean) * rstd, or x * rstd without a mean: the expressions of the separate kernels.
template <bool kHasMean>
__device__ __forceinline__ float norm_value(float x, float m, float s) {
  if constexpr (kHasMean)
    return (x - m) * s;
  else
    return x * s;
}

// ---- forward ---------------------------------------------------------------------------------

// Whether the forward adds a bias: RMSNorm never does (its bias argument is ignored).
template <bool kHasMean, class T>
__device__ __forceinline__ bool uses_bias(const T* bias) {
  if constexpr (kHasMean)
    return bias != nullptr;
  else
    return false;
}

// The first pass sums x (kHasMean) or x^2 (RMSNorm); with kHasMean a second pass on the register
// copy sums the squared deviations from the mean (two-pass statistics). With kResidual
// (LayerNorm only), the row is first formed as inp + inp2, rounded to T and stored to `residual`
// (it may be inp or inp2: each element is read before the same thread writes it), so the
// statistics see exactly what an unfused add_forward would have written. mean and bias are unused
// without kHasMean; bias may be null.
template <class T, int kWidth, int kThreads, int kChunks, bool kHasMean, bool kResidual = false>
__global__ void __launch_bounds__(kRowBlockThreads<kThreads>)
    norm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                        const T* bias, int64_t num_rows, int num_c, float eps,
                        const T* inp2 = nullptr, T* residual = nullptr) {
  static_assert(kHasMean || !kResidual, "the fused residual exists for LayerNorm only");
  constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
  __shared__ float smem[kRowBlockThreads<kThreads> / 32];
  const int t = threadIdx.x % kThreads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const bool row_ok = row < num_rows;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;

  float x[kChunks][kWidth];
  float sum[1] = {0.0f};  // sum(x) with kHasMean, else sum(x^2)
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
        if constexpr (kHasMean)
          sum[0] += x[k][j];
        else
          sum[0] += x[k][j] * x[k][j];
      }
    }
  }
  row_sum<kThreads, 1>(sum, smem);
  float m = 0.0f, sum_sq = sum[0];
  if constexpr (kHasMean) {
    m = sum[0] / num_c;
    float dev_sq[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (row_ok && t + k * kThreads < num_packs) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) dev_sq[0] += (x[k][j] - m) * (x[k][j] - m);
      }
    }
    row_sum<kThreads, 1>(dev_sq, smem);
    sum_sq = dev_sq[0];
  }
  const float s = 1.0f / sqrtf(sum_sq / num_c + eps);
  if (!row_ok) return;
  T* o_row = out + row * num_c;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int p = t + k * kThreads;
    if (p < num_packs) {
      const Pack<T, kWidth> w = load_pack<T, kWidth>(weight + p * kWidth);
      Pack<T, kWidth> b;
      if (uses_bias<kHasMean>(bias)) b = load_pack<T, kWidth>(bias + p * kWidth);
      Pack<T, kWidth> y;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float v = norm_value<kHasMean>(x[k][j], m, s) * to_f32(w.v[j]);
        y.v[j] = from_f32<T>(uses_bias<kHasMean>(bias) ? v + to_f32(b.v[j]) : v);
      }
      store_pack<T, kWidth>(o_row + p * kWidth, y);
    }
  }
  if (t == 0) {
    if constexpr (kHasMean) mean[row] = m;
    rstd[row] = s;
  }
}

// Rows too wide for registers: one block of kBlock threads per row, one pass over the row per
// statistic plus one for the output (the later passes mostly hit in L1/L2).
template <class T, int kWidth, bool kHasMean>
__global__ void __launch_bounds__(kBlock)
    norm_forward_wide_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                             const T* bias, int num_c, float eps) {
  __shared__ float smem[kBlock / 32];
  const int64_t row = blockIdx.x;
  const int num_packs = num_c / kWidth;
  const T* x_row = inp + row * num_c;
  float sum[1] = {0.0f};  // sum(x) with kHasMean, else sum(x^2)
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      if constexpr (kHasMean)
        sum[0] += to_f32(v.v[j]);
      else
        sum[0] += to_f32(v.v[j]) * to_f32(v.v[j]);
    }
  }
  row_sum<kBlock, 1>(sum, smem);
  float m = 0.0f, sum_sq = sum[0];
  if constexpr (kHasMean) {
    m = sum[0] / num_c;
    float dev_sq[1] = {0.0f};
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) dev_sq[0] += (to_f32(v.v[j]) - m) * (to_f32(v.v[j]) - m);
    }
    row_sum<kBlock, 1>(dev_sq, smem);
    sum_sq = dev_sq[0];
  }
  const float s = 1.0f / sqrtf(sum_sq / num_c + eps);
  T* o_row = out + row * num_c;
  for (int p = threadIdx.x; p < num_packs; p += kBlock) {
    const Pack<T, kWidth> v = load_pack<T, kWidth>(x_row + p * kWidth);
    const Pack<T, kWidth> w = load_pack<T, kWidth>(weight + p * kWidth);
    Pack<T, kWidth> b;
    if (uses_bias<kHasMean>(bias)) b = load_pack<T, kWidth>(bias + p * kWidth);
    Pack<T, kWidth> y;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float n = norm_value<kHasMean>(to_f32(v.v[j]), m, s) * to_f32(w.v[j]);
      y.v[j] = from_f32<T>(uses_bias<kHasMean>(bias) ? n + to_f32(b.v[j]) : n);
    }
    store_pack<T, kWidth>(o_row + p * kWidth, y);
  }
  if (threadIdx.x == 0) {
    if constexpr (kHasMean) mean[row] = m;
    rstd[row] = s;
  }
}

// The register layout with up to kMaxChunks packs per thread when a row fits, else the streaming
// kernel. mean and bias may be null (and are without kHasMean).
template <class T, int kWidth, int kMaxChunks, bool kHasMean>
void launch_norm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                         const T* bias, int64_t num_rows, int num_c, float eps,
                         cudaStream_t stream) {
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
    norm_forward_kernel<T, kWidth, kThreads, kChunks, kHasMean>
        <<<ceil_div(num_rows, kRowsPerBlock), kRowBlockThreads<kThreads>, 0, stream>>>(
            out, mean, rstd, inp, weight, bias, num_rows, num_c, eps);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    norm_forward_wide_kernel<T, kWidth, kHasMean>
        <<<num_rows, kBlock, 0, stream>>>(out, mean, rstd, inp, weight, bias, num_c, eps);
  }
  TS_CUDA_CHECK_LAUNCH();
}

// ---- backward --------------------------------------------------------------------------------

// Values per thread in the backward: 3 16-bit packs (a warp covers C = 768) or 4 f32 packs; more
// f32 packs would spill under the 168-register cap of kBackwardMinBlocks.
template <class T>
constexpr int kNormBackwardElems = sizeof(T) == 2 ? 24 : 16;

// Row sums per row and partial rows per block: sum(dnorm) (kHasMean only), sum(dnorm * norm).
template <bool kHasMean>
constexpr int kNormNumSums = kHasMean ? 2 : 1;

// dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) with a mean; without one the
// mean(dnorm) term is absent (not subtracted as zero: the expression stays the RMSNorm one).
template <bool kHasMean>
__device__ __forceinline__ float norm_dinp(float d, float w, float n, float s, float mean_dnorm,
                                           float mean_dnorm_norm) {
  if constexpr (kHasMean)
    return s * (d * w - mean_dnorm - n * mean_dnorm_norm);
  else
    return s * (d * w - n * mean_dnorm_norm);
}

// dnorm = dout * weight. Block b handles row groups b, b + gridDim.x, ... and writes its column
// sums of dout * norm to partial_dw[b, :] (and of dout to partial_db[b, :] with kHasMean; mean and
// partial_db are unused without). Each thread owns fixed columns, so its sums stay in registers;
// rows are kept as raw packs (half the registers of f32 copies for 16-bit types), and the next
// row's packs are loaded before the current row is worked on, so loads stay in flight through the
// reductions.
template <class T, int kWidth, int kThreads, int kChunks, bool kHasMean>
__global__ void __launch_bounds__(kBackwardBlockThreads<kThreads>, kBackwardMinBlocks<kThreads>)
    norm_backward_kernel(T* dinp, float* partial_dw, float* partial_db, const T* dout, const T* inp,
                         const T* weight, const float* mean, const float* rstd, int64_t num_rows,
                         int num_c) {
  constexpr int kBlockThreads = kBackwardBlockThreads<kThreads>;
  constexpr int kRowsPerBlock = kBlockThreads / kThreads;
  constexpr int kNumSums = kNormNumSums<kHasMean>;
  __shared__ float smem[kBlockThreads / 32 * kNumSums];
  const int t = threadIdx.x % kThreads;
  const int group = threadIdx.x / kThreads;
  const int num_packs = num_c / kWidth;

  Pack<T, kWidth> w[kChunks];
  load_row_packs<T, kWidth, kThreads>(w, weight, 0, 1, num_c, t);
  float acc_dw[kChunks][kWidth], acc_db[kChunks][kWidth];  // acc_db: unused without kHasMean
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
    float m = 0.0f;
    if constexpr (kHasMean) m = row_ok ? mean[row] : 0.0f;
    const float s = row_ok ? rstd[row] : 0.0f;
    float sums[kNumSums] = {};  // [sum(dnorm),] sum(dnorm * norm)
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (row_ok && t + k * kThreads < num_packs) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float dnorm = to_f32(d[k].v[j]) * to_f32(w[k].v[j]);
          if constexpr (kHasMean) sums[0] += dnorm;
          sums[kNumSums - 1] += dnorm * norm_value<kHasMean>(to_f32(x[k].v[j]), m, s);
        }
      }
    }
    row_sum<kThreads, kNumSums>(sums, smem);
    const float mean_dnorm = kHasMean ? sums[0] / num_c : 0.0f;
    const float mean_dnorm_norm = sums[kNumSums - 1] / num_c;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int p = t + k * kThreads;
      if (row_ok && p < num_packs) {
        Pack<T, kWidth> out;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float dv = to_f32(d[k].v[j]), n = norm_value<kHasMean>(to_f32(x[k].v[j]), m, s);
          acc_dw[k][j] += dv * n;
          if constexpr (kHasMean) acc_db[k][j] += dv;
          out.v[j] = from_f32<T>(
              norm_dinp<kHasMean>(dv, to_f32(w[k].v[j]), n, s, mean_dnorm, mean_dnorm_norm));
        }
        store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
      }
    }
  }
  store_column_sums<kBlockThreads, kThreads, kChunks, kWidth>(
      acc_dw, partial_dw + int64_t(blockIdx.x) * num_c, num_c);
  if constexpr (kHasMean)
    store_column_sums<kBlockThreads, kThreads, kChunks, kWidth>(
        acc_db, partial_db + int64_t(blockIdx.x) * num_c, num_c);
}

// Rows too wide for registers: one row at a time per block, two passes; the block's partial rows
// (zeroed by the launcher) are updated in place: each column by one fixed thread, in row order.
template <class T, int kWidth, bool kHasMean>
__global__ void __launch_bounds__(kBlock)
    norm_backward_wide_kernel(T* dinp, float* partial_dw, float* partial_db, const T* dout,
                              const T* inp, const T* weight, const float* mean, const float* rstd,
                              int64_t num_rows, int num_c) {
  constexpr int kNumSums = kNormNumSums<kHasMean>;
  __shared__ float smem[kBlock / 32 * kNumSums];
  const int num_packs = num_c / kWidth;
  float* pdw = partial_dw + int64_t(blockIdx.x) * num_c;
  float* pdb = kHasMean ? partial_db + int64_t(blockIdx.x) * num_c : nullptr;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    float m = 0.0f;
    if constexpr (kHasMean) m = mean[row];
    const float s = rstd[row];
    const T* x_row = inp + row * num_c;
    const T* d_row = dout + row * num_c;
    float sums[kNumSums] = {};
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float dnorm = to_f32(dv.v[j]) * to_f32(wv.v[j]);
        if constexpr (kHasMean) sums[0] += dnorm;
        sums[kNumSums - 1] += dnorm * norm_value<kHasMean>(to_f32(xv.v[j]), m, s);
      }
    }
    row_sum<kBlock, kNumSums>(sums, smem);
    const float mean_dnorm = kHasMean ? sums[0] / num_c : 0.0f;
    const float mean_dnorm_norm = sums[kNumSums - 1] / num_c;
    for (int p = threadIdx.x; p < num_packs; p += kBlock) {
      const Pack<T, kWidth> xv = load_pack<T, kWidth>(x_row + p * kWidth);
      const Pack<T, kWidth> dv = load_pack<T, kWidth>(d_row + p * kWidth);
      const Pack<T, kWidth> wv = load_pack<T, kWidth>(weight + p * kWidth);
      Pack<T, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float d = to_f32(dv.v[j]), n = norm_value<kHasMean>(to_f32(xv.v[j]), m, s);
        pdw[p * kWidth + j] += d * n;
        if constexpr (kHasMean) pdb[p * kWidth + j] += d;
        out.v[j] =
            from_f32<T>(norm_dinp<kHasMean>(d, to_f32(wv.v[j]), n, s, mean_dnorm, mean_dnorm_norm));
      }
      store_pack<T, kWidth>(dinp + row * num_c + p * kWidth, out);
    }
  }
}

// Launches the backward (register layout when a row fits, else the streaming kernel), then the
// fixed-order column sums into dweight and, when dbias is not null (kHasMean only), dbias. The
// partial rows live in the context workspace: kNormNumSums (N_p, C) blocks, N_p = num_partials.
// TW, the parameter gradients' dtype, is T or float (FP32 main gradients beside 16-bit
// activations): the f32 partial sums are added to them either way, rounded once to TW.
template <class T, int kWidth, bool kHasMean, class TW>
void launch_norm_backward(TW* dweight, TW* dbias, T* dinp, const T* dout, const T* inp,
                          const T* weight, const float* mean, const float* rstd, int64_t num_rows,
                          int num_c, cudaStream_t stream) {
  constexpr int kNumSums = kNormNumSums<kHasMean>;
  auto* ws = static_cast<float*>(context().workspace);
  int num_partials = 0;
  constexpr int kMaxChunks = kNormBackwardElems<T> / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kBackwardBlockThreads<kThreads> / kThreads;
    auto* kernel = norm_backward_kernel<T, kWidth, kThreads, kChunks, kHasMean>;
    static const int blocks_per_sm =
        resident_blocks_per_sm(kernel, kBackwardBlockThreads<kThreads>);
    num_partials = num_partial_blocks(ceil_div(num_rows, kRowsPerBlock), kNumSums * int64_t(num_c),
                                      blocks_per_sm);
    kernel<<<num_partials, kBackwardBlockThreads<kThreads>, 0, stream>>>(
        dinp, ws, ws + int64_t(num_partials) * num_c, dout, inp, weight, mean, rstd, num_rows,
        num_c);
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    static const int blocks_per_sm =
        resident_blocks_per_sm(norm_backward_wide_kernel<T, kWidth, kHasMean>, kBlock);
    num_partials = num_partial_blocks(num_rows, kNumSums * int64_t(num_c), blocks_per_sm);
    TS_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * kNumSums * num_partials * num_c, stream));
    norm_backward_wide_kernel<T, kWidth, kHasMean>
        <<<num_partials, kBlock, 0, stream>>>(dinp, ws, ws + int64_t(num_partials) * num_c, dout,
                                              inp, weight, mean, rstd, num_rows, num_c);
  }
  TS_CUDA_CHECK_LAUNCH();
  launch_column_sum(dweight, ws, num_partials, num_c, stream);
  if (kHasMean && dbias != nullptr)
    launch_column_sum(dbias, ws + int64_t(num_partials) * num_c, num_partials, num_c, stream);
}

}  // namespace tessera::cuda
