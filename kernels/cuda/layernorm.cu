// CUDA LayerNorm over the last dim: out = (x - mean) * rstd * weight + bias, and its backward.
// Shapes: N rows (leading dims flattened), C channels; mean and rstd (N) are f32. The kernels are
// norm_common.cuh's (kHasMean), shared with RMSNorm: rows cached in registers with 16-byte packs
// when C and the pointers allow, a streaming kernel for wider rows, dweight/dbias += through
// per-block partial sums and a fixed-order column sum. This file checks arguments and picks the
// layout; also the contract's fused add_layernorm_forward (residual update + next norm in one
// pass, bit for bit add_forward followed by layernorm_forward).
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/norm_common.cuh"

namespace tessera::cuda {

namespace {

constexpr int kForwardElems = 32;  // f32 values per thread cached for one row in the forward

// ---- launchers ------------------------------------------------------------------------------

template <class T, int kWidth>
void forward_impl(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                  const Tensor& weight, const Tensor& bias, int64_t num_rows, int num_c, float eps,
                  cudaStream_t stream) {
  launch_norm_forward<T, kWidth, kForwardElems / kWidth, true>(
      static_cast<T*>(out.data), static_cast<float*>(mean.data), static_cast<float*>(rstd.data),
      static_cast<const T*>(inp.data), static_cast<const T*>(weight.data),
      bias.empty() ? nullptr : static_cast<const T*>(bias.data), num_rows, num_c, eps, stream);
}

// TW: the dtype of dweight and dbias (T, or float for FP32 main gradients).
template <class T, int kWidth, class TW>
void backward_impl(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                   const Tensor& dout, const Tensor& inp, const Tensor& weight, const Tensor& mean,
                   const Tensor& rstd, int64_t num_rows, int num_c, cudaStream_t stream) {
  launch_norm_backward<T, kWidth, true>(
      static_cast<TW*>(dweight.data), dbias.empty() ? nullptr : static_cast<TW*>(dbias.data),
      static_cast<T*>(dinp.data), static_cast<const T*>(dout.data), static_cast<const T*>(inp.data),
      static_cast<const T*>(weight.data), static_cast<const float*>(mean.data),
      static_cast<const float*>(rstd.data), num_rows, num_c, stream);
}

// The fused residual + LayerNorm: the register layouts take the kResidual kernel; rows too wide
// for them fall back to the two unfused ops (same results, one more pass over memory).
template <class T, int kWidth>
void fused_impl(const Tensor& residual, const Tensor& out, const Tensor& mean, const Tensor& rstd,
                const Tensor& a, const Tensor& b, const Tensor& weight, const Tensor& bias,
                int64_t num_rows, int num_c, float eps, ops::Stream stream) {
  constexpr int kMaxChunks = kForwardElems / kWidth;
  auto launch = [&]<int kThreads, int kChunks>() {
    constexpr int kRowsPerBlock = kRowBlockThreads<kThreads> / kThreads;
    norm_forward_kernel<T, kWidth, kThreads, kChunks, true, true>
        <<<ceil_div(num_rows, kRowsPerBlock), kRowBlockThreads<kThreads>, 0, cuda_stream(stream)>>>(
            static_cast<T*>(out.data), static_cast<float*>(mean.data),
            static_cast<float*>(rstd.data), static_cast<const T*>(a.data),
            static_cast<const T*>(weight.data),
            bias.empty() ? nullptr : static_cast<const T*>(bias.data), num_rows, num_c, eps,
            static_cast<const T*>(b.data), static_cast<T*>(residual.data));
    TS_CUDA_CHECK_LAUNCH();
  };
  const bool fits = dispatch_row_layout<kMaxChunks>(num_c / kWidth, launch);
  if (!fits) {
    add_forward(residual, a, b, stream);
    layernorm_forward(out, mean, rstd, residual, weight, bias, eps, stream);
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

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias,
                       float eps, ops::Stream stream) {
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
      forward_impl<T, kVecWidth<T>>(out, mean, rstd, inp, weight, bias, num_rows, int(num_c), eps,
                                    cuda_stream(stream));
    else
      forward_impl<T, 1>(out, mean, rstd, inp, weight, bias, num_rows, int(num_c), eps,
                         cuda_stream(stream));
  });
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd, ops::Stream stream) {
  constexpr const char* kOp = "layernorm_backward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(dinp, inp.dtype, inp.shape, kOp, "dinp");
  expect_tensor(dout, inp.dtype, inp.shape, kOp, "dout");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  // dweight and dbias: inp's dtype or f32 (FP32 main gradients), one dtype for both.
  expect_param_grad(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");
  if (!dbias.empty()) expect_tensor(dbias, dweight.dtype, Shape{num_c}, kOp, "dbias");
  expect_tensor(mean, DType::f32, Shape{num_rows}, kOp, "mean");
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);
  TS_CHECK(!overlaps(dinp, dout), "{}: dinp must not alias dout", kOp);
  TS_CHECK(!overlaps(dweight, dbias), "{}: dweight and dbias must not alias", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    dispatch_param_grad<T>(dweight, [&]<class TW>() {
      if (use_packs(num_c, kVecWidth<T>, {&dinp, &dout, &inp, &weight}))
        backward_impl<T, kVecWidth<T>, TW>(dinp, dweight, dbias, dout, inp, weight, mean, rstd,
                                           num_rows, int(num_c), cuda_stream(stream));
      else
        backward_impl<T, 1, TW>(dinp, dweight, dbias, dout, inp, weight, mean, rstd, num_rows,
                                int(num_c), cuda_stream(stream));
    });
  });
}

void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps, ops::Stream stream) {
  constexpr const char* kOp = "add_layernorm_forward";
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
      fused_impl<T, 1>(residual, out, mean, rstd, a, b, weight, bias, num_rows, int(num_c), eps,
                       stream);
    } else if (use_packs(num_c, kVecWidth<T>, {&a, &b})) {
      fused_impl<T, kVecWidth<T>>(residual, out, mean, rstd, a, b, weight, bias, num_rows,
                                  int(num_c), eps, stream);
    } else {
      add_forward(residual, a, b, stream);
      layernorm_forward(out, mean, rstd, residual, weight, bias, eps, stream);
    }
  });
}

}  // namespace tessera::cuda
