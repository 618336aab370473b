// select_local_gpu (declared in mpi_runtime.h): one GPU per rank on a node, by local rank. Here
// because it needs the CUDA runtime, which src/parallel uses only under TESSERA_CUDA.
#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_runtime.h"
#include "parallel/nccl/nccl_check.h"

namespace tessera {

int select_local_gpu() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    TS_USER_ERROR("a CUDA device was requested but rank {} sees none ({})", world_rank(),
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
  }
  const int local = local_rank();
  const int device = local % count;
  if (local >= count) {
    log_warn(
        "local rank {} shares GPU {} with local rank {}: {} GPUs for more ranks on this node; "
        "NCCL refuses a group with two ranks on one GPU",
        local, device, device, count);
  }
  TS_PAR_CUDA_CHECK(cudaSetDevice(device), "selecting GPU {} for local rank {}", device, local);
  return device;
}

}  // namespace tessera
