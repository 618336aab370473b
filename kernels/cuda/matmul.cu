// CUDA gemm, matmul_forward and matmul_backward (kernels/ops.h) on cuBLASLt (gemm_lt.cu). Kernels
// at the top: c *= beta (alpha = 0 or K = 0, where a and
// b must not be read), the bias add used when the cuBLASLt epilogue cannot be, and dbias as
// deterministic column sums. Shapes: M rows (leading dims of inp flattened), K in, N out features.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/gemm_lt.h"

namespace tessera::cuda {

namespace {

constexpr int kColsumRows = 256;  // rows of dout per partial sum (stage 1 of dbias)
constexpr int kColsumWidth = 32;  // columns per block: one warp reads 32 adjacent columns
constexpr int kColsumLanes = 8;   // row lanes per block, reduced in a fixed order

// c = beta * c, with beta = 0 writing zeros (c may hold NaN, which must not survive).
template <class T>
__global__ void scale_kernel(T* c, int64_t count, float beta) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    c[i] = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(c[i]));
}

// out (M,N) += bias (N) on every row.
template <class T>
__global__ void add_bias_kernel(T* out, const T* bias, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(to_f32(out[i]) + to_f32(bias[i % n]));
}

// Stage 1 of dbias: partial (num_chunks, N) f32, partial[chunk][j] = sum of dout[i][j] over the
// chunk's rows. Block (kColsumWidth, kColsumLanes): x walks columns (coalesced), y strides rows;
// the y partials are added in index order, so the result is the same on every run.
template <class T>
__global__ void colsum_partial_kernel(float* partial, const T* dout, int64_t m, int64_t n,
                                      int64_t rows_per_chunk) {
  __shared__ float sums[kColsumLanes][kColsumWidth];
  const int64_t col = int64_t(blockIdx.x) * kColsumWidth + threadIdx.x;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = std::min(m, row_begin + rows_per_chunk);
  float s = 0.0f;
  if (col < n)
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kColsumLanes)
      s += to_f32(dout[r * n + col]);
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total = 0.0f;
    for (int y = 0; y < kColsumLanes; ++y) total += sums[y][threadIdx.x];
    partial[int64_t(blockIdx.y) * n + col] = total;
  }
}

// Stage 2: dbias[j] += sum of partial[chunk][j] over chunks, in chunk order. dbias has dout's
// dtype or is f32.
template <class T>
__global__ void colsum_final_kernel(T* dbias, const float* partial, int64_t num_chunks, int64_t n) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= n) return;
  float total = 0.0f;
  for (int64_t c = 0; c < num_chunks; ++c) total += partial[c * n + col];
  dbias[col] = from_f32<T>(to_f32(dbias[col]) + total);
}

// ---- launchers -------------------------------------------------------------------------------

struct GemmDims {
  int64_t m = 0, n = 0, k = 0;
};

bool overlap(const Tensor& a, const Tensor& b) {
  if (a.empty() || b.empty()) return false;
  const char* a0 = static_cast<const char*>(a.data);
  const char* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

int grid_for(int64_t count) {
  return static_cast<int>(std::clamp<int64_t>((count + 255) / 256, 1, 65535));
}

void check_float_arg(const Tensor& t, DType dtype, const char* op, const char* name) {
  TS_CHECK(t.device == Device::cuda, "{}: {} must be on cuda, got {}", op, name, t.str());
  TS_CHECK(t.dtype == dtype, "{}: {} must be {} like the other operands, got {}", op, name,
           dtype_name(dtype), t.str());
}

void check_compute(const Tensor& t, const char* op, const char* name) {
  TS_CHECK(is_compute_dtype(t.dtype), "{}: {} must be f32, bf16 or f16, got {}", op, name, t.str());
  check_float_arg(t, t.dtype, op, name);
}

// A parameter gradient (+=) beside operands of dtype `dtype`: that dtype, or f32 (kernels/ops.h).
void check_param_grad(const Tensor& t, DType dtype, const char* op, const char* name) {
  TS_CHECK(t.device == Device::cuda, "{}: {} must be on cuda, got {}", op, name, t.str());
  TS_CHECK(t.dtype == dtype || t.dtype == DType::f32,
           "{}: {} must be {} like the other operands, or f32, got {}", op, name, dtype_name(dtype),
           t.str());
}

int64_t rows_of(const Tensor& t) { return t.ndim() == 0 ? 1 : t.numel() / t.dim(-1); }

// c = beta * c (the whole product vanishes: alpha = 0 or K = 0).
void scale_c(Tensor c, float beta, ops::Stream stream) {
  if (beta == 1.0f || c.numel() == 0) return;
  dispatch_float(c, "gemm", [&]<class T>() {
    scale_kernel<T><<<grid_for(c.numel()), 256, 0, cuda_stream(stream)>>>(static_cast<T*>(c.data),
                                                                          c.numel(), beta);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void add_bias(Tensor out, Tensor bias, int64_t m, int64_t n, ops::Stream stream) {
  dispatch_float(out, "matmul_forward", [&]<class T>() {
    add_bias_kernel<T><<<grid_for(m * n), 256, 0, cuda_stream(stream)>>>(
        static_cast<T*>(out.data), static_cast<const T*>(bias.data), m, n);
    TS_CUDA_CHECK_LAUNCH();
  });
}

// The checked GEMM: cuBLASLt, or our FMA kernel where cuBLASLt has no algorithm.
void run_gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
              GemmDims d, ops::Stream stream) {
  if (d.m == 0 || d.n == 0) return;
  if (alpha == 0.0f || d.k == 0) return scale_c(c, beta, stream);
  LtGemm g;
  g.m = d.m, g.n = d.n, g.k = d.k, g.trans_a = trans_a, g.trans_b = trans_b;
  g.dtype = a.dtype, g.c_dtype = c.dtype;
  g.a = a.data, g.b = b.data, g.c = c.data, g.alpha = alpha, g.beta = beta;
  if (!lt_gemm(g, stream)) gemm_simt(c, a, b, trans_a, trans_b, alpha, beta, stream);
}

// dbias (N) += column sums of dout (M,N), through f32 partials in the context workspace (free
// here: the device's ops run one after another, so cuBLASLt is done with it).
void accumulate_column_sums(Tensor dbias, Tensor dout, int64_t m, int64_t n, ops::Stream stream) {
  if (m == 0 || n == 0) return;
  const Context& ctx = context();
  const int64_t max_chunks = int64_t(ctx.workspace_bytes / (sizeof(float) * n));
  TS_CHECK(max_chunks >= 1, "matmul_backward: N = {} too wide for the dbias workspace", n);
  int64_t rows_per_chunk = std::max<int64_t>(kColsumRows, (m + max_chunks - 1) / max_chunks);
  rows_per_chunk = std::max<int64_t>(rows_per_chunk, (m + 65534) / 65535);  // grid.y limit
  const int64_t num_chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  float* partial = static_cast<float*>(ctx.workspace);
  dispatch_float(dout, "matmul_backward", [&]<class T>() {
    const dim3 grid(ceil_div(n, kColsumWidth), static_cast<unsigned>(num_chunks));
    colsum_partial_kernel<T><<<grid, dim3(kColsumWidth, kColsumLanes), 0, cuda_stream(stream)>>>(
        partial, static_cast<const T*>(dout.data), m, n, rows_per_chunk);
    TS_CUDA_CHECK_LAUNCH();
    const auto final_sum = [&]<class TD>() {
      colsum_final_kernel<TD><<<ceil_div(n, 256), 256, 0, cuda_stream(stream)>>>(
          static_cast<TD*>(dbias.data), partial, num_chunks, n);
      TS_CUDA_CHECK_LAUNCH();
    };
    if (dbias.dtype == dout.dtype)
      final_sum.template operator()<T>();
    else
      final_sum.template operator()<float>();
  });
}

// Shared checks of the linear layer: returns (M, N, K) of out (M,N) = inp (M,K) weight (N,K)^T.
GemmDims check_linear(const Tensor& out, const Tensor& inp, const Tensor& weight,
                      const Tensor& bias, const char* op) {
  check_compute(out, op, "out");
  check_float_arg(inp, out.dtype, op, "inp");
  check_float_arg(weight, out.dtype, op, "weight");
  TS_CHECK(weight.ndim() == 2, "{}: weight must be (N, K), got {}", op, weight.str());
  TS_CHECK(inp.ndim() >= 1, "{}: inp must be (..., K), got {}", op, inp.str());
  GemmDims d{rows_of(inp), weight.dim(0), weight.dim(1)};
  TS_CHECK(inp.dim(-1) == d.k, "{}: inp {} does not end in K={} of weight {}", op, inp.str(), d.k,
           weight.str());
  Shape out_shape = inp.shape;
  out_shape.dims[out_shape.ndim - 1] = d.n;
  expect_shape(out, out_shape, op);
  if (!bias.empty()) {
    check_float_arg(bias, out.dtype, op, "bias");
    expect_shape(bias, Shape{d.n}, op);
  }
  return d;
}

}  // namespace

void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
          ops::Stream stream) {
  constexpr const char* kOp = "gemm";
  check_compute(c, kOp, "c");
  check_compute(a, kOp, "a");
  check_float_arg(b, a.dtype, kOp, "b");
  // c has the operands' dtype, or is f32 beside 16-bit a and b (an FP32 weight gradient).
  TS_CHECK(c.dtype == a.dtype || (c.dtype == DType::f32 && a.dtype != DType::f32),
           "{}: c {} beside a {}: c must be {} or f32", kOp, c.str(), a.str(), dtype_name(a.dtype));
  TS_CHECK(c.ndim() == 2 && a.ndim() == 2 && b.ndim() == 2,
           "{}: c, a and b must be 2-D, got c {}, a {}, b {}", kOp, c.str(), a.str(), b.str());
  GemmDims d{c.dim(0), c.dim(1), trans_a ? a.dim(0) : a.dim(1)};
  expect_shape(a, trans_a ? Shape{d.k, d.m} : Shape{d.m, d.k}, "gemm: a");
  expect_shape(b, trans_b ? Shape{d.n, d.k} : Shape{d.k, d.n}, "gemm: b");
  TS_CHECK(!overlap(c, a) && !overlap(c, b), "{}: c must not alias a or b", kOp);
  run_gemm(c, a, b, trans_a, trans_b, alpha, beta, d, stream);
}

void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias, ops::Stream stream) {
  constexpr const char* kOp = "matmul_forward";
  const GemmDims d = check_linear(out, inp, weight, bias, kOp);
  for (const Tensor* t : {&inp, &weight, &bias})
    TS_CHECK(!overlap(out, *t), "{}: out {} overlaps an input {}", kOp, out.str(), t->str());
  if (d.m == 0 || d.n == 0) return;
  const Tensor out_2d = out.view({d.m, d.n}), inp_2d = inp.view({d.m, d.k});
  if (!bias.empty() && d.k > 0 && aligned16(bias)) {
    LtGemm g;
    g.m = d.m, g.n = d.n, g.k = d.k, g.trans_b = true, g.dtype = g.c_dtype = out.dtype;
    g.a = inp.data, g.b = weight.data, g.c = out.data;
    g.epilogue = GemmEpilogue::bias, g.bias = bias.data;
    if (lt_gemm(g, stream)) return;
  }
  // No bias, or the epilogue is unavailable: plain GEMM, then the bias as its own pass.
  run_gemm(out_2d, inp_2d, weight, false, true, 1.0f, 0.0f, d, stream);
  if (!bias.empty()) add_bias(out_2d, bias, d.m, d.n, stream);
}

void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                     Tensor weight, ops::Stream stream) {
  constexpr const char* kOp = "matmul_backward";
  const GemmDims d = check_linear(dout, inp, weight, Tensor(), kOp);
  // dweight and dbias: dout's dtype, or f32 (FP32 main gradients accumulated in place).
  check_param_grad(dweight, dout.dtype, kOp, "dweight");
  expect_shape(dweight, weight.shape, kOp);
  if (!dbias.empty()) {
    check_param_grad(dbias, dout.dtype, kOp, "dbias");
    expect_shape(dbias, Shape{d.n}, kOp);
  }
  if (!dinp.empty()) {
    check_float_arg(dinp, dout.dtype, kOp, "dinp");
    expect_shape(dinp, inp.shape, kOp);
  }
  for (const Tensor* grad : {&dinp, &dweight, &dbias})
    for (const Tensor* input : {&dout, &inp, &weight})
      TS_CHECK(!overlap(*grad, *input), "{}: gradient {} overlaps input {}", kOp, grad->str(),
               input->str());
  TS_CHECK(!overlap(dinp, dweight) && !overlap(dinp, dbias) && !overlap(dweight, dbias),
           "{}: gradients overlap each other", kOp);
  const Tensor dout_2d = dout.view({d.m, d.n}), inp_2d = inp.view({d.m, d.k});
  // dinp (M,K) = dout (M,N) · weight (N,K); dweight (N,K) += dout^T (N,M) · inp (M,K).
  if (!dinp.empty())
    run_gemm(dinp.view({d.m, d.k}), dout_2d, weight, false, false, 1.0f, 0.0f, {d.m, d.k, d.n},
             stream);
  run_gemm(dweight, dout_2d, inp_2d, true, false, 1.0f, 1.0f, {d.n, d.k, d.m}, stream);
  if (!dbias.empty()) accumulate_column_sums(dbias, dout, d.m, d.n, stream);
}

}  // namespace tessera::cuda
