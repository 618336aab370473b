// The one op contract. Each op is declared once here; kernels/cpu/<op>.cpp is the reference
// (plain loops, f32 or f64, higher-precision accumulation, deterministic) and kernels/cuda/<op>.cu
// the fast version, with the same name and argument order. ops.cpp dispatches on the device of the
// first tensor argument; all tensors of one call must live on one device.
//
// Conventions
//   * forward writes its outputs (overwrite).
//   * backward OVERWRITES activation gradients (d<input>) and ACCUMULATES (+=) parameter
//     gradients (dweight, dbias, dwte, ...), so gradient accumulation over micro-batches works.
//   * An empty Tensor (data == nullptr) means "absent" (no bias, no learned positions, ...).
//   * Float tensors of one call share one dtype: f32; bf16 or f16 (CUDA, and the CPU through
//     kernels/cpu/narrow.h); f64 on the CPU (for the finite-difference tests). Saved statistics
//     (mean, rstd, lse, losses, and the vocabulary-parallel row_max, sum_exp, target_logit) are
//     f32, or f64 when the inputs are f64.
//   * FP32 main gradients: a parameter gradient, i.e. an accumulated (+=) output -
//     matmul_backward's dweight and dbias, gemm's c (a weight gradient: beta = 1),
//     layernorm_backward's dweight and dbias (one dtype for both), rmsnorm_backward's dweight,
//     embedding_backward's dwte and dwpe (one dtype for both), bias_grad's dbias, gemm_fp8's c -
//     may be f32 while the activations and other inputs are bf16 or f16 (Megatron's main_grad
//     with gradient-accumulation fusion). The op then accumulates in f32 straight into it: the
//     result equals the f32 op on the exactly widened 16-bit inputs, never rounded to 16 bits.
//     With 16-bit gradients the ops behave as before, bit for bit.
//   * Norms, activations and matmul flatten all leading dims into rows: (B,T,C) is (B*T, C).
//   * Aliasing: only where an op says "may alias" (exactly the same buffer); partial overlap and
//     any other aliasing is rejected.
//   * Streams: every op that launches device work takes a trailing `Stream stream = {}` (after
//     its other defaulted arguments) and queues all its work there; {} is the device's default
//     stream. The CPU ignores it. Attention takes its CUDA implementation (AttentionImpl)
//     explicitly; nothing about how ops run is a global setting.
// Shape letters: B batch, T time (sequence), C channels (model width), N rows (= B*T),
//   V vocabulary (padded), Vl one tp rank's slice of V (vocabulary-parallel ops), Hq query heads,
//   Hkv key/value heads, D head dim, F FFN width, M, K generic GEMM sizes (K also the teacher
//   entries per row of the sparse KD ops and topk_logits), nT temperatures.
#pragma once
#include <span>

#include "core/tensor.h"
#include "kernels/op_types.h"
#include "kernels/quantize.h"

namespace tessera::ops {

// Backend services (not ops). synchronize waits for all work queued on `stream` (a no-op on the
// CPU). cuda_workspace_bytes is the scratch the CUDA backend needs (GEMM workspace, attention
// under `impl` for these shapes; builds the cuDNN plans), so the caller can carve it from its
// arena and hand it over with use_cuda_workspace(ptr, bytes); 0 and a no-op without CUDA.
void synchronize(Device device, Stream stream = {});
size_t cuda_workspace_bytes(int B, int T, int num_heads, int num_kv_heads, int head_dim,
                            DType dtype, AttentionImpl impl);
void use_cuda_workspace(void* ptr, size_t bytes);

// ---- embedding: token embedding plus optional learned positions ----------------------------
// out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :]      (wpe may be empty)
// Vocabulary-parallel (Megatron's VocabParallelEmbedding): wte (Vl,C) holds rows
// [vocab_start, vocab_start + Vl) of the full (vocab_total, C) table; vocab_total = -1 means Vl
// (unsharded). Every token must lie in [0, vocab_total). A token outside this shard gives a zero
// row (plus wpe), so the sum over tp ranks of out is the full embedding (pass wpe on one tp rank
// only), and adds nothing to dwte. dwpe accumulates as usual.
void embedding_forward(Tensor out /*(B,T,C)*/, Tensor tokens /*(B,T) i32*/, Tensor wte /*(Vl,C)*/,
                       Tensor wpe /*(maxT,C) or empty*/, int64_t vocab_start = 0,
                       int64_t vocab_total = -1, Stream stream = {});
void embedding_backward(Tensor dwte /*(Vl,C) +=*/, Tensor dwpe /*(maxT,C) += or empty*/,
                        Tensor dout /*(B,T,C)*/, Tensor tokens /*(B,T) i32*/,
                        int64_t vocab_start = 0, int64_t vocab_total = -1, Stream stream = {});

// ---- LayerNorm over the last dim; mean and rstd are saved for backward ---------------------
void layernorm_forward(Tensor out /*(N,C)*/, Tensor mean /*(N) f32*/, Tensor rstd /*(N) f32*/,
                       Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor bias /*(C) or empty*/,
                       float eps, Stream stream = {});
void layernorm_backward(Tensor dinp /*(N,C)*/, Tensor dweight /*(C) +=*/,
                        Tensor dbias /*(C) += or empty*/, Tensor dout /*(N,C)*/,
                        Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor mean /*(N)*/,
                        Tensor rstd /*(N)*/, Stream stream = {});

// ---- RMSNorm over the last dim (also used per head for QK-norm, with N = B*T*H, C = D) ------
void rmsnorm_forward(Tensor out /*(N,C)*/, Tensor rstd /*(N) f32*/, Tensor inp /*(N,C)*/,
                     Tensor weight /*(C)*/, float eps, Stream stream = {});
void rmsnorm_backward(Tensor dinp /*(N,C)*/, Tensor dweight /*(C) +=*/, Tensor dout /*(N,C)*/,
                      Tensor inp /*(N,C)*/, Tensor weight /*(C)*/, Tensor rstd /*(N)*/,
                      Stream stream = {});

// ---- matmul -------------------------------------------------------------------------------
// General GEMM: c (M,N) = alpha * op(a) · op(b) + beta * c, op(x) = x^T when trans_x.
// a is (M,K) or (K,M) if trans_a; b is (K,N) or (N,K) if trans_b. beta = 0 ignores c's contents;
// alpha = 0 does not read a or b.
void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
          Stream stream = {});
// Linear layer in PyTorch's weight layout: out (M,N) = inp (M,K) · weight (N,K)^T + bias (N).
void matmul_forward(Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/, Tensor weight /*(N,K)*/,
                    Tensor bias /*(N) or empty*/, Stream stream = {});
// dinp = dout · weight (overwrite; may be empty to skip); dweight += dout^T · inp;
// dbias += column sums of dout (may be empty).
void matmul_backward(Tensor dinp /*(M,K)*/, Tensor dweight /*(N,K) +=*/,
                     Tensor dbias /*(N) += or empty*/, Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/,
                     Tensor weight /*(N,K)*/, Stream stream = {});
// The bias half of a linear layer, for GEMMs without a bias epilogue (ops::gemm_fp8): the bias
// that matmul_forward adds and the dbias that matmul_backward accumulates. Rows are all leading
// dims of out / dout; bias and dbias have out's / dout's dtype, or are f32 (an f32 master copy
// beside 16-bit activations).
// out += bias on every row, in place: each element is out + bias in f32 (f64 for f64 tensors),
// rounded once to out's dtype. (A 16-bit GEMM result plus bias_add is thus rounded twice, where
// matmul_forward's bias epilogue rounds once.)
void bias_add(Tensor out /*(M,N)*/, Tensor bias /*(N)*/, Stream stream = {});
// dbias += column sums of dout, summed in f32 on CUDA and in double on the CPU (rows in order,
// rounded once to f32 and, for 16-bit dbias, then to its dtype). The CUDA order is fixed by M and
// N alone, so results are bitwise reproducible run to run (and do not depend on alignment).
void bias_grad(Tensor dbias /*(N) +=*/, Tensor dout /*(M,N)*/, Stream stream = {});

// ---- rotary position embedding (NeoX / Hugging Face "rotate_half" pairing) -----------------
// For each head vector x of width D (even), pair i with i + D/2, angle = (t + pos_offset) *
// theta^(-2i/D). out may alias inp. Backward rotates by the negative angle.
void rope_forward(Tensor out /*(B,T,H,D)*/, Tensor inp /*(B,T,H,D)*/, float theta, int pos_offset,
                  Stream stream = {});
void rope_backward(Tensor dinp /*(B,T,H,D)*/, Tensor dout /*(B,T,H,D)*/, float theta,
                   int pos_offset, Stream stream = {});

// ---- causal attention with grouped-query heads --------------------------------------------
// Query head h attends with key/value head h / (Hq/Hkv). Softmax(scale · q·k^T) masked causally;
// lse (B,Hq,T) f32 is the row log-sum-exp of the scaled scores, saved for backward.
void attention_forward(Tensor out /*(B,T,Hq,D)*/, Tensor lse /*(B,Hq,T) f32*/,
                       Tensor q /*(B,T,Hq,D)*/, Tensor k /*(B,T,Hkv,D)*/, Tensor v /*(B,T,Hkv,D)*/,
                       float scale, AttentionImpl impl, Stream stream = {});
// dq, dk, dv are overwritten and must not alias any input. On CUDA, impl chooses cuDNN's fused
// SDPA (with the native kernel as fallback) or the native kernel; forward and backward may differ.
void attention_backward(Tensor dq /*(B,T,Hq,D)*/, Tensor dk /*(B,T,Hkv,D)*/,
                        Tensor dv /*(B,T,Hkv,D)*/, Tensor dout /*(B,T,Hq,D)*/, Tensor q, Tensor k,
                        Tensor v, Tensor out /*(B,T,Hq,D)*/, Tensor lse /*(B,Hq,T)*/, float scale,
                        AttentionImpl impl, Stream stream = {});

// ---- activations ---------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void gelu_forward(Tensor out, Tensor inp, Stream stream = {});  // any shape; out may alias inp
void gelu_backward(Tensor dinp, Tensor dout, Tensor inp,
                   Stream stream = {});  // dinp may alias dout
// SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x).
void swiglu_forward(Tensor out /*(N,F)*/, Tensor gate /*(N,F)*/, Tensor up /*(N,F)*/,
                    Stream stream = {});
void swiglu_backward(Tensor dgate /*(N,F)*/, Tensor dup /*(N,F)*/, Tensor dout /*(N,F)*/,
                     Tensor gate /*(N,F)*/, Tensor up /*(N,F)*/, Stream stream = {});

// ---- residual and elementwise helpers -------------------------------------------------------
void add_forward(Tensor out, Tensor a, Tensor b,
                 Stream stream = {});  // out = a + b; out may alias a or b
void add_inplace(Tensor dst, Tensor src,
                 Stream stream = {});  // dst += src (gradient of a residual branch)
void scale_inplace(Tensor x, float s, Stream stream = {});  // x *= s
void fill(Tensor x, float value, Stream stream = {});
// dst = src converted to dst's dtype (f32/f64/bf16/f16/e4m3/e5m2), round to nearest even.
void cast(Tensor dst, Tensor src, Stream stream = {});
// Sum of squares of all elements, accumulated in double (gradient norm).
double sum_squares(Tensor x, Stream stream = {});

// ---- softmax cross-entropy over the (possibly padded) vocabulary ---------------------------
// For row n with target y = targets[n] >= 0: loss = logsumexp(logits[n, :vocab_size]) -
// logits[n, y]. Columns >= vocab_size are padding and never enter the softmax. Rows with a
// negative target are ignored (loss 0, but lse still the row's log-sum-exp). lse (N) f32 is saved
// for backward.
void cross_entropy_forward(Tensor losses /*(N) f32*/, Tensor lse /*(N) f32*/,
                           Tensor logits /*(N,V)*/, Tensor targets /*(N) i32*/, int vocab_size,
                           Stream stream = {});
// dlogits = dloss * (softmax(logits) - onehot(y)) on valid rows and columns, 0 elsewhere.
// dlogits may alias logits (computed in place). Vocabulary-parallel: logits (N,Vl) are columns
// [vocab_start, vocab_start + Vl) of the padded vocabulary and lse is the global one (from
// cross_entropy_shard_finish); the one-hot sits at column y - vocab_start when inside the shard,
// and columns with vocab_start + j >= vocab_size are padding (0).
// addend (N,Vl) of the logits' dtype, when given, is added to every element before the one
// rounding to the dtype: the objective's other terms' gradients (a distillation KL) join the
// cross-entropy's in this pass instead of a pass of their own. It must not alias dlogits.
void cross_entropy_backward(Tensor dlogits /*(N,Vl)*/, Tensor logits /*(N,Vl)*/, Tensor lse /*(N)*/,
                            Tensor targets /*(N) i32*/, int vocab_size, float dloss,
                            int64_t vocab_start = 0, Tensor addend = {}, Stream stream = {});

// ---- vocabulary-parallel cross-entropy (Megatron's vocab_parallel_cross_entropy) ------------
// Each tp rank holds logits (N,Vl) = columns [vocab_start, vocab_start + Vl) of the padded
// vocabulary; only global columns < vocab_size are real. The caller runs
//   shard_max -> all-reduce(max) over tp -> shard_sums with the global max ->
//   all-reduce(sum) of sum_exp and target_logit over tp -> shard_finish,
// which yields cross_entropy_forward's losses and lse (up to the rounding of sum_exp and its
// summation order), then cross_entropy_backward with vocab_start. Statistics are f32, or f64
// when the logits are f64 (as above). Targets must be < vocab_size or negative (ignored), as for
// cross_entropy_forward.
// row_max[n] = max over this shard's real columns; -inf when the shard has none.
void cross_entropy_shard_max(Tensor row_max /*(N)*/, Tensor logits /*(N,Vl)*/, int64_t vocab_start,
                             int vocab_size, Stream stream = {});
// sum_exp[n] = sum over this shard's real columns of exp(logits[n,j] - row_max[n]) (row_max is
// the GLOBAL max); target_logit[n] = logits[n, y - vocab_start] when y = targets[n] falls in this
// shard, else 0 (ignored rows, y < 0: 0).
void cross_entropy_shard_sums(Tensor sum_exp /*(N)*/, Tensor target_logit /*(N)*/,
                              Tensor logits /*(N,Vl)*/, Tensor row_max /*(N)*/,
                              Tensor targets /*(N) i32*/, int64_t vocab_start, int vocab_size,
                              Stream stream = {});
// lse = row_max + log(sum_exp); losses = lse - target_logit, 0 on ignored rows (lse still set).
void cross_entropy_shard_finish(Tensor losses /*(N)*/, Tensor lse /*(N)*/, Tensor row_max /*(N)*/,
                                Tensor sum_exp /*(N)*/, Tensor target_logit /*(N)*/,
                                Tensor targets /*(N) i32*/, Stream stream = {});

// ---- knowledge distillation: KL divergence between tempered softmaxes --------------------------
// Student logits zs and teacher logits zt, both (N,V) of one dtype, at temperature T > 0 (finite):
// us = zs / T, ut = zt / T, ps = softmax(us), pt = softmax(ut) over the real columns
// [0, vocab_size) only (padding columns never enter a softmax and get zero gradient). Per row n:
//   forward KL (reverse = false): loss = T^2 KL(pt || ps)
//                                      = T^2 (sum_j pt_j (ut_j - us_j) - lse_t + lse_s)
//   reverse KL (reverse = true):  loss = T^2 KL(ps || pt)
//                                      = T^2 (sum_j ps_j (us_j - ut_j) - lse_s + lse_t)
// with lse_s = logsumexp(us), lse_t = logsumexp(ut) (of the TEMPERED logits). T^2 keeps the
// gradient's scale independent of T (Hinton et al.). Only the sign of targets[n] matters: a row
// with a negative target is ignored (loss 0, zero gradient, lse still written), so the
// cross-entropy targets can be passed as they are. No gradient flows to the teacher.
// losses (N) and lse (2,N) (row 0 the student's lse_s, row 1 the teacher's lse_t) are f32, or
// f64 when the logits are f64.
void kd_loss_forward(Tensor losses /*(N)*/, Tensor lse /*(2,N)*/, Tensor student /*(N,V)*/,
                     Tensor teacher /*(N,V)*/, Tensor targets /*(N) i32*/, int vocab_size,
                     float temperature, bool reverse, Stream stream = {});
// dstudent = dloss * d loss_n / d zs on valid rows and real columns, 0 elsewhere:
//   forward KL: T (ps_j - pt_j);   reverse KL: T ps_j ((us_j - lse_s) - (ut_j - lse_t) - KL_n)
// with KL_n = losses[n] / T^2 (the reverse gradient needs the forward's losses). dstudent may
// alias student (computed in place), nothing else. Vocabulary-parallel: student and teacher
// (N,Vl) are columns [vocab_start, vocab_start + Vl) of the padded vocabulary, and lse and losses
// are the global ones (from kd_shard_finish); columns with vocab_start + j >= vocab_size are
// padding (0).
void kd_loss_backward(Tensor dstudent /*(N,Vl)*/, Tensor student /*(N,Vl)*/,
                      Tensor teacher /*(N,Vl)*/, Tensor lse /*(2,N)*/, Tensor losses /*(N)*/,
                      Tensor targets /*(N) i32*/, int vocab_size, float temperature, bool reverse,
                      float dloss, int64_t vocab_start = 0, Stream stream = {});

// ---- vocabulary-parallel knowledge distillation (as cross_entropy_shard_*) --------------------
// Each tp rank holds student and teacher (N,Vl) = columns [vocab_start, vocab_start + Vl) of the
// padded vocabulary. The caller runs
//   kd_shard_max -> all-reduce(max) of row_max over tp -> kd_shard_sums with the global maxima ->
//   all-reduce(sum) of sums over tp -> kd_shard_finish,
// which yields kd_loss_forward's losses and lse (up to the rounding of the sums and their order),
// then kd_loss_backward with vocab_start. Statistics are f32, or f64 when the logits are f64.
// row_max (2,N): row 0 the max of us, row 1 the max of ut over this shard's real columns; -inf
// when the shard has none.
void kd_shard_max(Tensor row_max /*(2,N)*/, Tensor student /*(N,Vl)*/, Tensor teacher /*(N,Vl)*/,
                  int64_t vocab_start, int vocab_size, float temperature, Stream stream = {});
// sums (3,N) over this shard's real columns, with the GLOBAL maxima ms = row_max[0], mt =
// row_max[1]: row 0 sum_j exp(us_j - ms), row 1 sum_j exp(ut_j - mt), row 2 the cross term
//   forward KL: sum_j exp(ut_j - mt) (ut_j - us_j)
//   reverse KL: sum_j exp(us_j - ms) (us_j - ut_j)
void kd_shard_sums(Tensor sums /*(3,N)*/, Tensor student /*(N,Vl)*/, Tensor teacher /*(N,Vl)*/,
                   Tensor row_max /*(2,N)*/, int64_t vocab_start, int vocab_size, float temperature,
                   bool reverse, Stream stream = {});
// From the reduced maxima and sums: lse = max + log(sum) per row of row_max; KL = cross / sum_t +
// lse_s - lse_t (forward; reverse: cross / sum_s + lse_t - lse_s), computed as the maxima's
// difference plus the log of the sums' ratio; losses = T^2 KL, 0 on ignored rows (lse still set).
void kd_shard_finish(Tensor losses /*(N)*/, Tensor lse /*(2,N)*/, Tensor row_max /*(2,N)*/,
                     Tensor sums /*(3,N)*/, Tensor targets /*(N) i32*/, float temperature,
                     bool reverse, Stream stream = {});

// ---- sparse (top-K) knowledge distillation: the teacher given by its K largest logits ---------
// K: teacher entries per row (1 <= K <= vocab_size). Per row n the teacher is given by its K
// largest raw logits zt_i = topk_logits[n,i] (NOT divided by T), their distinct vocabulary ids
// topk_ids[n,i] < vocab_size, and teacher_lse (2,N) at this temperature: row 0 lse_t = log sum_j
// exp(zt_j / T) over all real columns, row 1 tail_lse_t = the same over the tail (the real columns
// that are not among the K ids); tail_lse_t = -inf means the tail is empty (K = vocab_size), and
// only then. The distributions live on K + 1 buckets, the K ids and the tail:
//   teacher  log pt_i = zt_i / T - lse_t,          log pt_tail = tail_lse_t - lse_t (exact);
//   student  log qs_i = us_{id_i} - lse_s,         qs_tail = sum over the tail of exp(us_j - lse_s)
// with us = zs / T and lse_s = logsumexp(us) over the real columns [0, vocab_size) of the student
// logits (padding never enters). qs_tail is summed over the tail columns themselves (never 1 -
// sum qs_i, which cancels), relative to the row's maximum: log qs_tail is floored at
// log(2^-126) = -87.34 (a tail holding less of the student's mass reads as that much), so a tail
// that underflows gives neither an infinite loss nor NaN gradients. Per valid row, with 0 log 0 = 0
// (an empty tail adds nothing):
//   forward KL (reverse = false): loss = T^2 [sum_i pt_i (log pt_i - log qs_i)
//                                              + pt_tail (log pt_tail - log qs_tail)]
//   reverse KL (reverse = true):  loss = T^2 [sum_i qs_i (log qs_i - log pt_i)
//                                              + qs_tail (log qs_tail - log pt_tail)]
// With K = vocab_size this is kd_loss_forward on the full teacher logits. As there, only the sign
// of targets[n] matters: a negative target ignores the row (loss 0, zero gradient, stats still
// written). losses (N) and stats (3,N) are f32, or f64 when the student logits are f64 (then
// topk_logits and teacher_lse may be f64 too; otherwise they are f32). stats rows: 0 lse_s,
// 1 log qs_tail (floored as above; -inf when the tail is empty), 2 the row's KL divergence itself
// (loss / T^2, also on ignored rows). Ids must be distinct and in [0, vocab_size): the CPU checks
// them; CUDA never reads or writes out of bounds for a bad id, but its results are then undefined.
// CUDA takes K <= 8192 (the backward holds K floats of a row in shared memory).
void kd_sparse_forward(Tensor losses /*(N)*/, Tensor stats /*(3,N)*/, Tensor student /*(N,V)*/,
                       Tensor topk_logits /*(N,K) f32*/, Tensor topk_ids /*(N,K) i32*/,
                       Tensor teacher_lse /*(2,N) f32*/, Tensor targets /*(N) i32*/, int vocab_size,
                       float temperature, bool reverse, Stream stream = {});
// dstudent = dloss * d loss_n / d zs on valid rows and real columns, 0 elsewhere:
//   forward KL: T (qs_j - pt_i) at j = id_i;  T qs_j (1 - pt_tail / qs_tail) at a tail column
//               (the ratio formed in log space, with the floored log qs_tail);
//   reverse KL: T qs_j (g_b(j) - KL_n), g_i = log qs_i - log pt_i at j = id_i,
//               g_tail = log qs_tail - log pt_tail at a tail column, KL_n = losses[n] / T^2.
// dstudent may alias student (computed in place), nothing else. Vocabulary-parallel: student
// (N,Vl) is columns [vocab_start, vocab_start + Vl) of the padded vocabulary, stats and losses the
// global ones (kd_sparse_shard_finish); ids outside the shard are skipped; columns with
// vocab_start + j >= vocab_size are padding (0).
void kd_sparse_backward(Tensor dstudent /*(N,Vl)*/, Tensor student /*(N,Vl)*/,
                        Tensor topk_logits /*(N,K)*/, Tensor topk_ids /*(N,K) i32*/,
                        Tensor teacher_lse /*(2,N)*/, Tensor stats /*(3,N)*/, Tensor losses /*(N)*/,
                        Tensor targets /*(N) i32*/, int vocab_size, float temperature, bool reverse,
                        float dloss, int64_t vocab_start = 0, Stream stream = {});

// ---- vocabulary-parallel sparse knowledge distillation (as kd_shard_*) -------------------------
// Each tp rank holds student (N,Vl) = columns [vocab_start, vocab_start + Vl) of the padded
// vocabulary; every rank holds the whole topk_logits, topk_ids and teacher_lse. The caller runs
//   kd_sparse_shard_max -> all-reduce(max) of row_max over tp -> kd_sparse_shard_sums with the
//   global maxima -> all-reduce(sum) of sums over tp -> kd_sparse_shard_finish,
// which yields kd_sparse_forward's losses and stats (up to the rounding of the sums and their
// order), then kd_sparse_backward with vocab_start. Statistics are f32, or f64 when the student
// logits are f64.
// row_max[n] = the max of us over this shard's real columns; -inf when the shard has none.
void kd_sparse_shard_max(Tensor row_max /*(N)*/, Tensor student /*(N,Vl)*/, int64_t vocab_start,
                         int vocab_size, float temperature, Stream stream = {});
// sums (2+K,N) over this shard's real columns, with the GLOBAL max m = row_max[n]: row 0
// sum_j exp(us_j - m) over all of them, row 1 the same over those in the tail (not among the ids),
// row 2+i the tempered student logit us at id_i when id_i falls in this shard, else 0 (each id lies
// in exactly one shard, so the all-reduce(sum) assembles them exactly).
void kd_sparse_shard_sums(Tensor sums /*(2+K,N)*/, Tensor student /*(N,Vl)*/,
                          Tensor topk_ids /*(N,K) i32*/, Tensor row_max /*(N)*/,
                          int64_t vocab_start, int vocab_size, float temperature,
                          Stream stream = {});
// From the reduced max and sums and the teacher: lse_s = m + log(sums[0]), log qs_tail =
// log(sums[1] / sums[0]) (floored), log qs_i = sums[2+i] - lse_s; then losses and stats as
// kd_sparse_forward writes them.
void kd_sparse_shard_finish(Tensor losses /*(N)*/, Tensor stats /*(3,N)*/, Tensor row_max /*(N)*/,
                            Tensor sums /*(2+K,N)*/, Tensor topk_logits /*(N,K)*/,
                            Tensor teacher_lse /*(2,N)*/, Tensor targets /*(N) i32*/,
                            float temperature, bool reverse, Stream stream = {});

// ---- per-row top-K of logits with tempered log-sum-exps (the distillation teacher cache) ------
// Per row of logits (N,V) over the real columns [0, vocab_size): the K largest values in
// descending order (ties: the lower id first; NaN ranks above +inf, -0 ties with +0) as f32 and
// their ids, and for each temperature t in `temperatures` (nT >= 1, each positive and finite) the
// tempered log-sum-exp log sum_j exp(z_j / t) over all real columns (lse[t][0][n]) and over the
// other real columns (lse[t][1][n]; -inf when K = vocab_size, or when all of them are -inf).
// Values are exact copies of the logits (converted to f32; f64 logits may give f64 values and
// lse). 1 <= K <= vocab_size; CUDA takes K <= 1024 and nT <= 16. Logits f32, bf16 or f16 (f64 on
// the CPU). The ids, and hence the values, agree exactly between the CPU and CUDA.
void topk_logits(Tensor values /*(N,K) f32*/, Tensor ids /*(N,K) i32*/, Tensor lse /*(nT,2,N) f32*/,
                 Tensor logits /*(N,V)*/, int vocab_size, std::span<const float> temperatures,
                 Stream stream = {});

// ---- fake quantization for quantization-aware training (QAT) ---------------------------------
// out = dequant(quant(in)) row by row, by the rules of kernels/quant_math.h (GGML's Q8_0 / Q4_0
// generalised to any group): each row of in (R,K) in groups of `group` consecutive columns
// (group == K: one group per row, i.e. per output channel of a weight or per token of an
// activation; 1 <= group, K % group == 0); per group the f32 scale d (int8: amax / 127; int4: the
// signed element of largest |x|, the first on ties, / -8), the codes from the f32 d, and each
// value q * float(fp16(d)) computed in f32 and written in out's dtype (a bf16/f16 out rounds it
// to nearest even once; f64 on the CPU holds it exactly). bf16/f16/f64 inputs are converted to
// f32 first (exact for bf16/f16), so the codes and fp16 scales are those kernels/quantize.h gives
// for the f32 values of `in`. row_amax (R) f32, when given (int8 and group == K only), replaces
// each row's own max |x|: a row-parallel layer under tp passes the max over its tp ranks
// (row_absmax, then an all-reduce(max)), so every rank quantizes with the scale of the whole row.
// A group of zeros gives zeros (int4: -0, as its scale is -0). Inputs must be finite (the
// result of a NaN or Inf is unspecified). out may alias in exactly. CPU and CUDA agree bit for bit.
// Gradient: QAT uses the straight-through estimator, so there is no backward op (the gradient
// with respect to in is the gradient with respect to out; optim/qat_linear.h).
void fake_quantize(Tensor out /*(R,K)*/, Tensor in /*(R,K)*/, quant::IntBits bits, int64_t group,
                   Tensor row_amax /*(R) f32 or empty*/ = {}, Stream stream = {});
// amax[r] = max over k of |in[r,k]| (NaN ignored; 0 for a row of zeros), in f32: fake_quantize's
// int8 row scale before the all-reduce(max) over tp.
void row_absmax(Tensor amax /*(R) f32*/, Tensor in /*(R,K)*/, Stream stream = {});

// ---- AdamW (decoupled weight decay; Loshchilov & Hutter) ------------------------------------
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (mhat / (sqrt(vhat) + eps) + wd p),
// with g = grad * grad_scale, mhat = m / (1 - b1^step), vhat = v / (1 - b2^step).
// param, m, v are f32 (the FP32 master copy and state); grad has param's dtype.
void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s,
                  Stream stream = {});

// ---- fused sequences: each equals the named sequence of ops above (the CPU runs exactly that
// sequence; CUDA runs it in one pass over memory) ----------------------------------------------
// residual = a + b, then (out, mean, rstd) = layernorm(residual): a residual update followed by
// the next norm. residual may alias a or b exactly; out must not alias anything.
void add_layernorm_forward(Tensor residual /*(N,C)*/, Tensor out /*(N,C)*/, Tensor mean /*(N)*/,
                           Tensor rstd /*(N)*/, Tensor a /*(N,C)*/, Tensor b /*(N,C)*/,
                           Tensor weight /*(C)*/, Tensor bias /*(C) or empty*/, float eps,
                           Stream stream = {});
// adamw_update on every entry (entries must not share memory), then cast(value, param) for each
// entry with a value (bf16 or f16, param's shape; all entries of a call have one or none, of one
// dtype), in few launches on CUDA: the rounded copy is written while the master is in registers,
// instead of a second pass that reads every master again.
void adamw_update_multi(std::span<const AdamWTensors> entries, Stream stream = {});

}  // namespace tessera::ops
