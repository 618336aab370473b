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

// (end of router)

// ---- dispatch plan, permute, unpermute ------------------------------------------------------

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
