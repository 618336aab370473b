// Shared by every CUDA kernel file: error checks (CUDA, cuBLAS, launches; cuDNN's is beside its
// only user, attention_cudnn.cu) that funnel into
// tessera::fail with file:line, bf16/f16 load/store helpers, and launch-size helpers.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cuda/context.h"
#include "kernels/op_types.h"

#define TS_CUDA_CHECK(call)                                                                      \
  do {                                                                                           \
    cudaError_t err_ = (call);                                                                   \
    if (err_ != cudaSuccess)                                                                     \
      ::tessera::fail(::tessera::ErrorKind::system,                                              \
                      ::fmt::format("{} failed: {}", #call, cudaGetErrorString(err_)), __FILE__, \
                      __LINE__);                                                                 \
  } while (0)

// After every kernel launch: catches bad launch configurations immediately.
#define TS_CUDA_CHECK_LAUNCH() TS_CUDA_CHECK(cudaGetLastError())

#define TS_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                         \
    cublasStatus_t st_ = (call);                                                               \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                          \
      ::tessera::fail(::tessera::ErrorKind::system,                                            \
                      ::fmt::format("{} failed: cuBLAS status {}", #call, int(st_)), __FILE__, \
                      __LINE__);                                                               \
  } while (0)

namespace tessera::cuda {

// The stream an op was handed (kernels/op_types.h ops::Stream; {} is the legacy default stream).
// Every launch, cuBLASLt/cuDNN/CUB call and async copy of an op goes to it.
inline cudaStream_t cuda_stream(ops::Stream s) { return static_cast<cudaStream_t>(s.handle); }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Loads/stores that convert between the storage type and f32 arithmetic. Narrowing rounds to
// nearest even; f16 overflow gives +-Inf (IEEE), which FP16 loss scaling relies on to detect
// overflowed gradients, and NaN stays NaN.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

// Checks shared by launchers: device, dtype f32/bf16/f16.
inline void expect_cuda(const Tensor& t, const char* what) {
  TS_CHECK(t.device == Device::cuda, "{}: expected a cuda tensor, got {}", what, t.str());
}
inline bool is_bf16(const Tensor& t) { return t.dtype == DType::bf16; }
// The dtypes the float kernels compute on (in f32, rounding once on store).
inline bool is_compute_dtype(DType t) {
  return t == DType::f32 || t == DType::bf16 || t == DType::f16;
}

// Runs f.template operator()<T>() with T = float, __nv_bfloat16 or __half per t's dtype.
template <class F>
void dispatch_float(const Tensor& t, const char* what, F&& f) {
  if (t.dtype == DType::f32)
    f.template operator()<float>();
  else if (t.dtype == DType::bf16)
    f.template operator()<__nv_bfloat16>();
  else if (t.dtype == DType::f16)
    f.template operator()<__half>();
  else
    TS_BUG("{}: unsupported dtype {} on cuda (f32, bf16 or f16)", what, dtype_name(t.dtype));
}

}  // namespace tessera::cuda
