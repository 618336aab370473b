// Dispatch of the inference ops (kernels/ops_infer.h) to their backend, chosen by the device of the
// first non-empty tensor (kernels/dispatch.h). On the CPU, 16-bit activations go through
// NarrowScope; quantization scales (f16 bits) and the byte copies of the KV cache do not.
#include "kernels/ops_infer.h"

#include "kernels/cpu/infer.h"
#include "kernels/dispatch.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/infer.h"
#endif

namespace tessera::ops {

using detail::dispatch;

void infer_linear_forward(Tensor out, Tensor inp, const InferWeight& w, Tensor bias,
                          Stream stream) {
  constexpr const char* kOp = "infer_linear_forward";
  Tensor weight = w.w;
  dispatch(
      kOp, {&out, &inp, &weight, &bias}, stream,
      TS_ON_CUDA(cuda::infer_linear_forward(out, inp, w, bias, stream)), [&](cpu::NarrowScope& n) {
        // Checked before widening, which would make a bf16 and an f16 operand alike.
        for (const Tensor* t : {&out, &bias})
          TS_CHECK(t->empty() || t->dtype == inp.dtype, "{}: {} beside inp {}", kOp, t->str(),
                   inp.str());
        TS_CHECK(w.quantized() || w.w.dtype == inp.dtype,
                 "{}: float weight {} beside inp {}: they share one dtype", kOp, w.w.str(),
                 inp.str());
        InferWeight wide = w;
        if (!w.quantized()) wide.w = n.in(w.w, "w");
        cpu::infer_linear_forward(n.out(out, "out"), n.in(inp, "inp"), wide, n.in(bias, "bias"));
      });
}

void kv_cache_write(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, Tensor slots,
                    Stream stream) {
  dispatch("kv_cache_write", {&k_cache, &v_cache, &k, &v, &slots}, stream,
           TS_ON_CUDA(cuda::kv_cache_write(k_cache, v_cache, k, v, slots, stream)),
           [&] { cpu::kv_cache_write(k_cache, v_cache, k, v, slots); });
}

void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies, Stream stream) {
  dispatch("kv_cache_copy_blocks", {&k_cache, &v_cache, &copies}, stream,
           TS_ON_CUDA(cuda::kv_cache_copy_blocks(k_cache, v_cache, copies, stream)),
           [&] { cpu::kv_cache_copy_blocks(k_cache, v_cache, copies); });
}

int64_t paged_attention_scratch_bytes(int64_t num_rows, int64_t num_hq, int64_t head_dim,
                                      int64_t max_context) {
  const int64_t partitions =
      (max_context + kPagedAttentionPartition - 1) / kPagedAttentionPartition;
  if (partitions <= 1) return 0;
  // Per (row, query head, partition): the unnormalized output (D f32), then its max and sum.
  return num_rows * num_hq * partitions * (head_dim + 2) * int64_t(sizeof(float));
}

void paged_attention_forward(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                             Tensor block_tables, Tensor seq, Tensor pos, float scale,
                             int max_context, Tensor scratch, Stream stream) {
  constexpr const char* kOp = "paged_attention_forward";
  dispatch(kOp, {&out, &q, &k_cache, &v_cache, &block_tables, &seq, &pos}, stream,
           TS_ON_CUDA(cuda::paged_attention_forward(out, q, k_cache, v_cache, block_tables, seq,
                                                    pos, scale, max_context, scratch, stream)),
           [&](cpu::NarrowScope& n) {
             for (const Tensor* t : {&out, &k_cache, &v_cache})
               TS_CHECK(t->dtype == q.dtype, "{}: {} beside q {}: all float operands share a dtype",
                        kOp, t->str(), q.str());
             cpu::paged_attention_forward(n.out(out, "out"), n.in(q, "q"), n.in(k_cache, "k_cache"),
                                          n.in(v_cache, "v_cache"), block_tables, seq, pos, scale,
                                          max_context);
           });
}

void rope_rows_forward(Tensor out, Tensor inp, Tensor pos, float theta, Stream stream) {
  dispatch("rope_rows_forward", {&out, &inp, &pos}, stream,
           TS_ON_CUDA(cuda::rope_rows_forward(out, inp, pos, theta, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::rope_rows_forward(n.out(out, "out"), n.in(inp, "inp"), pos, theta);
           });
}

}  // namespace tessera::ops
