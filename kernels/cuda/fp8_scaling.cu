// fp8_update_scales on CUDA (kernels/ops_fp8.h): one thread per scaled tensor shifts that
// tensor's amax history, reduces it and recomputes scale and scale_inv, entirely on the device
// (no host sync). Bit-exact with the CPU reference in kernels/cpu/fp8.cpp: the same f32
// operations, IEEE divisions (nvcc's default -prec-div=true, no -ftz), no contractible sums.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fp8.h"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cuda {

namespace {

constexpr int kThreads = 128;

// hist (L, n): thread j walks column j; neighbouring threads touch neighbouring words.
__global__ void __launch_bounds__(kThreads)
    update_scales_kernel(float* __restrict__ hist, float* __restrict__ scale,
                         float* __restrict__ scale_inv, float* __restrict__ amax,
                         const float* __restrict__ fp8_max, int64_t len, int64_t n, bool use_max,
                         float pow2_margin) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  const float now = amax[j];
  const bool finite = isfinite(now);
  for (int64_t i = len - 1; i >= 1; --i) hist[i * n + j] = hist[(i - 1) * n + j];
  hist[j] = finite ? now : 0.0f;
  float reduced = hist[j];
  if (use_max)  // every entry is finite and >= 0, so fmaxf is the CPU's std::max
    for (int64_t i = 1; i < len; ++i) reduced = fmaxf(reduced, hist[i * n + j]);
  float s = scale[j];
  if (finite && reduced > 0.0f) s = fp8::scale_from_amax(fp8_max[j], reduced, pow2_margin);
  scale[j] = s;
  scale_inv[j] = __fdiv_rn(1.0f, s);
  amax[j] = 0.0f;
}

}  // namespace

void fp8_update_scales(Tensor amax_history, Tensor scale, Tensor scale_inv, Tensor amax,
                       const ops::Fp8UpdateParams& params, ops::Stream stream) {
  const fp8::UpdateDims d = fp8::check_update(amax_history, scale, scale_inv, amax, params,
                                              Device::cuda, "fp8_update_scales");
  if (d.num_tensors == 0) return;
  const float pow2_margin = ldexpf(1.0f, params.margin);
  update_scales_kernel<<<ceil_div(d.num_tensors, kThreads), kThreads, 0, cuda_stream(stream)>>>(
      amax_history.ptr<float>(), scale.ptr<float>(), scale_inv.ptr<float>(), amax.ptr<float>(),
      params.fp8_max.ptr<float>(), d.history_len, d.num_tensors,
      params.amax_compute == ops::Fp8AmaxCompute::max, pow2_margin);
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace tessera::cuda
