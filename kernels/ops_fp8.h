// The FP8 op family (issue 5): per-tensor delayed-scaling quantization (with the fused transpose
// that FP8 backward needs), the scaled FP8 GEMM, and the delayed-scaling update. Same rules as
// kernels/ops.h (dispatch on the device of the first non-empty tensor, CPU reference in
// kernels/cpu/fp8.cpp, CUDA in kernels/cuda/fp8_*.cu and gemm_fp8.cu); kept apart from ops.h so
// the FP8 work does not touch the shared op list. Each op queues its device work on the trailing
// stream (kernels/op_types.h). Hybrid format: E4M3 for weights and
// activations, E5M2 for gradients. Scales live on the device and are never read by the host.
// Shape letters: R, C rows and columns of a quantized tensor; M, N, K GEMM sizes; L amax history
// length; n number of scaled tensors.
#pragma once
#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::ops {

// ---- quantize: f32 | bf16 | f16 -> e4m3 | e5m2, saturating, round to nearest even ------------
// out[r,c] = fp8(in[r,c] * scale)   and, when out_t is not empty, out_t[c,r] = out[r,c].
// amax = max(amax, max |in|) over the unscaled input (accumulated, so one amax can cover several
// calls; fp8_update_scales zeroes it). The product in * scale is one f32 multiply; the
// conversion is OCP "SAT": finite overflow and ±Inf go to ±max (448 or 57344).
// NaN: a NaN product is stored as 0x7F (the NaN code of both formats, sign dropped, what the
// Hopper cvt instruction produces), and a NaN input makes amax the quiet NaN 0x7FC00000 (|x| is
// compared by its bit pattern, where NaN orders above +Inf), so fp8_update_scales sees a
// non-finite amax; an Inf input makes it +Inf.
// Degenerate R or C = 0: nothing is written and amax is unchanged. in may be any rank; it is
// read as (R, C) with C its last dim.
void fp8_quantize(Tensor out /*(R,C) e4m3|e5m2*/, Tensor out_t /*(C,R) out's dtype, or empty*/,
                  Tensor amax /*(1) f32, max-accumulated*/, Tensor in /*(R,C) f32|bf16|f16*/,
                  Tensor scale /*(1) f32*/, Stream stream = {});

// ---- SwiGLU backward fused with the quantization of its two gradients -----------------------
// Exactly swiglu_backward (kernels/ops.h) into dgate/dup in the inputs' dtype, each then passed
// through fp8_quantize (its out, out_t, amax and scale), without the 16-bit gradients ever being
// written: the gate and up projections' backward GEMMs read only the FP8 operands, so the fusion
// skips a write and a read of both. Both gradients in one format; out_t tensors both given or
// both empty.
void swiglu_backward_fp8(Tensor dgate8 /*(R,C)*/, Tensor dgate8_t /*(C,R) or empty*/,
                         Tensor dup8 /*(R,C)*/, Tensor dup8_t /*(C,R) or empty*/,
                         Tensor amax_gate /*(1)*/, Tensor amax_up /*(1)*/,
                         Tensor dout /*(R,C) f32|bf16|f16*/, Tensor gate /*(R,C)*/,
                         Tensor up /*(R,C)*/, Tensor scale_gate /*(1)*/, Tensor scale_up /*(1)*/,
                         Stream stream = {});

// ---- scaled FP8 GEMM (the "TN" layout: both operands K-contiguous) ---------------------------
// c (M,N) = a_scale_inv * b_scale_inv * a (M,K) · b (N,K)^T   (+ c when accumulate)
// Operand pairs: e4m3 x e4m3 (forward) and e5m2 x e4m3 or e4m3 x e5m2 (gradients); e5m2 x e5m2
// is rejected (cuBLASLt has no such kernel). c is bf16 or f32; the sum is formed in f32 (CPU: in
// double), the scales multiply the sum (+ c), the result is rounded to f32 and, for bf16 c, then
// to bf16 (what the GPU epilogue does).
// A linear layer y = x w^T (x (M,K), w (N,K)) in FP8, with fp8_quantize's out_t giving the
// transposes:   forward  gemm_fp8(y (M,N),  x8 (M,K) e4m3,    w8 (N,K) e4m3,    ..., false)
//               dgrad    gemm_fp8(dx (M,K), dy8 (M,N) e5m2,   w8_t (K,N) e4m3,  ..., false)
//               wgrad    gemm_fp8(dw (N,K), dy8_t (N,M) e5m2, x8_t (K,M) e4m3,  ..., true)
// CUDA needs K and N multiples of 16 and 16-byte aligned pointers (cuBLASLt FP8 requirements; M
// is free; the CPU takes any size), and a GPU of compute capability 8.9+;
// it uses fast accumulation for e4m3 x e4m3 and split (promoted f32) accumulation when an operand
// is e5m2, as TransformerEngine does (forward: speed; gradients: precision).
void gemm_fp8(Tensor c /*(M,N) bf16|f32*/, Tensor a /*(M,K) fp8*/, Tensor b /*(N,K) fp8*/,
              Tensor a_scale_inv /*(1) f32*/, Tensor b_scale_inv /*(1) f32*/, bool accumulate,
              Stream stream = {});

// ---- delayed scaling: history roll and scale update ----------------------------------------
enum class Fp8AmaxCompute { max, most_recent };

struct Fp8UpdateParams {
  Tensor fp8_max;  // (n) f32: the largest finite value of each tensor's format (448 or 57344)
  Fp8AmaxCompute amax_compute = Fp8AmaxCompute::max;
  int margin = 0;  // scale = fp8_max / amax / 2^margin; 0 <= margin <= 64
};

// For every tensor j (each column of the history), in this order:
//   1. shift: amax_history[i,j] = amax_history[i-1,j] for i = L-1..1; row 0 = this step's amax
//      (row 0 is the most recent; a shift rather than a ring, so the layout has no cursor and a
//      checkpoint is the plain array). A non-finite amax enters the history as 0.
//   2. a = max over the L rows (max) or row 0 (most_recent).
//   3. if this step's amax is finite and a > 0: scale = fp8_max / a / 2^margin (two correctly
//      rounded f32 divisions; an overflow to Inf becomes FLT_MAX); otherwise the scale is kept
//      (an all-zero tensor carries no information; a non-finite amax means an Inf/NaN input, which
//      the caller detects and must not turn into a zero or NaN scale). scale_inv = 1 / scale.
//   4. amax[j] = 0, ready for the next step's accumulation.
void fp8_update_scales(Tensor amax_history /*(L,n) f32*/, Tensor scale /*(n) f32*/,
                       Tensor scale_inv /*(n) f32*/, Tensor amax /*(n) f32*/,
                       const Fp8UpdateParams& params, Stream stream = {});

// The largest finite value of an fp8 format (448 for e4m3, 57344 for e5m2).
float fp8_max_of(DType format);

}  // namespace tessera::ops
