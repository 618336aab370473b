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
// Router tensors are f32 (f64 on the CPU) whatever the model's dtype: no NarrowScope; the backends
// reject any other dtype.

void moe_router_forward(Tensor probs, Tensor lse, Tensor topk_idx, Tensor topk_w, Tensor logits,
                        bool norm_topk_prob, Stream stream) {
  dispatch("moe_router_forward", {&probs, &lse, &topk_idx, &topk_w, &logits}, stream,
           TS_ON_CUDA(cuda::moe_router_forward(probs, lse, topk_idx, topk_w, logits, norm_topk_prob,
                                               stream)),
           [&] { cpu::moe_router_forward(probs, lse, topk_idx, topk_w, logits, norm_topk_prob); });
}

void moe_router_loss(Tensor loss, Tensor probs, Tensor lse, Tensor tokens_per_expert,
                     double aux_scale, double z_scale, Stream stream) {
  dispatch("moe_router_loss", {&loss, &probs, &lse, &tokens_per_expert}, stream,
           TS_ON_CUDA(cuda::moe_router_loss(loss, probs, lse, tokens_per_expert, aux_scale, z_scale,
                                            stream)),
           [&] { cpu::moe_router_loss(loss, probs, lse, tokens_per_expert, aux_scale, z_scale); });
}

void moe_router_backward(Tensor d_logits, Tensor d_topk_w, Tensor probs, Tensor lse,
                         Tensor topk_idx, Tensor tokens_per_expert, double aux_scale,
                         double z_scale, bool norm_topk_prob, Stream stream) {
  dispatch("moe_router_backward", {&d_logits, &d_topk_w, &probs, &lse, &topk_idx}, stream,
           TS_ON_CUDA(cuda::moe_router_backward(d_logits, d_topk_w, probs, lse, topk_idx,
                                                tokens_per_expert, aux_scale, z_scale,
                                                norm_topk_prob, stream)),
           [&] {
             cpu::moe_router_backward(d_logits, d_topk_w, probs, lse, topk_idx, tokens_per_expert,
                                      aux_scale, z_scale, norm_topk_prob);
           });
}

// (end of router)

// ---- dispatch plan, permute, unpermute ------------------------------------------------------

// (end of permute)

// ---- grouped GEMM ---------------------------------------------------------------------------

// (end of grouped GEMM)

}  // namespace tessera::ops
