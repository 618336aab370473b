// The CUDA device context: one compute stream, cuBLASLt and cuDNN handles and a GEMM workspace per
// device, created on first use. Ops in kernels/cuda queue work on context().stream; the trainer
// synchronizes through sync(). Plain C++ (no CUDA syntax) so host code can include it.
// Communicators are NOT here: they are passed explicitly (src/parallel).
#pragma once
#include <cstddef>

// Opaque handles, so including this header needs no CUDA headers.
struct CUstream_st;
struct cublasLtContext;
struct cudnnContext;

namespace tessera::cuda {

struct Context {
  int device = 0;
  CUstream_st* stream = nullptr;       // cudaStream_t: the legacy default stream (see context.cu)
  cublasLtContext* cublaslt = nullptr;  // cublasLtHandle_t
  cudnnContext* cudnn = nullptr;        // cudnnHandle_t (created on first attention use)
  void* workspace = nullptr;            // GEMM / attention workspace
  size_t workspace_bytes = 0;
  int num_sms = 0;
  // Attention implementation for ops::attention_*: 0 = cuDNN fused SDPA, 1 = native kernel.
  // Set by the trainer from model.attention_impl (a per-device setting, like the stream).
  int attention_impl = 0;
};
enum AttentionImpl { kAttentionCudnn = 0, kAttentionNative = 1 };

// The calling thread's current device's context (cudaGetDevice), created on first use.
Context& context();
// Waits for all work queued on the context stream; checks for asynchronous errors.
void sync();
// Bytes of device memory free and total on the current device.
void device_memory(size_t* free_bytes, size_t* total_bytes);

}  // namespace tessera::cuda
