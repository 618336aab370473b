// CUDA fake quantization for QAT (kernels/ops.h fake_quantize, row_absmax): one warp per group of
// a row. The warp finds the group's element of largest |x| (the first on ties, NaN never chosen,
// exactly as the CPU's strict scan), lane 0's scale is broadcast, and each lane writes its
// elements' q * fp16(d) through the scalar rules of kernels/quant_math.h, whose __*_rn
// intrinsics keep every product and sum a separately rounded f32 operation (no FMA), so the
// values agree bit for bit with the CPU reference. Each lane reads an element before writing it,
// so out may alias in.
#include <cstdint>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/fake_quant_checks.h"
#include "kernels/quant_math.h"

namespace tessera::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kNoIndex = 0x7fffffff;

// The group's candidate so far: the largest |x| > 0 and its index (kNoIndex: none yet).
struct Candidate {
  float abs;
  int idx;
};

// b wins over a when larger, or equal and earlier: the first element of largest |x|.
__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  return (b.abs > a.abs || (b.abs == a.abs && b.idx < a.idx)) ? b : a;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Candidate o;
    o.abs = __shfl_xor_sync(0xffffffffu, c.abs, offset);
    o.idx = __shfl_xor_sync(0xffffffffu, c.idx, offset);
    c = better(c, o);
  }
  return c;
}

// Only |x| > 0 competes (NaN compares false and is skipped; zeros leave the candidate empty, so
// an all-zero group has signed max +0 as on the CPU).
template <class T>
__device__ __forceinline__ Candidate group_best(const T* x, int64_t n, int lane) {
  Candidate c{0.0f, kNoIndex};
  for (int64_t j = lane; j < n; j += 32) {
    const float a = fabsf(to_f32(x[j]));
    if (a > 0.0f) c = better(c, Candidate{a, int(j)});
  }
  return warp_best(c);
}

// Grid: one warp per (row, group), rows * groups warps in all.
template <class T>
__global__ void fake_quantize_kernel(T* out, const T* in, int64_t rows, int64_t cols, int64_t group,
                                     bool int8, const float* row_amax) {
  const int lane = threadIdx.x % 32;
  const int64_t groups = cols / group;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= rows * groups) return;  // whole warps leave together
  const int64_t row = warp / groups, base = row * cols + (warp % groups) * group;
  const T* x = in + base;
  float d;
  if (row_amax) {
    d = quant::int8_scale(row_amax[row]);
  } else {
    const Candidate best = group_best(x, group, lane);
    const float signed_max = best.idx == kNoIndex ? 0.0f : to_f32(x[best.idx]);
    d = int8 ? quant::int8_scale(fabsf(signed_max)) : quant::int4_scale(signed_max);
  }
  const float inv_d = quant::inverse_or_zero(d);
  const uint16_t d_bits = quant::scale_to_f16_bits(d);
  for (int64_t j = lane; j < group; j += 32) {
    const float v = to_f32(x[j]);
    const int q = int8 ? quant::int8_code(v, inv_d) : quant::int4_code(v, inv_d);
    out[base + j] = from_f32<T>(quant::dequant(q, d_bits));
  }
}

// One warp per row: max |x| with NaN skipped (strict comparisons).
template <class T>
__global__ void row_absmax_kernel(float* amax, const T* in, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  float m = 0.0f;
  for (int64_t k = lane; k < cols; k += 32) m = fmaxf(m, fabsf(to_f32(in[row * cols + k])));
  for (int offset = 16; offset > 0; offset >>= 1)
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (lane == 0) amax[row] = m;
}

}  // namespace

void fake_quantize(Tensor out, Tensor in, quant::IntBits bits, int64_t group, Tensor row_amax,
                   ops::Stream stream) {
  constexpr const char* kOp = "fake_quantize";
  expect_compute_dtype(in, kOp, "in");
  expect_tensor(out, in.dtype, in.shape, kOp, "out");
  TS_CHECK(!overlaps(out, in) || out.data == in.data, "{}: out partially overlaps in", kOp);
  const quant::FakeQuantDims dims =
      quant::check_fake_quantize(in, bits, group, !row_amax.empty(), kOp);
  const int64_t rows = dims.rows, cols = dims.cols;
  TS_CHECK(group < kNoIndex, "{}: group {} too large", kOp, group);
  if (!row_amax.empty()) expect_tensor(row_amax, DType::f32, Shape{rows}, kOp, "row_amax");
  const int64_t warps = rows * (cols / group);
  if (warps == 0) return;
  dispatch_float(in, kOp, [&]<class T>() {
    fake_quantize_kernel<T>
        <<<ceil_div(warps, kWarpsPerBlock), kWarpsPerBlock * 32, 0, cuda_stream(stream)>>>(
            static_cast<T*>(out.data), static_cast<const T*>(in.data), rows, cols, group,
            bits == quant::IntBits::int8,
            row_amax.empty() ? nullptr : static_cast<const float*>(row_amax.data));
    TS_CUDA_CHECK_LAUNCH();
  });
}

void row_absmax(Tensor amax, Tensor in, ops::Stream stream) {
  constexpr const char* kOp = "row_absmax";
  expect_compute_dtype(in, kOp, "in");
  TS_CHECK(in.ndim() >= 1, "{}: in {} needs a last dim", kOp, in.str());
  const int64_t cols = in.dim(-1), rows = cols == 0 ? 0 : in.numel() / cols;
  expect_tensor(amax, DType::f32, Shape{rows}, kOp, "amax");
  if (rows == 0) return;
  dispatch_float(in, kOp, [&]<class T>() {
    row_absmax_kernel<T>
        <<<ceil_div(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, cuda_stream(stream)>>>(
            static_cast<float*>(amax.data), static_cast<const T*>(in.data), rows, cols);
    TS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tessera::cuda
