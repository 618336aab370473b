// The cuBLASLt heuristic query shared by the BF16/F32 GEMM layer (gemm_lt.cu) and the FP8 GEMM
// (gemm_fp8.cu): workspace limit, operand alignments, best algorithm. CUDA units only.
#pragma once
#include <cublasLt.h>

#include <cstdint>

namespace tessera::cuda {

// The best algorithm cuBLASLt's heuristic offers for a planned matmul, within the context's
// workspace; align holds the byte alignments of a, b and c in Tessera's row-major operand order
// (cuBLASLt sees the product transposed: its A is our b). False when cuBLASLt has none
// (NOT_SUPPORTED); any other failure throws.
bool lt_best_algo(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t layout_a,
                  cublasLtMatrixLayout_t layout_b, cublasLtMatrixLayout_t layout_c,
                  const int64_t align[3], cublasLtMatmulAlgo_t* algo);

}  // namespace tessera::cuda
