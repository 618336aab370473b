// Declarations of the CUDA kernels (kernels/cuda/<op>.cu), same names and argument order as
// kernels/ops.h, which documents each op, and as the CPU references in kernels/cpu/cpu_ops.h.
// Float tensors are f32, bf16 or f16 (one dtype per call; 16-bit values are widened to f32,
// computed on, and rounded once to nearest even on store, f16 overflowing to Inf), except that
// parameter gradients may be f32 beside 16-bit activations (kernels/ops.h); saved statistics
// (mean, rstd, lse, losses) are always f32; accumulation is f32. Work is queued on
// the stream each op takes last (kernels/op_types.h; {} = the legacy default stream); ops are
// asynchronous unless they return a host value.
#pragma once
#include <span>

#include "core/tensor.h"
#include "kernels/op_types.h"
#include "kernels/quantize.h"

namespace tessera::cuda {
using ops::AdamWStep;

// ---- embedding: token embedding plus optional learned positions ----------------------------
// out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :]      (wpe may be empty)
// Vocabulary-parallel: wte holds rows [vocab_start, vocab_start + Vl) of a (vocab_total, C)
// table (vocab_total = -1: Vl); tokens outside the shard give a zero row and no dwte update.
void embedding_forward(Tensor out /*(B,T,C)*/, Tensor tokens /*(B,T) i32*/, Tensor wte /*(Vl,C)*/,
                       Tensor wpe /*(maxT,C) or empty*/, int64_t vocab_start = 0,
                       int64_t vocab_total = -1, ops::Stream stream = {});
void embedding_backward(Tensor dwte /*(Vl,C) +=*/, Tensor dwpe /*(maxT,C) += or empty*/,
                        Tensor dout /*(B,T,C)*/, Tensor tokens /*(B,T) i32*/,
                        int64_t vocab_start = 0, int64_t vocab_total = -1, ops::Stream stream = {});

// ---- LayerNorm over the last dim; mean and rstd are saved for backward ---------------------
void layernorm_forward(Tensor out /*(N,C)*/, Tensor mean /*(N) f32*/, Tensor rstd /*(N) f32*/,
                       Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor bias /*(C) or empty*/,
                       float eps, ops::Stream stream = {});
void layernorm_backward(Tensor dinp /*(N,C)*/, Tensor dweight /*(C) +=*/,
                        Tensor dbias /*(C) += or empty*/, Tensor dout /*(N,C)*/,
                        Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor mean /*(N)*/,
                        Tensor rstd /*(N)*/, ops::Stream stream = {});

// ---- RMSNorm over the last dim (also used per head for QK-norm, with N = B*T*H, C = D) ------
void rmsnorm_forward(Tensor out /*(N,C)*/, Tensor rstd /*(N) f32*/, Tensor inp /*(N,C)*/,
                     Tensor weight /*(C)*/, float eps, ops::Stream stream = {});
void rmsnorm_backward(Tensor dinp /*(N,C)*/, Tensor dweight /*(C) +=*/, Tensor dout /*(N,C)*/,
                      Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor rstd /*(N)*/,
                      ops::Stream stream = {});

// ---- matmul -------------------------------------------------------------------------------
// General GEMM: c (M,N) = alpha * op(a) · op(b) + beta * c, op(x) = x^T when trans_x.
// a is (M,K) or (K,M) if trans_a; b is (K,N) or (N,K) if trans_b. beta = 0 ignores c's contents.
void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
          ops::Stream stream = {});
// Linear layer in PyTorch's weight layout: out (M,N) = inp (M,K) · weight (N,K)^T + bias (N).
void matmul_forward(Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/, Tensor weight /*(N,K)*/,
                    Tensor bias /*(N) or empty*/, ops::Stream stream = {});
// dinp = dout · weight (overwrite; may be empty to skip); dweight += dout^T · inp;
// dbias += column sums of dout (may be empty).
void matmul_backward(Tensor dinp /*(M,K)*/, Tensor dweight /*(N,K) +=*/,
                     Tensor dbias /*(N) += or empty*/, Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/,
                     Tensor weight /*(N,K)*/, ops::Stream stream = {});
// The bias half of a linear layer (ops.h documents the numerics); bias / dbias may be f32 beside
// 16-bit out / dout.
void bias_add(Tensor out /*(M,N)*/, Tensor bias /*(N)*/,
              ops::Stream stream = {});  // out += bias on every row
void bias_grad(Tensor dbias /*(N) +=*/, Tensor dout /*(M,N)*/,
               ops::Stream stream = {});  // dbias += column sums

// ---- rotary position embedding (NeoX / Hugging Face "rotate_half" pairing) -----------------
// For each head vector x of width D (even), pair i with i + D/2, angle = (t + pos_offset) *
// theta^(-2i/D). out may alias inp. Backward rotates by the negative angle.
void rope_forward(Tensor out /*(B,T,H,D)*/, Tensor inp /*(B,T,H,D)*/, float theta, int pos_offset,
                  ops::Stream stream = {});
void rope_backward(Tensor dinp /*(B,T,H,D)*/, Tensor dout /*(B,T,H,D)*/, float theta,
                   int pos_offset, ops::Stream stream = {});

// ---- causal attention with grouped-query heads --------------------------------------------
// Query head h attends with key/value head h / (Hq/Hkv). Softmax(scale · q·k^T) masked causally;
// lse (B,Hq,T) f32 is the row log-sum-exp of the scaled scores, saved for backward.
void attention_forward(Tensor out /*(B,T,Hq,D)*/, Tensor lse /*(B,Hq,T) f32*/,
                       Tensor q /*(B,T,Hq,D)*/, Tensor k /*(B,T,Hkv,D)*/, Tensor v /*(B,T,Hkv,D)*/,
                       float scale, ops::AttentionImpl impl, ops::Stream stream = {});
// dq, dk, dv are overwritten. impl picks cuDNN's fused SDPA or the native kernel (attention.cu).
void attention_backward(Tensor dq /*(B,T,Hq,D)*/, Tensor dk /*(B,T,Hkv,D)*/,
                        Tensor dv /*(B,T,Hkv,D)*/, Tensor dout /*(B,T,Hq,D)*/, Tensor q, Tensor k,
                        Tensor v, Tensor out /*(B,T,Hq,D)*/, Tensor lse /*(B,Hq,T)*/, float scale,
                        ops::AttentionImpl impl, ops::Stream stream = {});

// ---- activations ---------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void gelu_forward(Tensor out, Tensor inp, ops::Stream stream = {});  // any shape; out may alias inp
void gelu_backward(Tensor dinp, Tensor dout, Tensor inp,
                   ops::Stream stream = {});  // dinp may alias dout
// SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x).
void swiglu_forward(Tensor out /*(N,F)*/, Tensor gate /*(N,F)*/, Tensor up /*(N,F)*/,
                    ops::Stream stream = {});
void swiglu_backward(Tensor dgate /*(N,F)*/, Tensor dup /*(N,F)*/, Tensor dout /*(N,F)*/,
                     Tensor gate /*(N,F)*/, Tensor up /*(N,F)*/, ops::Stream stream = {});

// ---- residual and elementwise helpers -------------------------------------------------------
void add_forward(Tensor out, Tensor a, Tensor b,
                 ops::Stream stream = {});  // out = a + b; out may alias a or b
void add_inplace(Tensor dst, Tensor src,
                 ops::Stream stream = {});  // dst += src (gradient of a residual branch)
void scale_inplace(Tensor x, float s, ops::Stream stream = {});  // x *= s
void fill(Tensor x, float value, ops::Stream stream = {});
// dst = src converted to dst's dtype (f32/f64/bf16/f16/e4m3/e5m2), round to nearest even.
void cast(Tensor dst, Tensor src, ops::Stream stream = {});
// Sum of squares of all elements, accumulated in double (gradient norm).
double sum_squares(Tensor x, ops::Stream stream = {});

// ---- softmax cross-entropy over the (possibly padded) vocabulary ---------------------------
// For row n with target y = targets[n] >= 0: loss = logsumexp(logits[n, :vocab_size]) -
// logits[n, y]. Columns >= vocab_size are padding and never enter the softmax. Rows with a
// negative target are ignored (loss 0). lse (N) f32 is saved for backward.
void cross_entropy_forward(Tensor losses /*(N) f32*/, Tensor lse /*(N) f32*/,
                           Tensor logits /*(N,V)*/, Tensor targets /*(N) i32*/, int vocab_size,
                           ops::Stream stream = {});
// dlogits = dloss * (softmax(logits) - onehot(y)) on valid rows and columns, 0 elsewhere.
// dlogits may alias logits (computed in place). With vocab_start, logits are columns
// [vocab_start, vocab_start + Vl) of the vocabulary and lse is the global one.
void cross_entropy_backward(Tensor dlogits /*(N,Vl)*/, Tensor logits /*(N,Vl)*/, Tensor lse /*(N)*/,
                            Tensor targets /*(N) i32*/, int vocab_size, float dloss,
                            int64_t vocab_start = 0, Tensor addend = {}, ops::Stream stream = {});

// ---- vocabulary-parallel cross-entropy pieces (kernels/ops.h has the recipe) ----------------
// Statistics are f32.
void cross_entropy_shard_max(Tensor row_max /*(N)*/, Tensor logits /*(N,Vl)*/, int64_t vocab_start,
                             int vocab_size, ops::Stream stream = {});
void cross_entropy_shard_sums(Tensor sum_exp /*(N)*/, Tensor target_logit /*(N)*/,
                              Tensor logits /*(N,Vl)*/, Tensor row_max /*(N)*/,
                              Tensor targets /*(N) i32*/, int64_t vocab_start, int vocab_size,
                              ops::Stream stream = {});
void cross_entropy_shard_finish(Tensor losses /*(N)*/, Tensor lse /*(N)*/, Tensor row_max /*(N)*/,
                                Tensor sum_exp /*(N)*/, Tensor target_logit /*(N)*/,
                                Tensor targets /*(N) i32*/, ops::Stream stream = {});

// ---- knowledge distillation: T^2 KL between tempered softmaxes (kernels/ops.h) -------------
// reverse = false: T^2 KL(teacher || student); true: T^2 KL(student || teacher), over the real
// columns [0, vocab_size); rows with a negative target are ignored. lse (2,N): student, teacher.
// Statistics are f32.
void kd_loss_forward(Tensor losses /*(N)*/, Tensor lse /*(2,N)*/, Tensor student /*(N,V)*/,
                     Tensor teacher /*(N,V)*/, Tensor targets /*(N) i32*/, int vocab_size,
                     float temperature, bool reverse, ops::Stream stream = {});
// dstudent may alias student (computed in place). With vocab_start, student and teacher are
// columns [vocab_start, vocab_start + Vl) of the vocabulary and lse and losses the global ones.
void kd_loss_backward(Tensor dstudent /*(N,Vl)*/, Tensor student /*(N,Vl)*/,
                      Tensor teacher /*(N,Vl)*/, Tensor lse /*(2,N)*/, Tensor losses /*(N)*/,
                      Tensor targets /*(N) i32*/, int vocab_size, float temperature, bool reverse,
                      float dloss, int64_t vocab_start = 0, ops::Stream stream = {});
// ---- vocabulary-parallel knowledge distillation pieces (kernels/ops.h has the recipe) -------
void kd_shard_max(Tensor row_max /*(2,N)*/, Tensor student /*(N,Vl)*/, Tensor teacher /*(N,Vl)*/,
                  int64_t vocab_start, int vocab_size, float temperature, ops::Stream stream = {});
void kd_shard_sums(Tensor sums /*(3,N)*/, Tensor student /*(N,Vl)*/, Tensor teacher /*(N,Vl)*/,
                   Tensor row_max /*(2,N)*/, int64_t vocab_start, int vocab_size, float temperature,
                   bool reverse, ops::Stream stream = {});
void kd_shard_finish(Tensor losses /*(N)*/, Tensor lse /*(2,N)*/, Tensor row_max /*(2,N)*/,
                     Tensor sums /*(3,N)*/, Tensor targets /*(N) i32*/, float temperature,
                     bool reverse, ops::Stream stream = {});

// ---- sparse (top-K) knowledge distillation (kernels/ops.h has the definitions) ---------------
// topk_logits and teacher_lse f32; K <= 8192 (the backward keeps K floats of
// each row in shared memory). Statistics f32.
void kd_sparse_forward(Tensor losses /*(N)*/, Tensor stats /*(3,N)*/, Tensor student /*(N,V)*/,
                       Tensor topk_logits /*(N,K)*/, Tensor topk_ids /*(N,K) i32*/,
                       Tensor teacher_lse /*(2,N)*/, Tensor targets /*(N) i32*/, int vocab_size,
                       float temperature, bool reverse, ops::Stream stream = {});
void kd_sparse_backward(Tensor dstudent /*(N,Vl)*/, Tensor student /*(N,Vl)*/,
                        Tensor topk_logits /*(N,K)*/, Tensor topk_ids /*(N,K) i32*/,
                        Tensor teacher_lse /*(2,N)*/, Tensor stats /*(3,N)*/, Tensor losses /*(N)*/,
                        Tensor targets /*(N) i32*/, int vocab_size, float temperature, bool reverse,
                        float dloss, int64_t vocab_start = 0, ops::Stream stream = {});
void kd_sparse_shard_max(Tensor row_max /*(N)*/, Tensor student /*(N,Vl)*/, int64_t vocab_start,
                         int vocab_size, float temperature, ops::Stream stream = {});
void kd_sparse_shard_sums(Tensor sums /*(2+K,N)*/, Tensor student /*(N,Vl)*/,
                          Tensor topk_ids /*(N,K) i32*/, Tensor row_max /*(N)*/,
                          int64_t vocab_start, int vocab_size, float temperature,
                          ops::Stream stream = {});
void kd_sparse_shard_finish(Tensor losses /*(N)*/, Tensor stats /*(3,N)*/, Tensor row_max /*(N)*/,
                            Tensor sums /*(2+K,N)*/, Tensor topk_logits /*(N,K)*/,
                            Tensor teacher_lse /*(2,N)*/, Tensor targets /*(N) i32*/,
                            float temperature, bool reverse, ops::Stream stream = {});

// ---- per-row top-K of logits with tempered log-sum-exps (kernels/ops.h) ----------------------
// One block per row (radix select, then a bitonic sort of the K + 1 selected); K <= 1024 and at
// most 16 temperatures.
void topk_logits(Tensor values /*(N,K) f32*/, Tensor ids /*(N,K) i32*/, Tensor lse /*(nT,2,N) f32*/,
                 Tensor logits /*(N,V)*/, int vocab_size, std::span<const float> temperatures,
                 ops::Stream stream = {});

// ---- fake quantization (kernels/ops.h; kernels/cuda/fake_quant.cu): one warp per group -------
void fake_quantize(Tensor out /*(R,K)*/, Tensor in /*(R,K)*/, quant::IntBits bits, int64_t group,
                   Tensor row_amax /*(R) f32 or empty*/ = {}, ops::Stream stream = {});
void row_absmax(Tensor amax /*(R) f32*/, Tensor in /*(R,K)*/, ops::Stream stream = {});

// ---- AdamW (decoupled weight decay; Loshchilov & Hutter) ------------------------------------
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (mhat / (sqrt(vhat) + eps) + wd p),
// with g = grad * grad_scale, mhat = m / (1 - b1^step), vhat = v / (1 - b2^step).
// param, m, v are f32 (the FP32 master copy and state); grad is f32, bf16 or f16.
void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s,
                  ops::Stream stream = {});

// Fused sequences (see kernels/ops.h).
void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps,
                           ops::Stream stream = {});
void adamw_update_multi(std::span<const ops::AdamWTensors> entries, ops::Stream stream = {});

}  // namespace tessera::cuda
