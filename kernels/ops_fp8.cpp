// Dispatch of the FP8 ops (kernels/ops_fp8.h) to their backend, chosen by the device of the first
// non-empty tensor, and the operand checks both backends share (kernels/ops_fp8_checks.h).
#include "kernels/ops_fp8.h"

#include "kernels/cpu/fp8.h"
#include "kernels/dispatch.h"
#include "kernels/op_profile.h"
#include "kernels/ops_fp8_checks.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/fp8.h"
#endif

namespace tessera {

namespace fp8 {

namespace {
void check_scalar(const Tensor& t, Device device, const char* op, const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == device && t.dtype == DType::f32 && t.numel() == 1,
           "{}: {} is {}, expected one f32 on {}", op, name, t.str(), device_name(device));
}
}  // namespace

QuantizeDims check_quantize(const Tensor& out, const Tensor& out_t, const Tensor& amax,
                            const Tensor& in, const Tensor& scale, Device device, const char* op) {
  TS_CHECK(!out.empty() && !in.empty(), "{}: out and in are required", op);
  TS_CHECK(out.device == device && in.device == device, "{}: out {} and in {} must be on {}", op,
           out.str(), in.str(), device_name(device));
  TS_CHECK(is_fp8(out.dtype), "{}: out is {}, expected e4m3 or e5m2", op, out.str());
  TS_CHECK(in.dtype == DType::f32 || in.dtype == DType::bf16 || in.dtype == DType::f16,
           "{}: in is {}, expected f32, bf16 or f16", op, in.str());
  TS_CHECK(in.ndim() >= 1 && out.shape == in.shape, "{}: out {} must have in's shape {}", op,
           out.str(), in.str());
  check_scalar(amax, device, op, "amax");
  check_scalar(scale, device, op, "scale");
  QuantizeDims d;
  d.cols = in.dim(-1);
  d.rows = d.cols == 0 ? 0 : in.numel() / d.cols;
  if (!out_t.empty()) {
    TS_CHECK(out_t.device == device && out_t.dtype == out.dtype,
             "{}: out_t is {}, expected {} on {}", op, out_t.str(), dtype_name(out.dtype),
             device_name(device));
    TS_CHECK(out_t.shape == (Shape{d.cols, d.rows}), "{}: out_t is {}, expected ({}, {})", op,
             out_t.str(), d.cols, d.rows);
  }
  return d;
}

QuantizeDims check_swiglu_backward(const Tensor& dgate8, const Tensor& dgate8_t, const Tensor& dup8,
                                   const Tensor& dup8_t, const Tensor& amax_gate,
                                   const Tensor& amax_up, const Tensor& dout, const Tensor& gate,
                                   const Tensor& up, const Tensor& scale_gate,
                                   const Tensor& scale_up, Device device, const char* op) {
  const QuantizeDims d = check_quantize(dgate8, dgate8_t, amax_gate, dout, scale_gate, device, op);
  check_quantize(dup8, dup8_t, amax_up, dout, scale_up, device, op);
  TS_CHECK(dgate8.dtype == dup8.dtype, "{}: dgate8 {} and dup8 {} must share a format", op,
           dgate8.str(), dup8.str());
  TS_CHECK(dgate8_t.empty() == dup8_t.empty(),
           "{}: dgate8_t {} and dup8_t {} must both be given "
           "or both be empty",
           op, dgate8_t.str(), dup8_t.str());
  for (const Tensor* t : {&gate, &up})
    TS_CHECK(t->device == device && t->dtype == dout.dtype && t->shape == dout.shape,
             "{}: gate {} and up {} must be like dout {}", op, gate.str(), up.str(), dout.str());
  return d;
}

GemmDims check_gemm(const Tensor& c, const Tensor& a, const Tensor& b, const Tensor& a_scale_inv,
                    const Tensor& b_scale_inv, Device device, const char* op) {
  for (const Tensor* t : {&c, &a, &b})
    TS_CHECK(!t->empty() && t->device == device && t->ndim() == 2,
             "{}: c, a, b must be 2-D tensors on {}, got c {}, a {}, b {}", op, device_name(device),
             c.str(), a.str(), b.str());
  TS_CHECK(c.dtype == DType::bf16 || c.dtype == DType::f32, "{}: c is {}, expected bf16 or f32", op,
           c.str());
  TS_CHECK(is_fp8(a.dtype) && is_fp8(b.dtype), "{}: a {} and b {} must be e4m3 or e5m2", op,
           a.str(), b.str());
  TS_CHECK(!(a.dtype == DType::e5m2 && b.dtype == DType::e5m2),
           "{}: e5m2 x e5m2 is not supported (cuBLASLt has no such kernel; quantize one operand "
           "as e4m3): a {}, b {}",
           op, a.str(), b.str());
  GemmDims d{c.dim(0), c.dim(1), a.dim(1)};
  TS_CHECK(a.dim(0) == d.m && b.shape == (Shape{d.n, d.k}),
           "{}: shapes must be c (M,N), a (M,K), b (N,K); got c {}, a {}, b {}", op, c.str(),
           a.str(), b.str());
  check_scalar(a_scale_inv, device, op, "a_scale_inv");
  check_scalar(b_scale_inv, device, op, "b_scale_inv");
  return d;
}

UpdateDims check_update(const Tensor& amax_history, const Tensor& scale, const Tensor& scale_inv,
                        const Tensor& amax, const ops::Fp8UpdateParams& params, Device device,
                        const char* op) {
  TS_CHECK(amax_history.ndim() == 2, "{}: amax_history is {}, expected (L, n)", op,
           amax_history.str());
  UpdateDims d{amax_history.dim(0), amax_history.dim(1)};
  TS_CHECK(d.history_len >= 1, "{}: amax_history is {}, needs L >= 1", op, amax_history.str());
  const Shape vec{d.num_tensors};
  const std::pair<const Tensor*, const char*> all[] = {{&amax_history, "amax_history"},
                                                       {&scale, "scale"},
                                                       {&scale_inv, "scale_inv"},
                                                       {&amax, "amax"},
                                                       {&params.fp8_max, "fp8_max"}};
  for (const auto& [t, name] : all) {
    TS_CHECK(!t->empty() && t->device == device && t->dtype == DType::f32,
             "{}: {} is {}, expected f32 on {}", op, name, t->str(), device_name(device));
    TS_CHECK(t == &amax_history || t->shape == vec, "{}: {} is {}, expected ({})", op, name,
             t->str(), d.num_tensors);
  }
  TS_CHECK(params.margin >= 0 && params.margin <= kMaxMargin, "{}: margin {} outside [0, {}]", op,
           params.margin, kMaxMargin);
  return d;
}

}  // namespace fp8

namespace ops {

using detail::dispatch;

float fp8_max_of(DType format) {
  if (format == DType::e4m3) return kE4M3Max;
  if (format == DType::e5m2) return kE5M2Max;
  TS_BUG("fp8_max_of: {} is not an fp8 format", dtype_name(format));
}

void fp8_quantize(Tensor out, Tensor out_t, Tensor amax, Tensor in, Tensor scale, Stream stream) {
  // The fp8 CPU references take every operand dtype themselves (no NarrowScope).
  dispatch("fp8_quantize", {&out, &out_t, &amax, &in, &scale}, stream,
           TS_ON_CUDA(cuda::fp8_quantize(out, out_t, amax, in, scale, stream)),
           [&] { cpu::fp8_quantize(out, out_t, amax, in, scale); });
}

void swiglu_backward_fp8(Tensor dgate8, Tensor dgate8_t, Tensor dup8, Tensor dup8_t,
                         Tensor amax_gate, Tensor amax_up, Tensor dout, Tensor gate, Tensor up,
                         Tensor scale_gate, Tensor scale_up, Stream stream) {
  dispatch("swiglu_backward_fp8", {&dgate8, &dup8, &dout, &gate, &up}, stream,
           TS_ON_CUDA(cuda::swiglu_backward_fp8(dgate8, dgate8_t, dup8, dup8_t, amax_gate, amax_up,
                                                dout, gate, up, scale_gate, scale_up, stream)),
           [&] {
             cpu::swiglu_backward_fp8(dgate8, dgate8_t, dup8, dup8_t, amax_gate, amax_up, dout,
                                      gate, up, scale_gate, scale_up);
           });
}

void gemm_fp8(Tensor c, Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv, bool accumulate,
              Stream stream) {
  dispatch("gemm_fp8", {&c, &a, &b}, stream,
           TS_ON_CUDA(cuda::gemm_fp8(c, a, b, a_scale_inv, b_scale_inv, accumulate, stream)),
           [&] { cpu::gemm_fp8(c, a, b, a_scale_inv, b_scale_inv, accumulate); });
}

void fp8_update_scales(Tensor amax_history, Tensor scale, Tensor scale_inv, Tensor amax,
                       const Fp8UpdateParams& params, Stream stream) {
  dispatch(
      "fp8_update_scales", {&amax_history, &scale, &scale_inv, &amax}, stream,
      TS_ON_CUDA(cuda::fp8_update_scales(amax_history, scale, scale_inv, amax, params, stream)),
      [&] { cpu::fp8_update_scales(amax_history, scale, scale_inv, amax, params); });
}

}  // namespace ops

}  // namespace tessera
