// The cuBLASLt GEMM layer under the CUDA matmul ops (kernels/cuda/matmul.cu): one row-major call
// (lt_gemm) with an optional bias epilogue, whose heuristic result, matmul descriptor and matrix
// layouts are cached per shape; and our own FMA GEMM (gemm_simt) for calls cuBLASLt has no
// algorithm for. Plain C++ so host code (tests) can include it.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

enum class GemmEpilogue : int { none = 0, bias = 1 };

// Row-major c (M,N) = alpha * op(a) · op(b) + beta * c, as ops::gemm, then the epilogue:
//   bias:          c += bias (N) on every row.
// a, b and bias share dtype (f32, bf16 or f16); c has it too, or is f32 beside bf16/f16 a and b
// (an FP32 weight gradient accumulated straight from 16-bit operands; no epilogue then).
// Accumulation is f32 (never TF32).
struct LtGemm {
  int64_t m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
  DType dtype = DType::f32;    // a, b, bias
  DType c_dtype = DType::f32;  // c: dtype, or f32 (set both explicitly)
  const void* a = nullptr;     // (M,K), or (K,M) if trans_a
  const void* b = nullptr;     // (K,N), or (N,K) if trans_b
  void* c = nullptr;           // (M,N)
  float alpha = 1.0f, beta = 0.0f;
  GemmEpilogue epilogue = GemmEpilogue::none;
  const void* bias = nullptr;  // (N)
};

// Queues the GEMM on `stream` with cuBLASLt. Needs m, n, k >= 1 and alpha != 0 (the callers
// handle the degenerate cases). Returns false, queuing nothing, when cuBLASLt offers no algorithm
// for this shape, dtype, epilogue and pointer alignment (remembered: the question is asked once).
bool lt_gemm(const LtGemm& g, ops::Stream stream = {});

// Number of cached cuBLASLt plans (positive and negative), for tests of the cache.
size_t lt_gemm_plan_count();

// Our own tiled FMA GEMM (f32 accumulation, no tensor cores), same contract as ops::gemm; the
// fallback where lt_gemm returns false. Slow: never on the hot path of the models' shapes.
void gemm_simt(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
               ops::Stream stream = {});

}  // namespace tessera::cuda
