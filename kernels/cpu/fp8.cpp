// CPU references of the FP8 ops (kernels/ops_fp8.h): quantize (+ transpose, amax), the scaled
// FP8 GEMM, and the delayed-scaling update. Quantize and update reproduce the CUDA kernels bit
// for bit (same f32 operations, core/dtype.h's exact round-to-nearest-even conversions); the GEMM
// sums in double (cpu::gemm on the decoded operands), which the GPU's f32 tensor-core sums approach
// within the bound in its test.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fp8.h"
#include "kernels/cpu/narrow.h"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cpu {

namespace {

float load_f32(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::bf16: return bf16_bits_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::f16: return f16_bits_to_f32(static_cast<const uint16_t*>(data)[i]);
    default: TS_BUG("fp8: no f32 load for {}", dtype_name(dtype));
  }
}

// One f32 value to the fp8 code of `format`, saturating, NaN -> kNanCode (ops_fp8.h).
uint8_t encode(float v, DType format) {
  if (std::isnan(v)) return fp8::kNanCode;
  return format == DType::e4m3 ? f32_to_e4m3_bits(v, true) : f32_to_e5m2_bits(v, true);
}

// |x| as the int32 that orders non-negative floats: the key of amax. Every NaN becomes the one
// quiet NaN 0x7FC00000, which orders above +Inf (widening f16 NaNs on the GPU changes payloads).
int32_t abs_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7FFFFFFFu;
  return static_cast<int32_t>(bits > 0x7F800000u ? fp8::kNanKey : bits);
}

float key_to_float(int32_t key) {
  float x;
  std::memcpy(&x, &key, sizeof(x));
  return x;
}

// Decoding table of one fp8 format: code -> f32 value.
std::vector<float> decode_table(DType format) {
  std::vector<float> table(256);
  for (int code = 0; code < 256; ++code)
    table[code] =
        format == DType::e4m3 ? e4m3_bits_to_f32(uint8_t(code)) : e5m2_bits_to_f32(uint8_t(code));
  return table;
}

}  // namespace

void fp8_quantize(Tensor out, Tensor out_t, Tensor amax, Tensor in, Tensor scale) {
  const fp8::QuantizeDims d =
      fp8::check_quantize(out, out_t, amax, in, scale, Device::cpu, "fp8_quantize");
  if (d.rows == 0 || d.cols == 0) return;
  const float s = *scale.ptr<float>();
  auto* dst = static_cast<uint8_t*>(out.data);
  auto* dst_t = static_cast<uint8_t*>(out_t.data);  // null when absent
  const int64_t rows = d.rows, cols = d.cols;
  // The amax is a max over int keys: exact, so the thread split cannot change it.
  int32_t key = static_cast<int32_t>(std::bit_cast<uint32_t>(*amax.ptr<float>()));
#pragma omp parallel for schedule(static) reduction(max : key) if (rows * cols > kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float x = load_f32(in.data, in.dtype, r * cols + c);
      key = std::max(key, abs_key(x));
      const uint8_t code = encode(x * s, out.dtype);
      dst[r * cols + c] = code;
      if (dst_t) dst_t[c * rows + r] = code;
    }
  }
  *amax.ptr<float>() = key_to_float(key);
}

// The reference is the composition it fuses: swiglu_backward into temporaries of the inputs'
// dtype (as ops::swiglu_backward computes them), then fp8_quantize of each.
void swiglu_backward_fp8(Tensor dgate8, Tensor dgate8_t, Tensor dup8, Tensor dup8_t,
                         Tensor amax_gate, Tensor amax_up, Tensor dout, Tensor gate, Tensor up,
                         Tensor scale_gate, Tensor scale_up) {
  fp8::check_swiglu_backward(dgate8, dgate8_t, dup8, dup8_t, amax_gate, amax_up, dout, gate, up,
                             scale_gate, scale_up, Device::cpu, "swiglu_backward_fp8");
  const size_t bytes = dtype_storage_bytes(dout.dtype, dout.numel());
  std::vector<std::byte> dgate_bytes(bytes), dup_bytes(bytes);
  const Tensor dgate(dgate_bytes.data(), dout.dtype, Device::cpu, dout.shape);
  const Tensor dup(dup_bytes.data(), dout.dtype, Device::cpu, dout.shape);
  NarrowScope n("swiglu_backward_fp8");  // 16-bit operands computed in f32, rounded like the GPU
  swiglu_backward(n.out(dgate, "dgate"), n.out(dup, "dup"), n.in(dout, "dout"), n.in(gate, "gate"),
                  n.in(up, "up"));
  n.finish();
  fp8_quantize(dgate8, dgate8_t, amax_gate, dgate, scale_gate);
  fp8_quantize(dup8, dup8_t, amax_up, dup, scale_up);
}

void gemm_fp8(Tensor c, Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv,
              bool accumulate) {
  const fp8::GemmDims d =
      fp8::check_gemm(c, a, b, a_scale_inv, b_scale_inv, Device::cpu, "gemm_fp8");
  const int64_t m = d.m, n = d.n, k = d.k;
  if (m == 0 || n == 0) return;
  // Decode once: fp8 values and their products are exact in double, so the sum below differs
  // from the exact dot product only by double rounding (relative 2^-53 per addition).
  const std::vector<float> table_a = decode_table(a.dtype), table_b = decode_table(b.dtype);
  std::vector<double> av(m * k), bv(n * k);
  const auto* a8 = static_cast<const uint8_t*>(a.data);
  const auto* b8 = static_cast<const uint8_t*>(b.data);
  for (int64_t i = 0; i < m * k; ++i) av[i] = table_a[a8[i]];
  for (int64_t i = 0; i < n * k; ++i) bv[i] = table_b[b8[i]];
  // acc (M,N) = av (M,K) bv (N,K)^T in double through cpu::gemm (BLAS dgemm when the build has
  // it: 8x faster than a loop here, which made FP8 the slowest CPU precision in CI; the loop
  // otherwise). The order of the double additions differs from a loop's; at 2^-53 per addition
  // that cannot show after the rounding to f32 below except at a tie.
  std::vector<double> acc(size_t(m * n));
  gemm(Tensor(acc.data(), DType::f64, Device::cpu, {m, n}),
       Tensor(av.data(), DType::f64, Device::cpu, {m, k}),
       Tensor(bv.data(), DType::f64, Device::cpu, {n, k}), false, true, 1.0f, 0.0f);
  // sa * sb is exact in double (two 24-bit significands).
  const double scale = double(*a_scale_inv.ptr<float>()) * double(*b_scale_inv.ptr<float>());
  const bool is_bf16 = c.dtype == DType::bf16;
  auto* c32 = is_bf16 ? nullptr : static_cast<float*>(c.data);
  auto* c16 = is_bf16 ? static_cast<uint16_t*>(c.data) : nullptr;
#pragma omp parallel for schedule(static) if (m * n > kMinParallelWork)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double v = acc[size_t(i * n + j)] * scale;
      if (accumulate) v += is_bf16 ? double(bf16_bits_to_f32(c16[i * n + j])) : c32[i * n + j];
      // Rounded to f32 (what the GPU epilogue holds), then to bf16 when c is bf16.
      const float v32 = static_cast<float>(v);
      if (is_bf16)
        c16[i * n + j] = f32_to_bf16_bits(v32);
      else
        c32[i * n + j] = v32;
    }
  }
}

void fp8_update_scales(Tensor amax_history, Tensor scale, Tensor scale_inv, Tensor amax,
                       const ops::Fp8UpdateParams& params) {
  const fp8::UpdateDims d = fp8::check_update(amax_history, scale, scale_inv, amax, params,
                                              Device::cpu, "fp8_update_scales");
  const int64_t len = d.history_len, n = d.num_tensors;
  float* hist = amax_history.ptr<float>();
  float* sc = scale.ptr<float>();
  float* sc_inv = scale_inv.ptr<float>();
  float* am = amax.ptr<float>();
  const float* fmax = params.fp8_max.ptr<float>();
  const float pow2_margin = std::ldexp(1.0f, params.margin);
  for (int64_t j = 0; j < n; ++j) {
    const float now = am[j];
    const bool finite = std::isfinite(now);
    for (int64_t i = len - 1; i >= 1; --i) hist[i * n + j] = hist[(i - 1) * n + j];
    hist[j] = finite ? now : 0.0f;
    float reduced = hist[j];
    if (params.amax_compute == ops::Fp8AmaxCompute::max)
      for (int64_t i = 1; i < len; ++i) reduced = std::max(reduced, hist[i * n + j]);
    if (finite && reduced > 0.0f) sc[j] = fp8::scale_from_amax(fmax[j], reduced, pow2_margin);
    sc_inv[j] = 1.0f / sc[j];
    am[j] = 0.0f;
  }
}

}  // namespace tessera::cpu
