// The Mixture-of-Experts op family (issue 13): the router (softmax, top-k, its losses), the
// dispatch plan and token permute/unpermute, and the grouped GEMM of the experts. Same rules as
// kernels/ops.h (dispatch on the device of the first non-empty tensor; forward overwrites;
// backward overwrites activation gradients and accumulates parameter gradients; trailing Stream).
// CPU references in kernels/cpu/moe_router.cpp, moe_permute.cpp, grouped_gemm.cpp (declared in
// kernels/cpu/moe.h); CUDA in kernels/cuda/moe_router.cu, moe_permute.cu, grouped_gemm.cu
// (kernels/cuda/moe.h). No op here synchronizes with the host on the GPU: expert counts and
// offsets stay on the device.
//
// Shape letters: N tokens, E experts, K top-k (slots per token), C model width, F expert FFN
// width, R rows of a permuted buffer (R >= the rows kept; rows past the kept ones are "unused"),
// G groups of a grouped GEMM, M/N'/K' its sizes. A slot s = t*K + j is token t's j-th choice.
// Index tensors (topk_idx, tokens_per_expert, offsets, slot_row, row_slot) are i32.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::ops {

// ---- router ---------------------------------------------------------------------------------
// Router math is f32 (f64 on the CPU for finite differences), whatever the compute dtype.
// probs[t,:] = softmax(logits[t,:]); lse[t] = logsumexp(logits[t,:]);
// topk_idx[t,:] = the K experts of largest probability, in descending order of probability, ties
// broken towards the lower expert index (so CPU and GPU agree bit for bit on the choice). The
// choice is made on the logits (softmax is strictly increasing), which both backends read
// identically, so it never depends on how a backend rounds probabilities: larger logit first,
// equal logits (-0 == +0) by lower index, NaN logits last (a NaN logit makes its row's probs and
// lse NaN; -inf logits are masked experts, probability 0);
// topk_w[t,j] = probs[t, topk_idx[t,j]] (equal bit for bit), divided by Σ_j of those when
// norm_topk_prob (Qwen3/Mixtral renormalisation). 1 <= K <= E.
void moe_router_forward(Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K) i32*/,
                        Tensor topk_w /*(N,K)*/, Tensor logits /*(N,E)*/, bool norm_topk_prob,
                        Stream stream = {});

// The router's two losses, as scaled sums (the caller folds coefficients and normalisation into
// the scales; the model uses aux_scale = aux_loss_coef * E / (N^2 K), z_scale = z_loss_coef / N:
// Switch/GShard load balancing and ST-MoE's z-loss, as Megatron-Core computes them):
//   loss[0] = aux_scale * Σ_e tokens_per_expert[e] * Σ_t probs[t,e]
//   loss[1] = z_scale * Σ_t lse[t]^2
// tokens_per_expert counts the slots routed to each expert before any dropping
// (moe_dispatch_plan's output); it carries no gradient. Deterministic order of summation.
void moe_router_loss(Tensor loss /*(2) f32|f64*/, Tensor probs /*(N,E)*/, Tensor lse /*(N)*/,
                     Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale,
                     Stream stream = {});

// d_logits (overwritten) = ∂/∂logits of
//   Σ_{t,j} d_topk_w[t,j] * topk_w[t,j]  +  loss[0]  +  loss[1]
// with topk_w, loss as defined above (the choice of experts is piecewise constant: no gradient):
//   d_logits[t,e] = p_e (dp_e - Σ_f p_f dp_f + 2 z_scale lse[t]),  p = probs[t,:],
//   dp_e = aux_scale tokens_per_expert[e] + Σ_{j : topk_idx[t,j] = e} (d_topk_w[t,j] - ḡ) / S,
// S = Σ_j p_{topk_idx[t,j]}, ḡ = Σ_j d_topk_w[t,j] topk_w[t,j] when norm_topk_prob, else S = 1,
// ḡ = 0 (derived in kernels/cpu/moe_router.cpp). topk_idx outside [0, E) is a caller bug: checked
// on the CPU, a NaN d_logits row on the GPU (no host synchronization).
void moe_router_backward(Tensor d_logits /*(N,E)*/, Tensor d_topk_w /*(N,K)*/,
                         Tensor probs /*(N,E)*/, Tensor lse /*(N)*/, Tensor topk_idx /*(N,K)*/,
                         Tensor tokens_per_expert /*(E) i32*/, double aux_scale, double z_scale,
                         bool norm_topk_prob, Stream stream = {});

// ---- dispatch plan, permute, unpermute ------------------------------------------------------
// The plan sorts the N*K slots by expert, stably (slot order within an expert), and drops what
// exceeds the capacity:
//   tokens_per_expert[e] = number of slots with topk_idx == e (before dropping);
//   p(s) = number of slots s' < s with the same expert (the slot's position in its expert);
//   slot s is kept when capacity <= 0 (dropless) or p(s) < capacity;
//   offsets[0] = 0, offsets[e+1] = offsets[e] + (kept slots of expert e);
//   slot_row[s] = offsets[e] + p(s) when kept, else -1;
//   row_slot[r] = the slot placed in row r for r < offsets[E], else -1 (r < R).
// R >= offsets[E] is required (R = N*K always suffices). Entries of topk_idx outside [0, E) are
// a caller bug (checked on the CPU; the GPU routes such a slot nowhere). The CUDA plan handles
// E <= 12288.
void moe_dispatch_plan(Tensor tokens_per_expert /*(E) i32*/, Tensor offsets /*(E+1) i32*/,
                       Tensor slot_row /*(N,K) i32*/, Tensor row_slot /*(R) i32*/,
                       Tensor topk_idx /*(N,K) i32*/, int64_t capacity, Stream stream = {});

// A row gather: xp[r] = x[row_slot[r] / K] where row_slot[r] >= 0, zero for unused rows. K = 1
// makes it a plain gather by row index (the ep path's regrouping of received rows).
void moe_permute(Tensor xp /*(R,C)*/, Tensor x /*(N,C)*/, Tensor row_slot /*(R) i32*/, int topk,
                 Stream stream = {});
// Its adjoint: dx[t] = Σ_j dxp[slot_row[t,j]] over the kept slots j of token t, in j order, summed
// in f32 (f64 for f64); zero for a token with every slot dropped. dx is overwritten.
void moe_permute_backward(Tensor dx /*(N,C)*/, Tensor dxp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                          Stream stream = {});

// The combine: out[t] = Σ_j topk_w[t,j] * yp[slot_row[t,j]] over kept j, in j order, summed in f32
// (f64 for f64); zero for a token with every slot dropped (it keeps only its residual). topk_w is
// f32 (f64 with f64 tensors) whatever the dtype of yp/out.
void moe_unpermute(Tensor out /*(N,C)*/, Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                   Tensor topk_w /*(N,K)*/, Stream stream = {});
// Its backward (both overwritten): dyp[r] = topk_w[s] * dout[s/K] for s = row_slot[r] >= 0, zero
// for unused rows; d_topk_w[t,j] = <dout[t], yp[slot_row[t,j]]> (summed in f32/f64), zero when
// dropped. slot_row and row_slot must come from one plan (inverse of each other on the kept
// slots; checked on the CPU): the GPU computes both outputs in one pass over the rows.
void moe_unpermute_backward(Tensor dyp /*(R,C)*/, Tensor d_topk_w /*(N,K)*/, Tensor dout /*(N,C)*/,
                            Tensor yp /*(R,C)*/, Tensor slot_row /*(N,K) i32*/,
                            Tensor row_slot /*(R) i32*/, Tensor topk_w /*(N,K)*/,
                            Stream stream = {});

// ---- grouped GEMM ---------------------------------------------------------------------------
// G independent linears over consecutive row ranges: for each group g and each row r in
// [offsets[g], offsets[g+1]):  y[r] = x[r] · w[g]^T  (x (R,K'), w (G,N',K'), y (R,N'));
// rows r >= offsets[G] of y are set to zero. offsets is a device tensor (never read by the host on
// the GPU); offsets[0] = 0, non-decreasing, offsets[G] <= R. Empty groups are allowed.
// x, w, y share one dtype; sums in f32 (double on the CPU).
void grouped_gemm_forward(Tensor y /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                          Tensor offsets /*(G+1) i32*/, Stream stream = {});
// dx (overwritten; may be empty to skip) = dy[r] · w[g] per row (zero for rows >= offsets[G]);
// dw[g] += dy_g^T · x_g over the group's rows (dw f32 or w's dtype: FP32 main gradients; may be
// empty to skip).
void grouped_gemm_backward(Tensor dx /*(R,K') or empty*/, Tensor dw /*(G,N',K') += or empty*/,
                           Tensor dy /*(R,N')*/, Tensor x /*(R,K')*/, Tensor w /*(G,N',K')*/,
                           Tensor offsets /*(G+1) i32*/, Stream stream = {});

}  // namespace tessera::ops
