// The inference engine's linear, CPU reference (kernels/ops_infer.h): out = inp · w^T + bias with w
// an INT8/INT4 weight dequantized by kernels/quant_math.h, or a float weight. Sums in double, in
// k order, rounded once per output; each output depends on its own row and weight row only.
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/infer.h"
#include "kernels/infer_checks.h"
#include "kernels/quant_math.h"

namespace tessera::cpu {
namespace {

// Row n of the weight as exact f32 (dequantized codes, or the float weight's values).
template <class T>
void weight_row(const ops::InferWeight& w, int64_t n, int64_t num_k, float* dst) {
  if (!w.quantized()) {
    const T* row = w.w.ptr<T>() + n * num_k;
    for (int64_t k = 0; k < num_k; ++k) dst[k] = float(row[k]);
    return;
  }
  const auto* scales = static_cast<const uint16_t*>(w.scales.data) + n * (num_k / w.group);
  if (w.w.dtype == DType::i8) {
    const int8_t* row = w.w.ptr<int8_t>() + n * num_k;
    for (int64_t k = 0; k < num_k; ++k) dst[k] = quant::dequant(row[k], scales[k / w.group]);
  } else {  // i4: two codes a byte, element 2j in the low nibble (K is even)
    const auto* row = static_cast<const uint8_t*>(w.w.data) + n * (num_k / 2);
    for (int64_t k = 0; k < num_k; ++k) {
      const int nibble = (row[k / 2] >> (k % 2 == 0 ? 0 : 4)) & 0xF;
      dst[k] = quant::dequant((nibble ^ 8) - 8, scales[k / w.group]);
    }
  }
}

}  // namespace

void infer_linear_forward(Tensor out, Tensor inp, const ops::InferWeight& w, Tensor bias) {
  constexpr const char* kOp = "infer_linear_forward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() == 2 && inp.dim(0) >= 1, "{}: inp must be (M,K) with M >= 1, got {}", kOp,
           inp.str());
  const int64_t num_m = inp.dim(0), num_k = inp.dim(1);
  check_host(w.w, kOp, "w.w");
  if (w.quantized()) check_host(w.scales, kOp, "w.scales");
  const int64_t num_n = ops::check_infer_weight(w, num_k, inp.dtype, kOp);
  check_like(out, inp.dtype, {num_m, num_n}, kOp, "out");
  if (!bias.empty()) check_like(bias, inp.dtype, {num_n}, kOp, "bias");
  TS_CHECK(!overlaps(out, inp) && !overlaps(out, w.w) && !overlaps(out, bias),
           "{}: out overlaps an input", kOp);
  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = inp.ptr<T>();
    T* y = out.ptr<T>();
    const T* b = bias.empty() ? nullptr : bias.ptr<T>();
    // Parallel over weight rows: each dequantizes its row once and writes its own outputs.
#pragma omp parallel if (num_m * num_n * num_k > kMinParallelWork)
    {
      std::vector<float> row(num_k);  // (K) one weight row as f32
#pragma omp for schedule(static)
      for (int64_t n = 0; n < num_n; ++n) {
        weight_row<T>(w, n, num_k, row.data());
        for (int64_t m = 0; m < num_m; ++m) {
          const T* xm = x + m * num_k;
          double acc = 0.0;
          for (int64_t k = 0; k < num_k; ++k) acc += double(xm[k]) * double(row[k]);
          if (b) acc += double(b[n]);
          y[m * num_n + n] = T(acc);
        }
      }
    }
  });
}

}  // namespace tessera::cpu
