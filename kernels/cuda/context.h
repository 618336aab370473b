// The CUDA device context: cuBLASLt and cuDNN handles and a GEMM workspace per device, created on
// first use. Streams are NOT here: every op takes the stream it queues on (kernels/op_types.h
// ops::Stream, default the legacy stream), and neither are communicators (src/parallel). Plain C++
// (no CUDA syntax) so host code can include it.
// Hazard: the workspace is one buffer per device, used by GEMMs, the norm and bias gradients,
// rope, sum_squares, embedding_backward and attention. Ops on one stream are ordered; ops that use
// it must not run concurrently on two streams (today every op runs on one compute stream).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "kernels/op_types.h"

// Opaque handles, so including this header needs no CUDA headers.
struct cublasLtContext;
struct cudnnContext;

namespace tessera::cuda {

struct Context {
  int device = 0;
  cublasLtContext* cublaslt = nullptr;  // cublasLtHandle_t
  cudnnContext* cudnn = nullptr;        // cudnnHandle_t (created on first attention use)
  void* workspace = nullptr;            // GEMM / attention workspace
  size_t workspace_bytes = 0;
  bool owns_workspace = false;  // false once use_workspace() handed it an arena slice
  int num_sms = 0;
};

// The calling thread's current device's context (cudaGetDevice), created on first use.
Context& context();
// Replaces the context workspace with `bytes` at `ptr` (a slice of the caller's arena, which must
// outlive its use); the default buffer is freed. Sized with attention_workspace_bytes().
void use_workspace(void* ptr, size_t bytes);
size_t default_workspace_bytes();  // what GEMMs need at least (64 MiB)
// Scratch that attention needs for these shapes and the activation dtype (f32, bf16, f16) under
// `impl` (builds cuDNN plans for 16-bit dtypes).
size_t attention_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                 int64_t head_dim, DType dtype, ops::AttentionImpl impl);
// Waits for all work queued on `stream`; checks for asynchronous errors.
void sync(ops::Stream stream = {});

}  // namespace tessera::cuda
