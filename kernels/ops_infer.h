// The inference engine's op family (issue 16): its linear (weight-only INT8/INT4 or float), the
// paged KV cache (write, block copy, attention) and rotary embedding at per-row positions. Same
// rules as
// kernels/ops.h (dispatch on the device of the first non-empty tensor; outputs overwritten;
// trailing Stream; 16-bit tensors on the CPU through kernels/cpu/narrow.h). CPU references in
// kernels/cpu/infer_linear.cpp, kv_cache.cpp, paged_attention.cpp, rope.cpp (rope_rows_forward),
// declared in kernels/cpu/infer.h; CUDA in kernels/cuda/infer_linear.cu, kv_cache.cu,
// paged_attention.cu, rope.cu, declared in kernels/cuda/infer.h. No op here synchronizes with the
// host or allocates memory.
//
// Batch invariance (the engine's promise that a request's output is the same alone and in any
// batch rests on it): every op computes each output row from that row's own inputs, in a
// summation order fixed by that row's own sizes (K and the group size; the row's context length)
// and never by the number of rows M, the other rows, or the launch configuration chosen for M.
//
// Shape letters: M rows (the tokens of one engine step), N output features, K input features,
// G = K / group, Hq query heads, Hkv key/value heads, D head dim, NB blocks of the cache, BS tokens
// per block, S sequences (rows of the block table), MB blocks per table row, P block copies.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::ops {

// ---- the engine's linear: weight-only quantized or float, batch-invariant ----------------------
// A weight (N,K) either stored as the Tessera export stores quantized weights
// (src/export/tessera_format.h): integer codes with one FP16 scale per `group` consecutive input
// columns of each row, the weight being quant::dequant(code, scale) (kernels/quant_math.h),
// exactly, in f32 -
//   w       int8: (N,K) i8 in [-127, 127];  int4: (N,K) i4 (packed, two per byte: element 2j of a
//           row in the low nibble, 2j+1 in the high one; two's complement, -8..7)
//   scales  (N,G) f16;  group >= 1 divides K (int4: group even)
// - or a float weight: w (N,K) f32, bf16 or f16 (the activations' dtype), scales empty, group 0.
struct InferWeight {
  Tensor w;
  Tensor scales;
  int64_t group = 0;
  bool quantized() const { return scales.data != nullptr; }
  int64_t out_features() const { return w.shape[0]; }
  int64_t in_features() const { return w.shape[1]; }
};

// out (M,N) = inp (M,K) · w^T + bias (N). Products and sums in f32 (the CPU reference in double,
// rounded once per output), rounded once to out's dtype. inp, out and bias share one float dtype
// (f32, bf16, f16; f64 on the CPU). M >= 1. On CUDA one kernel family serves decode (M of 1-8,
// a GEMV reading each weight once per step) and prefill (larger M) with the same per-output
// summation order, so it is batch-invariant (above); cuBLAS, which picks algorithms by M, is not.
void infer_linear_forward(Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/, const InferWeight& w,
                          Tensor bias /*(N) or empty*/, Stream stream = {});

// ---- paged KV cache -----------------------------------------------------------------------
// One layer's cache: k_cache, v_cache (NB, BS, Hkv, D) of one float dtype. A token's K/V row lives
// at slot = block * BS + offset (infer/kv_cache.h KvSlot::flat), i.e. row `slot` of the cache
// viewed as (NB*BS, Hkv, D).

// k_cache[slot[m]] = k[m], v_cache[slot[m]] = v[m] for every m with slots[m] >= 0 (negative:
// skipped). k, v have the cache's dtype. Slots must be distinct and < NB*BS (checked on the CPU;
// the GPU never writes out of bounds).
void kv_cache_write(Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                    Tensor k /*(M,Hkv,D)*/, Tensor v /*(M,Hkv,D)*/, Tensor slots /*(M) i32*/,
                    Stream stream = {});

// Copy-on-write: for each p, block copies[p][1] of k_cache and v_cache becomes a copy of block
// copies[p][0] (all BS rows). Sources and destinations distinct blocks; no destination is another
// copy's source.
void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies /*(P,2) i32*/,
                          Stream stream = {});

// Causal attention of each query row against its sequence's cached keys and values: row m
// belongs to table row seq[m] at position pos[m] and attends to that sequence's positions
// 0..pos[m], whose K/V sit at slot block_tables[seq[m], p / BS] * BS + p % BS (already written,
// this step's tokens included: kv_cache_write runs first). Query head h uses KV head
// h / (Hq / Hkv). out[m,h] = sum_p softmax_p(scale * q[m,h] · k_p) v_p, softmax and sums in f32
// (the CPU reference in double), rounded once to out's dtype. A row with pos[m] < 0 is padding: out
// zero. max_context bounds pos[m] + 1 over all rows (the host knows it; the CUDA launch is sized by
// it); a larger pos, a seq outside [0, S) or a block id outside [0, NB) is a caller bug (checked
// on the CPU, a NaN row on the GPU, which never reads out of bounds). Covers decode (one row per
// sequence) and prefill chunks (consecutive positions of one sequence) alike. D <= 256 on CUDA.
// CUDA splits a row's context into partitions of kPagedAttentionPartition positions
// (flash-decoding: more blocks in flight for one long sequence), each giving a running max, sum
// and unnormalized output, combined in partition order; partition p covers positions
// [p * kPagedAttentionPartition, ...) whatever the other rows, so the split depends on the row's
// own length only.
// scratch: device memory for those partials, at least paged_attention_scratch_bytes(M, Hq, D,
// max_context) bytes (any dtype; 0 bytes, i.e. an empty tensor is fine, when max_context fits one
// partition). An explicit operand because ops allocate nothing and the shared CUDA workspace is
// the GEMMs'; the CPU ignores it.
constexpr int kPagedAttentionPartition = 256;
int64_t paged_attention_scratch_bytes(int64_t num_rows, int64_t num_hq, int64_t head_dim,
                                      int64_t max_context);
void paged_attention_forward(Tensor out /*(M,Hq,D)*/, Tensor q /*(M,Hq,D)*/,
                             Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                             Tensor block_tables /*(S,MB) i32*/, Tensor seq /*(M) i32*/,
                             Tensor pos /*(M) i32*/, float scale, int max_context,
                             Tensor scratch /*paged_attention_scratch_bytes or empty*/,
                             Stream stream = {});

// ---- rotary embedding at per-row positions ------------------------------------------------
// rope_forward (kernels/ops.h) with each row's own position: row m is rotated by the angles of
// position pos[m]. Equals rope_forward on (1,1,H,D) with pos_offset = pos[m], bit for bit (on the
// CPU, and on CUDA against CUDA's rope_forward). A row with pos[m] < 0 is padding: copied
// unchanged. out may alias inp.
void rope_rows_forward(Tensor out /*(M,H,D)*/, Tensor inp /*(M,H,D)*/, Tensor pos /*(M) i32*/,
                       float theta, Stream stream = {});

}  // namespace tessera::ops
