// The CUDA device context: one compute stream, cuBLASLt and cuDNN handles and a GEMM workspace per
// device, created on first use. Ops in kernels/cuda queue work on context().stream; the trainer
// synchronizes through sync(). Plain C++ (no CUDA syntax) so host code can include it.
// Communicators are NOT here: they are passed explicitly (src/parallel).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

// Opaque handles, so including this header needs no CUDA headers.
struct CUstream_st;
struct cublasLtContext;
struct cudnnContext;

namespace tessera::cuda {

struct Context {
  int device = 0;
  CUstream_st* stream = nullptr;        // cudaStream_t: the legacy default stream (see context.cu)
  cublasLtContext* cublaslt = nullptr;  // cublasLtHandle_t
  cudnnContext* cudnn = nullptr;        // cudnnHandle_t (created on first attention use)
  void* workspace = nullptr;            // GEMM / attention workspace
  size_t workspace_bytes = 0;
  bool owns_workspace = false;  // false once use_workspace() handed it an arena slice
  int num_sms = 0;
  // Attention implementation for ops::attention_*: 0 = cuDNN fused SDPA, 1 = native kernel.
  // Set by the trainer from model.attention_impl (a per-device setting, like the stream).
  int attention_impl = 0;
};
enum AttentionImpl { kAttentionCudnn = 0, kAttentionNative = 1 };

// The calling thread's current device's context (cudaGetDevice), created on first use.
Context& context();
// Replaces the context workspace with `bytes` at `ptr` (a slice of the caller's arena, which must
// outlive its use); the default buffer is freed. Sized with attention_workspace_bytes().
void use_workspace(void* ptr, size_t bytes);
size_t default_workspace_bytes();  // what GEMMs need at least (64 MiB)
// Scratch that attention needs for these shapes and the activation dtype (f32, bf16, f16) on the
// current implementation (builds cuDNN plans for 16-bit dtypes).
size_t attention_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                 int64_t head_dim, DType dtype);
// Waits for all work queued on the context stream; checks for asynchronous errors.
void sync();
// Bytes of device memory free and total on the current device.
void device_memory(size_t* free_bytes, size_t* total_bytes);

}  // namespace tessera::cuda
