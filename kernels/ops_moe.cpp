// Dispatch of the MoE ops (kernels/ops_moe.h) to their backend, chosen by the device of the first
// non-empty tensor (kernels/dispatch.h). Index tensors are i32 on both backends.
#include "kernels/ops_moe.h"

#include "kernels/cpu/moe.h"
#include "kernels/dispatch.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/moe.h"
#endif

namespace tessera::ops {

using detail::dispatch;

// ---- router ---------------------------------------------------------------------------------

// (end of router)

// ---- dispatch plan, permute, unpermute ------------------------------------------------------

// (end of permute)

// ---- grouped GEMM ---------------------------------------------------------------------------

// (end of grouped GEMM)

}  // namespace tessera::ops
