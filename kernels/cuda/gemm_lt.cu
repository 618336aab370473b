// GEMM engines under kernels/cuda/matmul.cu: our FMA fallback kernel (gemm_simt) at the top, then
// the cuBLASLt call with its plan cache (lt_gemm). Row-major in, column-major to cuBLASLt: a
// row-major (R,C) matrix is the column-major (C,R) matrix, so c = op(a) op(b) is computed as
// c^T = op(b)^T op(a)^T with cuBLASLt's A = our b, B = our a, m = N, n = M.
// Shapes: M, N rows and columns of c, K the reduction.
#include <array>
#include <map>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm_lt.h"
#include "kernels/cuda/lt_heuristic.cuh"

namespace tessera::cuda {

namespace {

// ---- gemm_simt: 64x64 tile per block, 16x16 threads, 4x4 outputs per thread, K step 16 --------
constexpr int kSimtTile = 64;
constexpr int kSimtK = 16;

// Element (r, c) of a row-major (rows, cols) matrix, 0 outside it (the tile's padding).
template <class T>
__device__ __forceinline__ float load_or_zero(const T* x, int64_t rows, int64_t cols, int64_t r,
                                              int64_t c) {
  return r < rows && c < cols ? to_f32(x[r * cols + c]) : 0.0f;
}

// T: a's and b's dtype; TC: c's (T, or f32 for an FP32 gradient of 16-bit operands).
template <class T, class TC>
__global__ void __launch_bounds__(256)
    gemm_simt_kernel(TC* c, const T* a, const T* b, int64_t m, int64_t n, int64_t k, bool trans_a,
                     bool trans_b, float alpha, float beta) {
  __shared__ float a_s[kSimtK][kSimtTile + 1];  // (K step, rows of c)
  __shared__ float b_s[kSimtK][kSimtTile + 1];  // (K step, columns of c)
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = int64_t(blockIdx.y) * kSimtTile, col0 = int64_t(blockIdx.x) * kSimtTile;
  float acc[4][4] = {};
  for (int64_t p0 = 0; p0 < k; p0 += kSimtK) {
    for (int idx = threadIdx.x; idx < kSimtK * kSimtTile; idx += blockDim.x) {
      const int p = idx % kSimtK, r = idx / kSimtK;
      // op(a) is (M,K): stored (M,K) or (K,M); op(b) is (K,N): stored (K,N) or (N,K).
      a_s[p][r] = trans_a ? load_or_zero(a, k, m, p0 + p, row0 + r)
                          : load_or_zero(a, m, k, row0 + r, p0 + p);
      b_s[p][r] = trans_b ? load_or_zero(b, n, k, col0 + r, p0 + p)
                          : load_or_zero(b, k, n, p0 + p, col0 + r);
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kSimtK; ++p) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a_s[p][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b_s[p][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col >= n) continue;
      TC* out = c + row * n + col;
      const float old = beta == 0.0f ? 0.0f : beta * to_f32(*out);  // beta = 0: c may hold NaN
      *out = from_f32<TC>(alpha * acc[i][j] + old);
    }
  }
}

// ---- cuBLASLt plans -----------------------------------------------------------------------
// Key: device, m, n, k, trans_a, trans_b, dtype, c_dtype, epilogue, and the alignments of every
// pointer (the heuristic's answer depends on them, bias included).
using PlanKey = std::array<int64_t, 13>;

struct Plan {
  bool found = false;  // false: cuBLASLt had no algorithm; callers fall back
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// Plans live for the process (like the contexts): descriptors are never destroyed.
std::mutex g_plan_mutex;
std::map<PlanKey, Plan> g_plans;

int64_t alignment_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  if (v == 0) return 256;
  int64_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

cudaDataType_t lt_type(DType t) {
  if (t == DType::f32) return CUDA_R_32F;
  if (t == DType::bf16) return CUDA_R_16BF;
  if (t == DType::f16) return CUDA_R_16F;
  TS_BUG("lt_gemm: unsupported dtype {} (f32, bf16 or f16)", dtype_name(t));
}

template <class V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  TS_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// Pointer attributes are set on every call: the plan is shared by calls with other pointers of
// the same alignment, and the mutex keeps the set-then-enqueue pair atomic.
void set_pointers(const Plan& plan, const LtGemm& g) {
  if (g.epilogue != GemmEpilogue::none)
    set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
}

Plan make_plan(const LtGemm& g, const int64_t (&align)[4]) {
  Plan plan;
  const cudaDataType_t type = lt_type(g.dtype), c_type = lt_type(g.c_dtype);
  // f32 compute for every dtype: CUBLAS_COMPUTE_32F never uses TF32 (parity with the CPU), and
  // f16 products are accumulated in f32 (never CUBLAS_COMPUTE_16F), rounded once into c; an f32 c
  // beside bf16/f16 a and b (a supported cuBLASLt combination) is not rounded to 16 bits at all.
  TS_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt A = our b
  const cublasOperation_t op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt B = our a
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, op_a);
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, op_b);
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.epilogue == GemmEpilogue::bias) epi = CUBLASLT_EPILOGUE_BIAS;
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epi);
  set_pointers(plan, g);
  // Column-major views: our b is (N,K) col-major [ld N] or, transposed, (K,N) [ld K]; our a is
  // (K,M) [ld K] or (M,K) [ld M]; c is (N,M) [ld N].
  const uint64_t m = g.m, n = g.n, k = g.k;
  TS_CUBLAS_CHECK(g.trans_b ? cublasLtMatrixLayoutCreate(&plan.layout_a, type, k, n, int64_t(k))
                            : cublasLtMatrixLayoutCreate(&plan.layout_a, type, n, k, int64_t(n)));
  TS_CUBLAS_CHECK(g.trans_a ? cublasLtMatrixLayoutCreate(&plan.layout_b, type, m, k, int64_t(m))
                            : cublasLtMatrixLayoutCreate(&plan.layout_b, type, k, m, int64_t(k)));
  TS_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_c, c_type, n, m, int64_t(n)));

  plan.found =
      lt_best_algo(plan.desc, plan.layout_a, plan.layout_b, plan.layout_c, align, &plan.algo);
  return plan;
}

}  // namespace

namespace {

void check_lt_args(const LtGemm& g) {
  TS_CHECK(g.m >= 1 && g.n >= 1 && g.k >= 1 && g.alpha != 0.0f,
           "lt_gemm: needs m, n, k >= 1 and alpha != 0, got m={} n={} k={} alpha={}", g.m, g.n, g.k,
           g.alpha);
  TS_CHECK(g.epilogue == GemmEpilogue::none || g.bias != nullptr, "lt_gemm: epilogue without bias");
  TS_CHECK(g.c_dtype == g.dtype || (g.c_dtype == DType::f32 && g.epilogue == GemmEpilogue::none),
           "lt_gemm: c is {} beside {} operands (c has their dtype, or is f32 without epilogue)",
           dtype_name(g.c_dtype), dtype_name(g.dtype));
}

// The cached plan for g; call with g_plan_mutex held.
const Plan& find_plan(const LtGemm& g, int device) {
  const int64_t align[4] = {alignment_of(g.a), alignment_of(g.b), alignment_of(g.c),
                            alignment_of(g.bias)};
  const PlanKey key{device,
                    g.m,
                    g.n,
                    g.k,
                    g.trans_a,
                    g.trans_b,
                    int64_t(g.dtype),
                    int64_t(g.c_dtype),
                    int64_t(g.epilogue),
                    align[0],
                    align[1],
                    align[2],
                    align[3]};
  auto it = g_plans.find(key);
  if (it == g_plans.end()) it = g_plans.emplace(key, make_plan(g, align)).first;
  return it->second;
}

}  // namespace

bool lt_gemm(const LtGemm& g, ops::Stream stream) {
  check_lt_args(g);
  const Context& ctx = context();
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  const Plan& plan = find_plan(g, ctx.device);
  if (!plan.found) return false;
  set_pointers(plan, g);
  TS_CUBLAS_CHECK(cublasLtMatmul(reinterpret_cast<cublasLtHandle_t>(ctx.cublaslt), plan.desc,
                                 &g.alpha, g.b, plan.layout_a, g.a, plan.layout_b, &g.beta, g.c,
                                 plan.layout_c, g.c, plan.layout_c, &plan.algo, ctx.workspace,
                                 ctx.workspace_bytes, cuda_stream(stream)));
  return true;
}

size_t lt_gemm_plan_count() {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  return g_plans.size();
}

void gemm_simt(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
               ops::Stream stream) {
  constexpr const char* kOp = "gemm_simt";
  for (const Tensor* t : {&c, &a, &b}) expect_cuda(*t, kOp);
  TS_CHECK(c.ndim() == 2 && a.ndim() == 2 && b.ndim() == 2, "{}: 2-D operands, got {} {} {}", kOp,
           c.str(), a.str(), b.str());
  TS_CHECK(a.dtype == b.dtype && (c.dtype == a.dtype || c.dtype == DType::f32),
           "{}: dtypes differ: c {}, a {}, b {} (c may be f32 beside 16-bit a and b)", kOp, c.str(),
           a.str(), b.str());
  const int64_t m = c.dim(0), n = c.dim(1), k = trans_a ? a.dim(0) : a.dim(1);
  expect_shape(a, trans_a ? Shape{k, m} : Shape{m, k}, kOp);
  expect_shape(b, trans_b ? Shape{n, k} : Shape{k, n}, kOp);
  if (m == 0 || n == 0) return;
  TS_CHECK(alpha != 0.0f, "{}: alpha = 0 is handled by the caller (a and b must not be read)", kOp);
  const dim3 grid(ceil_div(n, kSimtTile), ceil_div(m, kSimtTile));
  TS_CHECK(grid.y <= 65535, "{}: M = {} too large for the fallback kernel", kOp, m);
  dispatch_float(a, kOp, [&]<class T>() {
    const auto launch = [&]<class TC>() {
      gemm_simt_kernel<T, TC><<<grid, 256, 0, cuda_stream(stream)>>>(
          static_cast<TC*>(c.data), static_cast<const T*>(a.data), static_cast<const T*>(b.data), m,
          n, k, trans_a, trans_b, alpha, beta);
      TS_CUDA_CHECK_LAUNCH();
    };
    if (c.dtype == a.dtype)
      launch.template operator()<T>();
    else
      launch.template operator()<float>();
  });
}

bool lt_best_algo(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t layout_a,
                  cublasLtMatrixLayout_t layout_b, cublasLtMatrixLayout_t layout_c,
                  const int64_t align[3], cublasLtMatmulAlgo_t* algo) {
  cublasLtMatmulPreference_t pref;
  TS_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = context().workspace_bytes;
  TS_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t align_lt[4] = {uint32_t(align[1]), uint32_t(align[0]), uint32_t(align[2]),
                                uint32_t(align[2])};  // cuBLASLt A = b, B = a, C = D = c
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    TS_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align_lt[i], sizeof(uint32_t)));
  cublasLtMatmulHeuristicResult_t result{};
  int num_results = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      reinterpret_cast<cublasLtHandle_t>(context().cublaslt), desc, layout_a, layout_b, layout_c,
      layout_c, pref, 1, &result, &num_results);
  TS_CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  // NOT_SUPPORTED means "no algorithm" (e.g. an epilogue on an unsupported layout): the caller
  // decides. Any other failure is an error.
  if (st != CUBLAS_STATUS_NOT_SUPPORTED) TS_CUBLAS_CHECK(st);
  const bool found =
      st == CUBLAS_STATUS_SUCCESS && num_results > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (found) *algo = result.algo;
  return found;
}

}  // namespace tessera::cuda
