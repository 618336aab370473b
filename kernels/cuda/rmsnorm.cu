// CUDA RMSNorm over the last dim: out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps), and
// its backward. Shapes: N rows (leading dims flattened; N = B*T*H for QK-norm), C channels; rstd
// (N) is f32. The kernels are norm_common.cuh's (kHasMean = false), shared with layernorm.cu:
// rows cached in registers (16-byte packs when C and the pointers allow), a streaming kernel for
// wider rows, dweight += through per-block partial sums plus a fixed-order column sum.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/norm_common.cuh"

namespace tessera::cuda {

namespace {

// f32 values per thread cached for one row in the forward. 16, not layernorm.cu's 32: at
// C = 2048 bf16 it picks 128 threads x 2 packs per row, measured faster (84% of copy bandwidth on
// an H200) than 64 x 4 (75%).
constexpr int kForwardElems = 16;

// ---- launchers ------------------------------------------------------------------------------

template <class T, int kWidth>
void forward_impl(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                  int64_t num_rows, int num_c, float eps, cudaStream_t stream) {
  launch_norm_forward<T, kWidth, kForwardElems / kWidth, false>(
      static_cast<T*>(out.data), nullptr, static_cast<float*>(rstd.data),
      static_cast<const T*>(inp.data), static_cast<const T*>(weight.data), nullptr, num_rows, num_c,
      eps, stream);
}

// TW: dweight's dtype (T, or float for an FP32 main gradient).
template <class T, int kWidth, class TW>
void backward_impl(const Tensor& dinp, const Tensor& dweight, const Tensor& dout, const Tensor& inp,
                   const Tensor& weight, const Tensor& rstd, int64_t num_rows, int num_c,
                   cudaStream_t stream) {
  launch_norm_backward<T, kWidth, false>(
      static_cast<TW*>(dweight.data), static_cast<TW*>(nullptr), static_cast<T*>(dinp.data),
      static_cast<const T*>(dout.data), static_cast<const T*>(inp.data),
      static_cast<const T*>(weight.data), nullptr, static_cast<const float*>(rstd.data), num_rows,
      num_c, stream);
}

// 16-byte packs when C divides into them and every row pointer is aligned; else scalars.
bool use_packs(int64_t num_c, int width, std::initializer_list<const Tensor*> tensors) {
  if (num_c % width != 0) return false;
  for (const Tensor* t : tensors)
    if (!is_aligned(t->data)) return false;
  return true;
}

}  // namespace

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps,
                     ops::Stream stream) {
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
      forward_impl<T, kVecWidth<T>>(out, rstd, inp, weight, num_rows, int(num_c), eps,
                                    cuda_stream(stream));
    else
      forward_impl<T, 1>(out, rstd, inp, weight, num_rows, int(num_c), eps, cuda_stream(stream));
  });
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight,
                      Tensor rstd, ops::Stream stream) {
  constexpr const char* kOp = "rmsnorm_backward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., C), got {}", kOp, inp.str());
  const int64_t num_c = inp.dim(-1), num_rows = num_rows_of(inp);
  expect_tensor(dinp, inp.dtype, inp.shape, kOp, "dinp");
  expect_tensor(dout, inp.dtype, inp.shape, kOp, "dout");
  expect_tensor(weight, inp.dtype, Shape{num_c}, kOp, "weight");
  expect_param_grad(dweight, inp.dtype, Shape{num_c}, kOp, "dweight");  // inp's dtype or f32
  expect_tensor(rstd, DType::f32, Shape{num_rows}, kOp, "rstd");
  TS_CHECK(num_c <= (int64_t(1) << 30), "{}: C = {} is too large", kOp, num_c);
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);
  TS_CHECK(!overlaps(dinp, dout), "{}: dinp must not alias dout", kOp);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    dispatch_param_grad<T>(dweight, [&]<class TW>() {
      if (use_packs(num_c, kVecWidth<T>, {&dinp, &dout, &inp, &weight}))
        backward_impl<T, kVecWidth<T>, TW>(dinp, dweight, dout, inp, weight, rstd, num_rows,
                                           int(num_c), cuda_stream(stream));
      else
        backward_impl<T, 1, TW>(dinp, dweight, dout, inp, weight, rstd, num_rows, int(num_c),
                                cuda_stream(stream));
    });
  });
}

}  // namespace tessera::cuda
