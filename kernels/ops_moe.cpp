// Dispatch of the MoE ops (kernels/ops_moe.h) to their backend, chosen by the device of the first
// non-empty tensor (kernels/dispatch.h). Index tensors are i32 on both backends.
#include "kernels/ops_moe.h"

#include "kernels/cpu/moe.h"
#include "kernels/dispatch.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/moe.h"
#endif

namespace tessera::ops {

using detail::dispatch;

// ---- router ---------------------------------------------------------------------------------
// Router tensors are f32 (f64 on the CPU) whatever the model's dtype: no NarrowScope; the backends
// reject any other dtype.

void moe_router_forward(Tensor probs, Tensor lse, Tensor topk_idx, Tensor topk_w, Tensor logits,
                        bool norm_topk_prob, Stream stream) {
  dispatch("moe_router_forward", {&probs, &lse, &topk_idx, &topk_w, &logits}, stream,
           TS_ON_CUDA(cuda::moe_router_forward(probs, lse, topk_idx, topk_w, logits, norm_topk_prob,
                                               stream)),
           [&] { cpu::moe_router_forward(probs, lse, topk_idx, topk_w, logits, norm_topk_prob); });
}

void moe_router_loss(Tensor loss, Tensor probs, Tensor lse, Tensor tokens_per_expert,
                     double aux_scale, double z_scale, Stream stream) {
  dispatch("moe_router_loss", {&loss, &probs, &lse, &tokens_per_expert}, stream,
           TS_ON_CUDA(cuda::moe_router_loss(loss, probs, lse, tokens_per_expert, aux_scale, z_scale,
                                            stream)),
           [&] { cpu::moe_router_loss(loss, probs, lse, tokens_per_expert, aux_scale, z_scale); });
}

void moe_router_backward(Tensor d_logits, Tensor d_topk_w, Tensor probs, Tensor lse,
                         Tensor topk_idx, Tensor tokens_per_expert, double aux_scale,
                         double z_scale, bool norm_topk_prob, Stream stream) {
  dispatch("moe_router_backward", {&d_logits, &d_topk_w, &probs, &lse, &topk_idx}, stream,
           TS_ON_CUDA(cuda::moe_router_backward(d_logits, d_topk_w, probs, lse, topk_idx,
                                                tokens_per_expert, aux_scale, z_scale,
                                                norm_topk_prob, stream)),
           [&] {
             cpu::moe_router_backward(d_logits, d_topk_w, probs, lse, topk_idx, tokens_per_expert,
                                      aux_scale, z_scale, norm_topk_prob);
           });
}

// (end of router)

// ---- dispatch plan, permute, unpermute ------------------------------------------------------
// Rows (x, xp, yp, out and their gradients) go through NarrowScope; the i32 index tensors pass
// through it untouched, and topk_w / d_topk_w are f32 by contract (f64 beside f64 rows): stat_in /
// stat_out keep them unwidened and reject a 16-bit one, as the CUDA kernels do.

void moe_dispatch_plan(Tensor tokens_per_expert, Tensor offsets, Tensor slot_row, Tensor row_slot,
                       Tensor topk_idx, int64_t capacity, Stream stream) {
  dispatch(
      "moe_dispatch_plan", {&tokens_per_expert, &offsets, &slot_row, &row_slot, &topk_idx}, stream,
      TS_ON_CUDA(cuda::moe_dispatch_plan(tokens_per_expert, offsets, slot_row, row_slot, topk_idx,
                                         capacity, stream)),
      [&] {
        cpu::moe_dispatch_plan(tokens_per_expert, offsets, slot_row, row_slot, topk_idx, capacity);
      });
}

void moe_permute(Tensor xp, Tensor x, Tensor row_slot, int topk, Stream stream) {
  dispatch("moe_permute", {&xp, &x, &row_slot}, stream,
           TS_ON_CUDA(cuda::moe_permute(xp, x, row_slot, topk, stream)), [&](cpu::NarrowScope& n) {
             cpu::moe_permute(n.out(xp, "xp"), n.in(x, "x"), n.in(row_slot, "row_slot"), topk);
           });
}

void moe_permute_backward(Tensor dx, Tensor dxp, Tensor slot_row, Stream stream) {
  dispatch(
      "moe_permute_backward", {&dx, &dxp, &slot_row}, stream,
      TS_ON_CUDA(cuda::moe_permute_backward(dx, dxp, slot_row, stream)), [&](cpu::NarrowScope& n) {
        cpu::moe_permute_backward(n.out(dx, "dx"), n.in(dxp, "dxp"), n.in(slot_row, "slot_row"));
      });
}

void moe_unpermute(Tensor out, Tensor yp, Tensor slot_row, Tensor topk_w, Stream stream) {
  dispatch("moe_unpermute", {&out, &yp, &slot_row, &topk_w}, stream,
           TS_ON_CUDA(cuda::moe_unpermute(out, yp, slot_row, topk_w, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::moe_unpermute(n.out(out, "out"), n.in(yp, "yp"), n.in(slot_row, "slot_row"),
                                n.stat_in(topk_w, "topk_w"));
           });
}

void moe_unpermute_backward(Tensor dyp, Tensor d_topk_w, Tensor dout, Tensor yp, Tensor slot_row,
                            Tensor row_slot, Tensor topk_w, Stream stream) {
  dispatch("moe_unpermute_backward", {&dyp, &d_topk_w, &dout, &yp, &slot_row, &row_slot, &topk_w},
           stream,
           TS_ON_CUDA(cuda::moe_unpermute_backward(dyp, d_topk_w, dout, yp, slot_row, row_slot,
                                                   topk_w, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::moe_unpermute_backward(n.out(dyp, "dyp"), n.stat_out(d_topk_w, "d_topk_w"),
                                         n.in(dout, "dout"), n.in(yp, "yp"),
                                         n.in(slot_row, "slot_row"), n.in(row_slot, "row_slot"),
                                         n.stat_in(topk_w, "topk_w"));
           });
}

// (end of permute)

// ---- grouped GEMM ---------------------------------------------------------------------------

namespace {

// x, w, y / dy / dx share one dtype; dw is that dtype or f32 (FP32 main gradients). Checked before
// NarrowScope, which widens a bf16 and an f16 operand alike to f32 and would hide a mismatch from
// the CPU kernel's own checks.
void check_grouped_gemm_dtypes(const char* op, const Tensor& x,
                               std::initializer_list<const Tensor*> same, const Tensor& dw) {
  for (const Tensor* t : same)
    TS_CHECK(t->empty() || t->dtype == x.dtype,
             "{}: {} beside x {}: all float operands but dw share x's dtype", op, t->str(),
             x.str());
  TS_CHECK(dw.empty() || dw.dtype == x.dtype || dw.dtype == DType::f32,
           "{}: dw is {}, expected {} or f32", op, dw.str(), dtype_name(x.dtype));
}

}  // namespace

void grouped_gemm_forward(Tensor y, Tensor x, Tensor w, Tensor offsets, Stream stream) {
  constexpr const char* kOp = "grouped_gemm_forward";
  dispatch(kOp, {&y, &x, &w, &offsets}, stream,
           TS_ON_CUDA(cuda::grouped_gemm_forward(y, x, w, offsets, stream)),
           [&](cpu::NarrowScope& n) {
             check_grouped_gemm_dtypes(kOp, x, {&y, &w}, Tensor());
             cpu::grouped_gemm_forward(n.out(y, "y"), n.in(x, "x"), n.in(w, "w"), offsets);
           });
}

void grouped_gemm_backward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor offsets,
                           Stream stream) {
  constexpr const char* kOp = "grouped_gemm_backward";
  dispatch(kOp, {&dx, &dw, &dy, &x, &w, &offsets}, stream,
           TS_ON_CUDA(cuda::grouped_gemm_backward(dx, dw, dy, x, w, offsets, stream)),
           [&](cpu::NarrowScope& n) {
             check_grouped_gemm_dtypes(kOp, x, {&dx, &dy, &w}, dw);
             cpu::grouped_gemm_backward(n.out(dx, "dx"), n.inout(dw, "dw"), n.in(dy, "dy"),
                                        n.in(x, "x"), n.in(w, "w"), offsets);
           });
}

// (end of grouped GEMM)

}  // namespace tessera::ops
