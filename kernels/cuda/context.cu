// Per-device CUDA context: cuBLASLt handle, workspace (cuDNN handle lazily, in
// attention_cudnn.cu). Contexts live for the process; the driver reclaims them at exit.
#include <cudnn.h>

#include <mutex>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace tessera::cuda {

namespace {
constexpr size_t kWorkspaceBytes = size_t(64) << 20;  // cuBLASLt wants >= 32 MiB on Hopper
std::mutex g_mutex;
std::vector<Context*> g_contexts;
}  // namespace

Context& context() {
  int dev = 0;
  TS_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(g_mutex);
  if (static_cast<int>(g_contexts.size()) <= dev) g_contexts.resize(dev + 1, nullptr);
  if (!g_contexts[dev]) {
    auto* c = new Context();
    c->device = dev;
    cublasLtHandle_t lt;
    TS_CUBLAS_CHECK(cublasLtCreate(&lt));
    c->cublaslt = reinterpret_cast<cublasLtContext*>(lt);
    TS_CUDA_CHECK(cudaMalloc(&c->workspace, kWorkspaceBytes));
    c->owns_workspace = true;
    c->workspace_bytes = kWorkspaceBytes;
    TS_CUDA_CHECK(cudaDeviceGetAttribute(&c->num_sms, cudaDevAttrMultiProcessorCount, dev));
    g_contexts[dev] = c;
  }
  return *g_contexts[dev];
}

void use_workspace(void* ptr, size_t bytes) {
  Context& c = context();
  TS_CHECK(ptr != nullptr && bytes >= kWorkspaceBytes, "workspace of {} bytes (need >= {})", bytes,
           kWorkspaceBytes);
  TS_CUDA_CHECK(
      cudaDeviceSynchronize());  // nothing queued on any stream may still use the old buffer
  if (c.owns_workspace) TS_CUDA_CHECK(cudaFree(c.workspace));
  c.workspace = ptr;
  c.workspace_bytes = bytes;
  c.owns_workspace = false;
}

size_t default_workspace_bytes() { return kWorkspaceBytes; }

void sync(ops::Stream stream) { TS_CUDA_CHECK(cudaStreamSynchronize(cuda_stream(stream))); }

}  // namespace tessera::cuda
