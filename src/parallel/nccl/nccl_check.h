// Return-code checks for the CUDA runtime and NCCL calls in src/parallel/nccl, funnelling into
// tessera::fail as system errors with file:line (the rank is prefixed by the funnel). The context
// arguments are a fmt format, formatted only on failure.
#pragma once
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include "core/error.h"

#define TS_PAR_CUDA_CHECK(call, ...)                                                        \
  do {                                                                                      \
    const cudaError_t ts_err_ = (call);                                                     \
    if (ts_err_ != cudaSuccess) [[unlikely]]                                                \
      ::tessera::fail(::tessera::ErrorKind::system,                                         \
                      ::fmt::format("CUDA: {} failed: {} [{}]", ::fmt::format(__VA_ARGS__), \
                                    cudaGetErrorString(ts_err_), #call),                    \
                      __FILE__, __LINE__);                                                  \
  } while (0)

// `comm` may be null (before init); NCCL's last error adds the detail its status code lacks.
#define TS_NCCL_CHECK(call, comm, ...)                                                           \
  do {                                                                                           \
    const ncclResult_t ts_res_ = (call);                                                         \
    if (ts_res_ != ncclSuccess) [[unlikely]]                                                     \
      ::tessera::fail(::tessera::ErrorKind::system,                                              \
                      ::fmt::format("NCCL: {} failed: {} ({}) [{}]", ::fmt::format(__VA_ARGS__), \
                                    ncclGetErrorString(ts_res_), ncclGetLastError(comm), #call), \
                      __FILE__, __LINE__);                                                       \
  } while (0)
