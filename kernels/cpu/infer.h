// CPU references of the inference op family (kernels/ops_infer.h documents each op): same names
// and argument order as there, without the stream. Plain loops, sums in double, results
// independent of the thread count and of the other rows of a batch.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "kernels/ops_infer.h"

namespace tessera::cpu {

// inp, out, bias f32 or f64 (16-bit ones arrive widened by NarrowScope); w.w i8, i4 or the
// activations' float dtype; w.scales f16 as stored (never widened).
void infer_linear_forward(Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/, const ops::InferWeight& w,
                          Tensor bias /*(N) or empty*/);
// Any dtype of the cache (a byte copy), so 16-bit caches are not widened.
void kv_cache_write(Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                    Tensor k /*(M,Hkv,D)*/, Tensor v /*(M,Hkv,D)*/, Tensor slots /*(M) i32*/);
void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies /*(P,2) i32*/);
void paged_attention_forward(Tensor out /*(M,Hq,D)*/, Tensor q /*(M,Hq,D)*/,
                             Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                             Tensor block_tables /*(S,MB) i32*/, Tensor seq /*(M) i32*/,
                             Tensor pos /*(M) i32*/, float scale, int max_context);
void rope_rows_forward(Tensor out /*(M,H,D)*/, Tensor inp /*(M,H,D)*/, Tensor pos /*(M) i32*/,
                       float theta);

}  // namespace tessera::cpu
