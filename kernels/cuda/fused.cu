// Contract entry points of the fused sequences (kernels/ops.h) on CUDA: thin adapters onto the
// one-pass kernels in layernorm.cu (fused.h) and adamw.cu (adamw_multi.h).
#include <vector>

#include "kernels/cuda/adamw_multi.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/fused.h"

namespace tessera::cuda {

void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps) {
  fused_residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, eps);
}

void adamw_update_multi(std::span<const ops::AdamWTensors> entries) {
  std::vector<AdamWEntry> converted;
  converted.reserve(entries.size());
  for (const ops::AdamWTensors& e : entries)
    converted.push_back({e.param, e.grad, e.m, e.v, e.step});
  adamw_update_multi(std::span<const AdamWEntry>(converted));
}

}  // namespace tessera::cuda
