// CUDA grouped GEMM (kernels/ops_moe.h): forward y = x·w[g]^T, dgrad dx = dy·w[g], wgrad
// dw[g] += dy_g^T·x_g over the row ranges of device-resident offsets. 16-bit operands with N', K'
// multiples of 8 and 16-byte aligned bases run the sm_90a warp-specialised TMA + wgmma kernel
// (grouped_gemm_tma.cuh; the earlier cp.async kernel of grouped_gemm_wgmma.cuh stays selectable for
// comparisons); everything else (f32, odd sizes, misaligned views, other GPUs) runs the generic
// kernel here, f32 FMA on 64 x 64 tiles. All are persistent grids scheduled on the device
// (grouped_gemm.cuh): no host synchronization, no copy of the offsets. Deterministic: every output
// element has one writer, which reduces its K (or its group's rows) in a fixed order; no atomics.
// Shape letters: R rows, G groups, N' out features (nn), K' in features (kk).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/grouped_gemm.cuh"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/grouped_gemm_tma.cuh"
#include "kernels/cuda/grouped_gemm_wgmma.cuh"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/moe.h"

namespace tessera::cuda {

namespace {

using grouped::Args;
using grouped::Pass;

// ---- kernels ---------------------------------------------------------------------------------

// Rows [offsets[G], R) of out (R, cols) = 0: the rows no group owns (offsets[G] read here).
template <class T>
__global__ void zero_unused_rows_kernel(T* out, const int32_t* offsets, int groups, int64_t rows,
                                        int64_t cols) {
  const int64_t first = std::min(std::max(int64_t(offsets[groups]), int64_t(0)), rows);
  for (int64_t i = first * cols + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(0.0f);
}

constexpr int kGenBM = 64, kGenBN = 64, kGenBK = 16, kGenThreads = 256;

// One operand's k-block as f32 into s[k][mn]: K-major operands are read along k, MN-major along
// mn (coalesced either way); elements outside [.., mn_limit) x [.., k_limit) are zero.
template <bool kKMajor, int kRows, class T>
__device__ __forceinline__ void generic_load(float (&s)[kGenBK][kRows + 1], const T* p, int64_t ld,
                                             int64_t mn0, int64_t mn_limit, int64_t k0,
                                             int64_t k_limit) {
  for (int idx = threadIdx.x; idx < kRows * kGenBK; idx += kGenThreads) {
    const int r = kKMajor ? idx / kGenBK : idx % kRows, kk = kKMajor ? idx % kGenBK : idx / kRows;
    const int64_t mn = mn0 + r, k = k0 + kk;
    s[kk][r] =
        mn < mn_limit && k < k_limit ? to_f32(kKMajor ? p[mn * ld + k] : p[k * ld + mn]) : 0.0f;
  }
}

// The generic kernel: any dtype, any shape and alignment. 256 threads, a 64 x 64 tile per step of
// its persistent loop, each thread 4 x 4 outputs (rows ty + 16i, columns tx + 16j), f32 FMA over
// k in increasing order.
template <class T, class OutT, Pass P>
__global__ void __launch_bounds__(kGenThreads) grouped_generic_kernel(const Args args) {
  __shared__ float sa[kGenBK][kGenBM + 1], sb[kGenBK][kGenBN + 1];
  const T* a = static_cast<const T*>(args.a);
  const T* b = static_cast<const T*>(args.b);
  OutT* c = static_cast<OutT*>(args.c);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  grouped::Cursor<P, kGenBM, kGenBN, kGenBK> cur;
  for (cur.start(args); cur.valid; cur.next_tile(args)) {
    const grouped::Tile& t = cur.tile;
    float acc[4][4] = {};
    for (int kb = 0; kb < t.num_kb; ++kb) {
      const int64_t k0 = t.k0 + int64_t(kb) * kGenBK;
      generic_load<grouped::a_k_major(P), kGenBM>(sa, a, args.lda, t.a_mn0, t.a_limit, k0,
                                                  t.k_limit);
      generic_load<grouped::b_k_major(P), kGenBN>(sb, b + t.b_off, args.ldb, t.b_mn0, t.b_limit, k0,
                                                  t.k_limit);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kGenBK; ++kk) {
        float fa[4], fb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) fa[i] = sa[kk][ty + 16 * i], fb[i] = sb[kk][tx + 16 * i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = t.a_mn0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = t.b_mn0 + tx + 16 * j;
        if (row >= t.a_limit || col >= t.b_limit) continue;
        OutT* p = c + t.c_off + row * args.ldc + col;
        *p = from_f32<OutT>(P == Pass::wgrad ? to_f32(*p) + acc[i][j] : acc[i][j]);
      }
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------

struct Dims {
  int64_t rows = 0, groups = 0, nn = 0, kk = 0;  // R, G, N', K'
};

// x (R,K') on cuda in a compute dtype, w (G,N',K') of the same dtype, offsets (G+1) i32 on cuda.
Dims check_operands(const Tensor& x, const Tensor& w, const Tensor& offsets, const char* op) {
  expect_compute_dtype(x, op, "x");
  TS_CHECK(x.ndim() == 2 && w.ndim() == 3, "{}: x must be (R,K') and w (G,N',K'), got x {}, w {}",
           op, x.str(), w.str());
  const Dims d{x.dim(0), w.dim(0), w.dim(1), w.dim(2)};
  expect_tensor(w, x.dtype, Shape{d.groups, d.nn, d.kk}, op, "w");
  TS_CHECK(x.dim(1) == d.kk, "{}: x {} does not end in K'={} of w {}", op, x.str(), d.kk, w.str());
  TS_CHECK(d.groups < INT_MAX && d.rows <= INT_MAX, "{}: {} groups of {} rows exceed i32 offsets",
           op, d.groups, d.rows);
  TS_CHECK(!offsets.empty() && offsets.device == Device::cuda && offsets.dtype == DType::i32 &&
               offsets.shape == Shape{d.groups + 1},
           "{}: offsets must be an i32 cuda tensor ({}) for G={} groups, got {}", op, d.groups + 1,
           d.groups, offsets.str());
  return d;
}

// The wgmma kernel needs 16-bit operands, rows in whole 16-byte chunks (last dims multiples of
// 8), 16-byte aligned bases and a CC 9.0 device running this build's sm_90a code (binaryVersion
// 90). A build without sm_90a code (TESSERA_HAVE_SM90A unset by kernels/CMakeLists.txt) never
// picks it: there its body is a trap (grouped_gemm_wgmma.cuh).
#ifdef TESSERA_HAVE_SM90A
constexpr bool kHaveSm90a = true;
#else
constexpr bool kHaveSm90a = false;
#endif
bool use_wgmma(const Tensor& out, const Tensor& a, const Tensor& b) {
  if (!kHaveSm90a) return false;
  if (a.dtype != DType::bf16 && a.dtype != DType::f16) return false;
  for (const Tensor* t : {&out, &a, &b})
    if (t->dim(t->ndim() - 1) % 8 != 0 || !is_aligned(t->data, 16)) return false;
  int dev = 0, major = 0, minor = 0;
  TS_CUDA_CHECK(cudaGetDevice(&dev));
  TS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TS_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attr{};
  TS_CUDA_CHECK(cudaFuncGetAttributes(
      &attr, grouped::grouped_wgmma_kernel<__nv_bfloat16, __nv_bfloat16, Pass::forward>));
  return attr.binaryVersion == 90;
}

// Tiles along M and N for BM x BN tiles, and an upper bound on the tiles of the pass (forward /
// dgrad: each group adds at most one partial m-tile to ceil(R / BM)).
template <Pass P>
int64_t plan_tiles(Args& args, int bm, int bn) {
  args.n_tiles = ceil_div(args.n_size, bn);
  if constexpr (P == Pass::wgrad) {
    args.m_tiles = ceil_div(args.m_size, bm);
    return int64_t(args.groups) * args.m_tiles * args.n_tiles;
  } else {
    return (ceil_div(args.rows, bm) + int64_t(args.groups)) * args.n_tiles;
  }
}

// ---- tensor maps (the TMA kernel) -------------------------------------------------------------

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
    TS_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                   cudaEnableDefault, &status));
    TS_CHECK(status == cudaDriverEntryPointSuccess && p != nullptr,
             "grouped GEMM: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A map over a contiguous 16-bit tensor of `rank` dims (innermost first) read in boxes of
// box0 x box1 (x 1): 128-byte swizzle (box0 = 64 elements = one swizzle row), zero fill outside.
template <class T>
CUtensorMap tensor_map(const void* base, int rank, const uint64_t* dims, uint32_t box0,
                       uint32_t box1) {
  cuuint64_t gdim[3], gstride[2];
  for (int i = 0; i < rank; ++i) gdim[i] = dims[i];
  gstride[0] = dims[0] * sizeof(T);  // bytes between consecutive indices of dim 1, then dim 2
  if (rank == 3) gstride[1] = gstride[0] * dims[1];
  const cuuint32_t box[3] = {box0, box1, 1}, elem_stride[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r =
      encode_fn()(&map,
                  std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                   : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                  cuuint32_t(rank), const_cast<void*>(base), gdim, gstride, box, elem_stride,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TS_CHECK(r == CUDA_SUCCESS, "grouped GEMM: cuTensorMapEncodeTiled failed ({})", int(r));
  return map;
}

// The maps of pass P (see grouped_gemm_tma.cuh): K-major operands in boxes of 64 k x rows,
// MN-major ones in 64 x 64 boxes; w as (G, N', K').
template <class T, Pass P>
void pass_maps(const Args& args, const Dims& d, CUtensorMap& ma, CUtensorMap& mb) {
  const uint64_t rows = uint64_t(d.rows), nn = uint64_t(d.nn), kk = uint64_t(d.kk);
  const uint64_t w_dims[3] = {kk, nn, uint64_t(d.groups)};
  if constexpr (P == Pass::forward) {
    const uint64_t x_dims[2] = {kk, rows};
    ma = tensor_map<T>(args.a, 2, x_dims, 64, grouped::kWgBM);
    mb = tensor_map<T>(args.b, 3, w_dims, 64, grouped::kWgBN);
  } else if constexpr (P == Pass::dgrad) {
    const uint64_t dy_dims[2] = {nn, rows};
    ma = tensor_map<T>(args.a, 2, dy_dims, 64, grouped::kWgBM);
    mb = tensor_map<T>(args.b, 3, w_dims, 64, 64);
  } else {
    const uint64_t dy_dims[2] = {nn, rows}, x_dims[2] = {kk, rows};
    ma = tensor_map<T>(args.a, 2, dy_dims, 64, 64);
    mb = tensor_map<T>(args.b, 2, x_dims, 64, 64);
  }
}

// TESSERA_GROUPED_GEMM_V1=1 picks the earlier cp.async kernel (grouped_gemm_wgmma.cuh) for
// side-by-side benchmarks; the TMA kernel is the default.
bool use_v1_kernel() {
  static const bool v1 = [] {
    const char* e = std::getenv("TESSERA_GROUPED_GEMM_V1");
    return e != nullptr && e[0] == '1';
  }();
  return v1;
}

template <class T, class OutT, Pass P>
void launch_pass(Args args, const Dims& d, bool wgmma, cudaStream_t stream) {
  const int64_t num_sms = std::max(context().num_sms, 1);
  if constexpr (!std::is_same_v<T, float>) {
    if (wgmma) {
      const int64_t tiles = plan_tiles<P>(args, grouped::kWgBM, grouped::kWgBN);
      if (tiles == 0) return;
      const int grid = int(std::min(tiles, num_sms));
      if (use_v1_kernel()) {
        const auto kernel = grouped::grouped_wgmma_kernel<T, OutT, P>;
        TS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           grouped::kWgSmemBytes));
        kernel<<<grid, grouped::kWgThreads, grouped::kWgSmemBytes, stream>>>(args);
      } else {
        if (d.rows == 0) return;  // every group is empty (and a tensor map needs a row)
        CUtensorMap ma, mb;
        pass_maps<T, P>(args, d, ma, mb);
        const auto kernel = grouped::grouped_ws_kernel<T, OutT, P>;
        TS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           grouped::kWsSmemBytes));
        kernel<<<grid, grouped::kWsThreads, grouped::kWsSmemBytes, stream>>>(ma, mb, args);
      }
      TS_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  const int64_t tiles = plan_tiles<P>(args, kGenBM, kGenBN);
  if (tiles == 0) return;
  grouped_generic_kernel<T, OutT, P>
      <<<int(std::min(tiles, num_sms * 8)), kGenThreads, 0, stream>>>(args);
  TS_CUDA_CHECK_LAUNCH();
}

template <class T>
void zero_unused_rows(const Tensor& out, const Tensor& offsets, int64_t groups,
                      cudaStream_t stream) {
  const int64_t rows = out.dim(0), cols = out.dim(1);
  const int blocks = int(std::min<int64_t>(ceil_div(rows * cols, 256), 4 * context().num_sms));
  zero_unused_rows_kernel<T><<<std::max(blocks, 1), 256, 0, stream>>>(
      static_cast<T*>(out.data), static_cast<const int32_t*>(offsets.data), int(groups), rows,
      cols);
  TS_CUDA_CHECK_LAUNCH();
}

Args base_args(const Tensor& offsets, const Dims& d) {
  Args args;
  args.offsets = static_cast<const int32_t*>(offsets.data);
  args.rows = d.rows;
  args.groups = int(d.groups);
  return args;
}

void forward(Tensor y, Tensor x, Tensor w, Tensor offsets, bool allow_wgmma, ops::Stream stream) {
  constexpr const char* kOp = "grouped_gemm_forward";
  const Dims d = check_operands(x, w, offsets, kOp);
  expect_tensor(y, x.dtype, Shape{d.rows, d.nn}, kOp, "y");
  TS_CHECK(!overlaps(y, x) && !overlaps(y, w), "{}: y must not alias x or w", kOp);
  const cudaStream_t s = cuda_stream(stream);
  if (y.numel() == 0) return;
  if (d.kk == 0) {  // every sum is empty: y = 0, rows past offsets[G] included
    TS_CUDA_CHECK(cudaMemsetAsync(y.data, 0, y.nbytes(), s));
    return;
  }
  Args args = base_args(offsets, d);
  args.a = x.data;
  args.b = w.data;
  args.c = y.data;
  args.lda = d.kk;
  args.ldb = d.kk;
  args.ldc = d.nn;
  args.b_group_stride = d.nn * d.kk;
  args.n_size = d.nn;
  args.k_size = d.kk;
  const bool wgmma = allow_wgmma && use_wgmma(y, x, w);
  dispatch_float(x, kOp, [&]<class T>() {
    zero_unused_rows<T>(y, offsets, d.groups, s);
    launch_pass<T, T, Pass::forward>(args, d, wgmma, s);
  });
}

void backward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor offsets, bool allow_wgmma,
              ops::Stream stream) {
  constexpr const char* kOp = "grouped_gemm_backward";
  const Dims d = check_operands(x, w, offsets, kOp);
  expect_tensor(dy, x.dtype, Shape{d.rows, d.nn}, kOp, "dy");
  if (!dw.empty()) expect_param_grad(dw, x.dtype, w.shape, kOp, "dw");
  if (!dx.empty()) expect_tensor(dx, x.dtype, x.shape, kOp, "dx");
  for (const Tensor* in : {&dy, &x, &w})
    TS_CHECK(!overlaps(dx, *in) && !overlaps(dw, *in), "{}: dx and dw must not alias dy, x or w",
             kOp);
  TS_CHECK(!overlaps(dx, dw), "{}: dx and dw must not alias", kOp);
  const cudaStream_t s = cuda_stream(stream);
  dispatch_float(x, kOp, [&]<class T>() {
    if (!dx.empty() && dx.numel() > 0) {
      if (d.nn == 0) {  // dx = dy · w[g] sums over N' = 0 terms
        TS_CUDA_CHECK(cudaMemsetAsync(dx.data, 0, dx.nbytes(), s));
      } else {
        Args args = base_args(offsets, d);
        args.a = dy.data;
        args.b = w.data;
        args.c = dx.data;
        args.lda = d.nn;
        args.ldb = d.kk;
        args.ldc = d.kk;
        args.b_group_stride = d.nn * d.kk;
        args.n_size = d.kk;
        args.k_size = d.nn;
        zero_unused_rows<T>(dx, offsets, d.groups, s);
        launch_pass<T, T, Pass::dgrad>(args, d, allow_wgmma && use_wgmma(dx, dy, w), s);
      }
    }
    if (dw.empty() || dw.numel() == 0) return;
    Args args = base_args(offsets, d);
    args.a = dy.data;
    args.b = x.data;
    args.c = dw.data;
    args.lda = d.nn;
    args.ldb = d.kk;
    args.ldc = d.kk;
    args.c_group_stride = d.nn * d.kk;
    args.m_size = d.nn;
    args.n_size = d.kk;
    const bool wgmma = allow_wgmma && use_wgmma(dw, dy, x);
    dispatch_param_grad<T>(dw,
                           [&]<class TW>() { launch_pass<T, TW, Pass::wgrad>(args, d, wgmma, s); });
  });
}

}  // namespace

const char* grouped_gemm_kernel_name(const Tensor& out, const Tensor& a, const Tensor& b) {
  return use_wgmma(out, a, b) ? "wgmma" : "generic";
}

void grouped_gemm_forward(Tensor y, Tensor x, Tensor w, Tensor offsets, ops::Stream stream) {
  forward(y, x, w, offsets, true, stream);
}

void grouped_gemm_backward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor offsets,
                           ops::Stream stream) {
  backward(dx, dw, dy, x, w, offsets, true, stream);
}

void grouped_gemm_forward_generic(Tensor y, Tensor x, Tensor w, Tensor offsets,
                                  ops::Stream stream) {
  forward(y, x, w, offsets, false, stream);
}

void grouped_gemm_backward_generic(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w,
                                   Tensor offsets, ops::Stream stream) {
  backward(dx, dw, dy, x, w, offsets, false, stream);
}

}  // namespace tessera::cuda
