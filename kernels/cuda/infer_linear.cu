// CUDA linear of the inference engine (kernels/ops_infer.h): out = inp · w^T + bias for INT8/INT4
// weights with f16 group scales, or float weights, f32 accumulation. One kernel for every M, so
// the engine's outputs are batch-invariant: a warp owns kN weight rows n; lane l walks the 16-byte
// chunks c = l, l + 32, ... of each row (4 f32, 8 bf16/f16, 16 int8 or 32 int4 elements), decodes
// them in registers, and adds w * x for each element in k order with one f32 FMA into its own
// accumulator; the 32 lane sums are then combined by a fixed butterfly. That order depends on K
// alone: not on M, the rows per pass, the rows per warp, the grid, or whether chunks arrive as
// 16-byte loads or byte by byte (unaligned rows). Input rows go in passes of up to kMaxRows per
// weight load, so decode (M <= 8) reads every weight byte once; larger M reads it once per pass.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/infer.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/infer_checks.h"
#include "kernels/quant_math.h"

namespace tessera::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block, each owning kN weight rows
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 8;  // input rows per pass (one weight read serves all of them)

enum class WKind { f32, bf16, f16, i8, i4 };

// Elements per 16-byte chunk, and chunks per lane per K tile (bounds the registers that hold the
// tile's weight chunks, issued before the activations are staged so both loads overlap).
template <WKind W>
constexpr int kElems = W == WKind::f32  ? 4
                       : W == WKind::i8 ? 16
                       : W == WKind::i4 ? 32
                                        : 8;
template <WKind W>
constexpr int kChunksPerLane = W == WKind::i4   ? 2
                               : W == WKind::i8 ? 4
                                                : 8;
template <WKind W>
constexpr int kTileChunks = 32 * kChunksPerLane<W>;
template <WKind W>
constexpr int kTileK = kTileChunks<W>* kElems<W>;  // 2048, or 1024 for f32

struct LinearArgs {
  const unsigned char* w;  // (N, row_bytes)
  const uint16_t* scales;  // (N, G) f16 bits, or null
  const void* inp;         // (M, K)
  const void* bias;        // (N) or null
  void* out;               // (M, N)
  int64_t num_m, num_n, num_k, row_bytes, group, num_groups;
  bool vector_loads;  // every row starts 16-byte aligned and holds whole chunks
  bool chunk_scale;   // group % kElems == 0: a chunk lies in one group
};

// Element e of a 16-byte chunk (4 little-endian words) as an exact f32: the float weight's value
// or the integer code. Integer codes go through the float bit pattern 2^23 + (code + bias), which
// is exact and needs no int-to-float conversion.
template <WKind W>
__device__ __forceinline__ float decode(const uint32_t (&c)[4], int e) {
  if constexpr (W == WKind::f32) {
    return __uint_as_float(c[e]);
  } else if constexpr (W == WKind::bf16) {
    return __uint_as_float(e % 2 == 0 ? c[e / 2] << 16 : c[e / 2] & 0xFFFF0000u);
  } else if constexpr (W == WKind::f16) {
    const uint32_t bits = e % 2 == 0 ? c[e / 2] & 0xFFFFu : c[e / 2] >> 16;
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else if constexpr (W == WKind::i8) {
    const uint32_t biased = ((c[e / 4] >> (8 * (e % 4))) & 0xFFu) ^ 0x80u;  // code + 128
    return __fsub_rn(__uint_as_float(0x4B000000u | biased), 8388736.0f);
  } else {
    const uint32_t biased = ((c[e / 8] >> (4 * (e % 8))) & 0xFu) ^ 0x8u;  // code + 8
    return __fsub_rn(__uint_as_float(0x4B000000u | biased), 8388616.0f);
  }
}

// Chunk c of weight row n (zeros past the row's end, so a partial last chunk adds nothing).
__device__ __forceinline__ void load_chunk(const LinearArgs& a, int64_t n, int64_t c,
                                           uint32_t (&dst)[4]) {
  const unsigned char* p = a.w + n * a.row_bytes + c * 16;
  if (a.vector_loads) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
    return;
  }
  const int64_t valid = a.row_bytes - c * 16;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (4 * q + b < valid) word |= uint32_t(__ldg(p + 4 * q + b)) << (8 * b);
    dst[q] = word;
  }
}

// Position of tile element k (chunk k / E, element k % E) in the staged activations: lane l's
// float4 number q of its chunk slot j sits at ((j * E/4 + q) * 32 + l) * 4, so the 32 lanes of a
// warp read 32 consecutive float4s (no bank conflicts).
template <WKind W>
__device__ __forceinline__ int staged_index(int k) {
  constexpr int E = kElems<W>;
  const int chunk = k / E, e = k % E;
  return (((chunk / 32) * (E / 4) + e / 4) * 32 + chunk % 32) * 4 + e % 4;
}

template <WKind W, class TA, int kRows, int kN>
__global__ void __launch_bounds__(kThreads) infer_linear_kernel(LinearArgs a) {
  constexpr int E = kElems<W>, J = kChunksPerLane<W>, TK = kTileK<W>;
  extern __shared__ float4 staged4[];
  float* staged = reinterpret_cast<float*>(staged4);  // (kRows, TK) this tile's activations
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + warp) * kN;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  const int rows = static_cast<int>(min(int64_t(kRows), a.num_m - m0));
  const int64_t num_chunks = (a.num_k + E - 1) / E;
  const TA* inp = static_cast<const TA*>(a.inp);

  float acc[kRows][kN];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[r][i] = 0.0f;

  for (int64_t tile = 0; tile < num_chunks; tile += kTileChunks<W>) {
    // This tile's weight chunks, in flight while the activations are staged.
    uint32_t wc[kN][J][4];
#pragma unroll
    for (int i = 0; i < kN; ++i)
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t c = tile + j * 32 + lane;
        if (n0 + i < a.num_n && c < num_chunks)
          load_chunk(a, n0 + i, c, wc[i][j]);
        else
          wc[i][j][0] = wc[i][j][1] = wc[i][j][2] = wc[i][j][3] = 0;
      }
    __syncthreads();  // the previous tile's readers are done with `staged`
    const int64_t k0 = tile * E;
    for (int t = threadIdx.x; t < kRows * TK; t += kThreads) {
      const int r = t / TK, kk = t % TK;
      const int64_t k = k0 + kk;
      const float x = r < rows && k < a.num_k ? to_f32(inp[(m0 + r) * a.num_k + k]) : 0.0f;
      staged[r * TK + staged_index<W>(kk)] = x;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c = tile + j * 32 + lane;
      if (c >= num_chunks) break;
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const int64_t n = n0 + i;
        if (n >= a.num_n) break;
        float w[E];
#pragma unroll
        for (int e = 0; e < E; ++e) w[e] = decode<W>(wc[i][j], e);
        if constexpr (W == WKind::i8 || W == WKind::i4) {
          const uint16_t* s = a.scales + n * a.num_groups;
          if (a.chunk_scale) {
            const float d = quant::f16_bits_to_scale(s[c * E / a.group]);
#pragma unroll
            for (int e = 0; e < E; ++e) w[e] = __fmul_rn(w[e], d);
          } else {
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const int64_t k = c * E + e;
              w[e] = k < a.num_k ? __fmul_rn(w[e], quant::f16_bits_to_scale(s[k / a.group])) : 0.f;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < rows) {
            const float4* x4 = reinterpret_cast<const float4*>(staged + r * TK) + j * (E / 4) * 32;
#pragma unroll
            for (int q = 0; q < E / 4; ++q) {
              const float4 x = x4[q * 32 + lane];
              acc[r][i] = __fmaf_rn(w[4 * q + 0], x.x, acc[r][i]);
              acc[r][i] = __fmaf_rn(w[4 * q + 1], x.y, acc[r][i]);
              acc[r][i] = __fmaf_rn(w[4 * q + 2], x.z, acc[r][i]);
              acc[r][i] = __fmaf_rn(w[4 * q + 3], x.w, acc[r][i]);
            }
          }
        }
      }
    }
  }

  const TA* bias = static_cast<const TA*>(a.bias);
  TA* out = static_cast<TA*>(a.out);
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float total = warp_sum(acc[r][i]);  // every lane: the same, order-fixed sum
      const int64_t n = n0 + i;
      if (r < rows && n < a.num_n && lane == (r * kN + i) % 32)
        out[(m0 + r) * a.num_n + n] =
            from_f32<TA>(bias ? __fadd_rn(total, to_f32(bias[n])) : total);
    }
}

template <WKind W, class TA, int kRows, int kN>
void launch(const LinearArgs& a, cudaStream_t stream) {
  const size_t smem = size_t(kRows) * kTileK<W> * sizeof(float);
  auto kernel = infer_linear_kernel<W, TA, kRows, kN>;
  if (smem > 48 * 1024)
    TS_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(static_cast<unsigned>(ceil_div(a.num_n, int64_t(kWarps) * kN)),
                  static_cast<unsigned>(ceil_div(a.num_m, kRows)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  TS_CUDA_CHECK_LAUNCH();
}

// Rows per pass and weight rows per warp change only which thread computes an output, never its
// arithmetic: one row alone (decode at batch 1) gets the smallest block; two weight rows per warp
// once there are enough rows to fill the GPU four times over with them.
template <WKind W, class TA>
void launch(const LinearArgs& a, cudaStream_t stream) {
  const bool two_per_warp = a.num_n >= int64_t(4) * std::max(context().num_sms, 1) * kWarps * 2;
  if (a.num_m == 1)
    two_per_warp ? launch<W, TA, 1, 2>(a, stream) : launch<W, TA, 1, 1>(a, stream);
  else
    two_per_warp ? launch<W, TA, kMaxRows, 2>(a, stream) : launch<W, TA, kMaxRows, 1>(a, stream);
}

}  // namespace

void infer_linear_forward(Tensor out, Tensor inp, const ops::InferWeight& w, Tensor bias,
                          ops::Stream stream) {
  constexpr const char* kOp = "infer_linear_forward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() == 2 && inp.dim(0) >= 1, "{}: inp must be (M,K) with M >= 1, got {}", kOp,
           inp.str());
  const int64_t num_m = inp.dim(0), num_k = inp.dim(1);
  expect_cuda(w.w, "infer_linear_forward: w.w");
  const int64_t num_n = ops::check_infer_weight(w, num_k, inp.dtype, kOp);
  expect_tensor(out, inp.dtype, {num_m, num_n}, kOp, "out");
  if (!bias.empty()) expect_tensor(bias, inp.dtype, {num_n}, kOp, "bias");
  TS_CHECK(!overlaps(out, inp) && !overlaps(out, w.w) && !overlaps(out, bias),
           "{}: out overlaps an input", kOp);
  TS_CHECK(num_m <= int64_t(65535) * kMaxRows, "{}: M = {} rows exceed one launch", kOp, num_m);
  LinearArgs a{};
  a.w = static_cast<const unsigned char*>(w.w.data);
  a.inp = inp.data;
  a.bias = bias.empty() ? nullptr : bias.data;
  a.out = out.data;
  a.num_m = num_m, a.num_n = num_n, a.num_k = num_k;
  a.row_bytes = int64_t(dtype_storage_bytes(w.w.dtype, num_k));
  a.vector_loads = a.row_bytes % 16 == 0 && is_aligned(w.w.data);
  if (w.quantized()) {
    a.scales = static_cast<const uint16_t*>(w.scales.data);
    a.group = w.group, a.num_groups = num_k / w.group;
    a.chunk_scale = w.group % (w.w.dtype == DType::i8 ? kElems<WKind::i8> : kElems<WKind::i4>) == 0;
  }
  if (num_n == 0) return;
  const cudaStream_t s = cuda_stream(stream);
  dispatch_float(inp, kOp, [&]<class TA>() {
    if (w.w.dtype == DType::i8)
      launch<WKind::i8, TA>(a, s);
    else if (w.w.dtype == DType::i4)
      launch<WKind::i4, TA>(a, s);
    else if constexpr (std::is_same_v<TA, float>)  // a float weight has inp's dtype (checked)
      launch<WKind::f32, TA>(a, s);
    else if constexpr (std::is_same_v<TA, __nv_bfloat16>)
      launch<WKind::bf16, TA>(a, s);
    else
      launch<WKind::f16, TA>(a, s);
  });
}

}  // namespace tessera::cuda
