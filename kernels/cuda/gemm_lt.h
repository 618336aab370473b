// The cuBLASLt GEMM layer under the CUDA matmul ops (kernels/cuda/matmul.cu): one row-major call
// (lt_gemm) with optional bias or bias+GELU epilogue, whose heuristic result, matmul descriptor and
// matrix layouts are cached per shape; our own FMA GEMM (gemm_simt) for calls cuBLASLt has no
// algorithm for; and the fused fc+GELU linear, which is outside the op contract (kernels/ops.h).
// Plain C++ so host code (the model, tests) can include it.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"

namespace tessera::cuda {

enum class GemmEpilogue : int { none = 0, bias = 1, gelu_aux_bias = 2 };

// Row-major c (M,N) = alpha * op(a) · op(b) + beta * c, as ops::gemm, then the epilogue:
//   bias:          c += bias (N) on every row.
//   gelu_aux_bias: aux (M,N) = op(a)·op(b) + bias; c = gelu_tanh(aux) (alpha 1, beta 0 only).
// a, b, c, bias, aux share dtype (f32, bf16 or f16); accumulation is f32 (never TF32).
struct LtGemm {
  int64_t m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
  DType dtype = DType::f32;
  const void* a = nullptr;  // (M,K), or (K,M) if trans_a
  const void* b = nullptr;  // (K,N), or (N,K) if trans_b
  void* c = nullptr;        // (M,N)
  float alpha = 1.0f, beta = 0.0f;
  GemmEpilogue epilogue = GemmEpilogue::none;
  const void* bias = nullptr;  // (N)
  void* aux = nullptr;         // (M,N), gelu_aux_bias only
};

// Queues the GEMM on stream() with cuBLASLt. Needs m, n, k >= 1 and alpha != 0 (the callers
// handle the degenerate cases). Returns false, queuing nothing, when cuBLASLt offers no algorithm
// for this shape, dtype, epilogue and pointer alignment (remembered: the question is asked once).
bool lt_gemm(const LtGemm& g);

// Whether lt_gemm would run g (builds and caches the plan; queues nothing).
bool lt_gemm_available(const LtGemm& g);

// Number of cached cuBLASLt plans (positive and negative), for tests of the cache.
size_t lt_gemm_plan_count();

// Our own tiled FMA GEMM (f32 accumulation, no tensor cores), same contract as ops::gemm; the
// fallback where lt_gemm returns false. Slow: never on the hot path of the models' shapes.
void gemm_simt(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta);

// Fused fc + GELU (out of the op contract), for the model's MLP:
//   out_pre (M,N) = inp (M,K) · weight (N,K)^T + bias (N)    (what gelu_backward needs)
//   out_act (M,N) = gelu_tanh(out_pre)                        (computed from the f32 value)
// Equal to matmul_forward followed by gelu_forward up to rounding. matmul_gelu_supported says
// whether cuBLASLt can run it for these tensors (N a multiple of 8, 16-byte aligned pointers, an
// algorithm for the shape); matmul_gelu_forward fails with a bug error when it cannot, so callers
// check first and otherwise use matmul_forward + gelu_forward.
bool matmul_gelu_supported(Tensor out_pre, Tensor out_act, Tensor inp, Tensor weight, Tensor bias);
void matmul_gelu_forward(Tensor out_pre /*(M,N)*/, Tensor out_act /*(M,N)*/, Tensor inp /*(M,K)*/,
                         Tensor weight /*(N,K)*/, Tensor bias /*(N)*/);

}  // namespace tessera::cuda
