// CUDA versions of the inference op family (kernels/ops_infer.h documents each op; the CPU
// references with the same names are in kernels/cpu/infer.h): infer_linear.cu, kv_cache.cu,
// paged_attention.cu, rope.cu. All queue work on the stream they take, never synchronize with the
// host and allocate nothing. Plain C++ header.
#pragma once
#include "core/tensor.h"
#include "kernels/op_types.h"
#include "kernels/ops_infer.h"

namespace tessera::cuda {

void infer_linear_forward(Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/, const ops::InferWeight& w,
                          Tensor bias /*(N) or empty*/, ops::Stream stream = {});
void kv_cache_write(Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                    Tensor k /*(M,Hkv,D)*/, Tensor v /*(M,Hkv,D)*/, Tensor slots /*(M) i32*/,
                    ops::Stream stream = {});
void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies /*(P,2) i32*/,
                          ops::Stream stream = {});
void paged_attention_forward(Tensor out /*(M,Hq,D)*/, Tensor q /*(M,Hq,D)*/,
                             Tensor k_cache /*(NB,BS,Hkv,D)*/, Tensor v_cache /*(NB,BS,Hkv,D)*/,
                             Tensor block_tables /*(S,MB) i32*/, Tensor seq /*(M) i32*/,
                             Tensor pos /*(M) i32*/, float scale, int max_context, Tensor scratch,
                             ops::Stream stream = {});
void rope_rows_forward(Tensor out /*(M,H,D)*/, Tensor inp /*(M,H,D)*/, Tensor pos /*(M) i32*/,
                       float theta, ops::Stream stream = {});

}  // namespace tessera::cuda
