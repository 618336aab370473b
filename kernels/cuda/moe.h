// CUDA versions of the MoE op family (kernels/ops_moe.h documents each op; the CPU references with
// the same names are in kernels/cpu/moe.h): moe_router.cu, moe_permute.cu, grouped_gemm.cu. All
// queue work on the stream they take and never synchronize with the host. Plain C++ header.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::cuda {

void moe_router_forward(Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K) i32*/,
                        Tensor topk_w /*(N,K)*/, Tensor logits /*(N,E)*/, bool norm_topk_prob,
                        ops::Stream stream = {});
void moe_router_loss(Tensor loss /*(2) f32|f64*/, Tensor probs /*(N,E)*/, Tensor lse /*(N)*/,
                     Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale,
                     ops::Stream stream = {});
void moe_router_backward(Tensor d_logits /*(N,E)*/, Tensor d_topk_w /*(N,K)*/,
                         Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K)*/,
                         Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale,
                         bool norm_topk_prob, ops::Stream stream = {});
void moe_dispatch_plan(Tensor tokens_per_expert /*(E) i32*/, Tensor offsets /*(E+1) i32*/,
                       Tensor slot_row /*(N,K) i32*/, Tensor row_slot /*(R) i32*/,
                       Tensor topk_idx /*(N,K) i32*/, int64_t capacity, ops::Stream stream = {});
void moe_permute(Tensor xp /*(R,C)*/, Tensor x /*(N,C)*/, Tensor row_slot /*(R) i32*/, int topk,
                 ops::Stream stream = {});
void moe_permute_backward(Tensor dx /*(N,C)*/, Tensor dxp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                          ops::Stream stream = {});
void moe_unpermute(Tensor out /*(N,C)*/, Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                   Tensor topk_w /*(N,K)*/, ops::Stream stream = {});
void moe_unpermute_backward(Tensor dyp /*(R,C)*/, Tensor d_topk_w /*(N,K)*/, Tensor dout /*(N,C)*/,
                            Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                            Tensor row_slot /*(R) i32*/, Tensor topk_w /*(N,K)*/,
                            ops::Stream stream = {});
void grouped_gemm_forward(Tensor y /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                          Tensor offsets /*(G+1) i32*/, ops::Stream stream = {});
void grouped_gemm_backward(Tensor dx /*(R,K') or empty*/, Tensor dw /*(G,N',K') +=*/,
                           Tensor dy /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                           Tensor offsets /*(G+1) i32*/, ops::Stream stream = {});

}  // namespace tessera::cuda
