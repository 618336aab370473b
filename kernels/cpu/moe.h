// CPU references of the MoE op family (kernels/ops_moe.h documents each op): same names and
// argument order as the CUDA versions in kernels/cuda/moe.h, without the stream. Plain loops, sums
// in double.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace tessera::cpu {

void moe_router_forward(Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K) i32*/,
                        Tensor topk_w /*(N,K)*/, Tensor logits /*(N,E)*/, bool norm_topk_prob);
void moe_router_loss(Tensor loss /*(2) f32|f64*/, Tensor probs /*(N,E)*/, Tensor lse /*(N)*/,
                     Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale);
void moe_router_backward(Tensor d_logits /*(N,E)*/, Tensor d_topk_w /*(N,K)*/,
                         Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K)*/,
                         Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale,
                         bool norm_topk_prob);
void moe_dispatch_plan(Tensor tokens_per_expert /*(E) i32*/, Tensor offsets /*(E+1) i32*/,
                       Tensor slot_row /*(N,K) i32*/, Tensor row_slot /*(R) i32*/,
                       Tensor topk_idx /*(N,K) i32*/, int64_t capacity);
void moe_permute(Tensor xp /*(R,C)*/, Tensor x /*(N,C)*/, Tensor row_slot /*(R) i32*/, int topk);
void moe_permute_backward(Tensor dx /*(N,C)*/, Tensor dxp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/);
void moe_unpermute(Tensor out /*(N,C)*/, Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                   Tensor topk_w /*(N,K)*/);
void moe_unpermute_backward(Tensor dyp /*(R,C)*/, Tensor d_topk_w /*(N,K)*/, Tensor dout /*(N,C)*/,
                            Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                            Tensor row_slot /*(R) i32*/, Tensor topk_w /*(N,K)*/);
void grouped_gemm_forward(Tensor y /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                          Tensor offsets /*(G+1) i32*/);
void grouped_gemm_backward(Tensor dx /*(R,K') or empty*/, Tensor dw /*(G,N',K') +=*/,
                           Tensor dy /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                           Tensor offsets /*(G+1) i32*/);

}  // namespace tessera::cpu
