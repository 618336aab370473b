// gemm_fp8 on CUDA (kernels/ops_fp8.h) through cuBLASLt's scaled FP8 matmul, with a plan cache
// like gemm_lt.cu's. Row-major to column-major: our c (M,N) row-major is cuBLASLt's D (N,M)
// column-major, = op(A) op(B) with cuBLASLt A = our b viewed as (K,N) col-major [ld K] and
// transposed, cuBLASLt B = our a viewed as (K,M) col-major [ld K] not transposed: exactly the
// "TN" layout that FP8 kernels require on Hopper (both operands K-contiguous).
#include <array>
#include <map>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fp8.h"
#include "kernels/cuda/lt_heuristic.cuh"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cuda {

namespace {

// Key: device, m, n, k, dtypes of a, b, c, accumulate, and the alignments of a, b, c (the
// heuristic's answer depends on them).
using PlanKey = std::array<int64_t, 11>;

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// Plans live for the process, like gemm_lt.cu's; the mutex also keeps each call's
// set-scale-pointers-then-enqueue pair atomic, since calls with the same key share a descriptor.
std::mutex g_plan_mutex;
std::map<PlanKey, Plan> g_plans;

// cuBLASLt wants 16-byte aligned scale pointers: a scale at a 4-byte offset of an array made the
// first FP8 GEMM of llama-1b fail with NOT_SUPPORTED on an H100 (cuBLAS 13) while the same GEMM
// with scales allocated alone ran. Training passes aligned scales (Fp8ScalingState keeps aligned
// copies); any other caller's unaligned scale is copied into a 16-byte slot of this buffer first,
// on the GEMM's stream. Slots are per (device, stream) and calls are enqueued under g_plan_mutex,
// so on each stream a slot is never rewritten before the GEMM queued before it has read it.
std::map<std::pair<int, void*>, float*> g_scale_slots;  // (device, stream) -> 2 slots of 16 bytes

const void* aligned_scale(const Context& ctx, const void* scale, int slot, ops::Stream stream) {
  if (reinterpret_cast<uintptr_t>(scale) % 16 == 0) return scale;
  float*& slots = g_scale_slots[{ctx.device, stream.handle}];
  if (!slots) TS_CUDA_CHECK(cudaMalloc(&slots, 2 * 16));
  float* dst = slots + 4 * slot;
  TS_CUDA_CHECK(
      cudaMemcpyAsync(dst, scale, sizeof(float), cudaMemcpyDeviceToDevice, cuda_stream(stream)));
  return dst;
}

int64_t alignment_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int64_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

cudaDataType_t lt_type(DType t) {
  switch (t) {
    case DType::e4m3: return CUDA_R_8F_E4M3;
    case DType::e5m2: return CUDA_R_8F_E5M2;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f32: return CUDA_R_32F;
    default: TS_BUG("gemm_fp8: no cuBLASLt type for {}", dtype_name(t));
  }
}

template <class V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  TS_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// FP8 tensor cores need compute capability 8.9 (Ada) or 9.x (Hopper); checked once per device.
void require_fp8_device(int device) {
  int major = 0, minor = 0;
  TS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TS_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major * 10 + minor < 89)
    TS_USER_ERROR(
        "FP8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
        "device {} is {}.{}: choose another precision recipe",
        device, major, minor);
}

Plan make_plan(const fp8::GemmDims& d, const Tensor& c, const Tensor& a, const Tensor& b,
               bool accumulate, const int64_t (&align)[3]) {
  Plan plan;
  TS_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  // Fast accumulation keeps the partial sums inside the tensor core's reduced-precision
  // accumulator for the whole K loop; without it partial sums are promoted to f32 registers at
  // intervals (TransformerEngine's "split accumulator"). TE's default recipe: fast for the
  // forward (e4m3 x e4m3), split for dgrad/wgrad, whose gradient operand is e5m2.
  const bool gradient = a.dtype == DType::e5m2 || b.dtype == DType::e5m2;
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t(gradient ? 0 : 1));
  const uint64_t m = d.m, n = d.n, k = d.k;
  TS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_a, lt_type(b.dtype), k, n, int64_t(k)));
  TS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_b, lt_type(a.dtype), k, m, int64_t(k)));
  TS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_c, lt_type(c.dtype), n, m, int64_t(n)));

  // Unlike lt_gemm there is no fallback kernel: an FP8 GEMM cuBLASLt cannot run is an error.
  if (!lt_best_algo(plan.desc, plan.layout_a, plan.layout_b, plan.layout_c, align, &plan.algo))
    TS_SYSTEM_ERROR(
        "gemm_fp8: cuBLASLt has no FP8 algorithm for c {} = a {} x b {}^T "
        "(accumulate {}, alignments a {} b {} c {} bytes)",
        c.str(), a.str(), b.str(), accumulate, align[0], align[1], align[2]);
  return plan;
}

}  // namespace

void gemm_fp8(Tensor c, Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv, bool accumulate,
              ops::Stream stream) {
  constexpr const char* kOp = "gemm_fp8";
  const fp8::GemmDims d = fp8::check_gemm(c, a, b, a_scale_inv, b_scale_inv, Device::cuda, kOp);
  if (d.m == 0 || d.n == 0) return;
  // cuBLASLt's FP8 requirements: 16-byte aligned matrices and leading dimensions (K bytes for a
  // and b, N elements of c, so N % 16 covers both output dtypes).
  TS_CHECK(d.k % 16 == 0 && d.n % 16 == 0,
           "{}: FP8 GEMMs need K and N multiples of 16, got M={} N={} K={} (pad the layer widths)",
           kOp, d.m, d.n, d.k);
  const int64_t align[3] = {alignment_of(a.data), alignment_of(b.data), alignment_of(c.data)};
  TS_CHECK(align[0] >= 16 && align[1] >= 16 && align[2] >= 16,
           "{}: a, b and c must be 16-byte aligned, got {} {} {}", kOp, a.data, b.data, c.data);
  if (d.k == 0) {  // an empty sum: c = 0 (or unchanged), which cuBLASLt does not take as k = 0
    if (!accumulate) TS_CUDA_CHECK(cudaMemsetAsync(c.data, 0, c.nbytes(), cuda_stream(stream)));
    return;
  }
  const Context& ctx = context();
  const PlanKey key{
      ctx.device,       d.m,        d.n,      d.k,      int64_t(a.dtype), int64_t(b.dtype),
      int64_t(c.dtype), accumulate, align[0], align[1], align[2]};
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    require_fp8_device(ctx.device);
    it = g_plans.emplace(key, make_plan(d, c, a, b, accumulate, align)).first;
  }
  const Plan& plan = it->second;
  // cuBLASLt A is our b, so A's scale is b's; both are device pointers read by the kernel.
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
           aligned_scale(ctx, b_scale_inv.data, 0, stream));
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
           aligned_scale(ctx, a_scale_inv.data, 1, stream));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t st = cublasLtMatmul(
      reinterpret_cast<cublasLtHandle_t>(ctx.cublaslt), plan.desc, &alpha, b.data, plan.layout_a,
      a.data, plan.layout_b, &beta, c.data, plan.layout_c, c.data, plan.layout_c, &plan.algo,
      ctx.workspace, ctx.workspace_bytes, cuda_stream(stream));
  if (st != CUBLAS_STATUS_SUCCESS)  // the whole call, so that a failure in a model is reproducible
    TS_SYSTEM_ERROR(
        "gemm_fp8: cublasLtMatmul failed (cuBLAS status {}) for c {} = a {} x b {}^T, "
        "accumulate {}, alignments a {} b {} c {}, scale pointers a {} b {} "
        "(CUBLASLT_LOG_LEVEL=2 prints cuBLASLt's reason)",
        int(st), c.str(), a.str(), b.str(), accumulate, align[0], align[1], align[2],
        a_scale_inv.data, b_scale_inv.data);
}

}  // namespace tessera::cuda
