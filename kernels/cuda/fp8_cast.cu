// fp8_quantize and swiglu_backward_fp8 on CUDA (kernels/ops_fp8.h): one pass that computes its
// values (the input itself, or SwiGLU's two gradients rounded to the inputs' dtype), scales,
// converts to E4M3/E5M2 with the sm_89+ cvt.rn.satfinite instruction, writes the row-major result
// and, optionally, its transpose (staged through a shared-memory tile so both stores stay
// contiguous), and max-accumulates each output's amax. CPU references: kernels/cpu/fp8.cpp
// (bit-exact; tests/cuda/fp8_test.cpp).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fp8.h"
#include "kernels/cuda/swiglu_op.cuh"
#include "kernels/ops_fp8_checks.h"

namespace tessera::cuda {

namespace {

// A 64x64 tile of the input per step of a block; blocks stride over the tiles (a grid of as many
// blocks as fit on the SMs at once), so the amax is one atomic per block rather than per tile.
// kVec consecutive elements per thread: 8 (16-byte bf16 loads, 8-byte stores) when the row
// length, the row count and the pointers allow it (every model width), else 4, else 1 (any
// shape). A thread issues the loads of all its rows of a tile before converting any, so each has
// 2 (kVec 8) to 16 (kVec 1) loads per input in flight: a quantization is a pure stream and HBM
// needs many bytes in flight per SM to reach its bandwidth.
constexpr int kTile = 64;
constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps per block");

// Saturating RNE conversion; NaN -> kNanCode whatever the hardware writes (ops_fp8.h).
template <bool kE4M3>
__device__ __forceinline__ uint8_t encode(float v) {
  if (isnan(v)) return fp8::kNanCode;
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kE4M3 ? __NV_E4M3 : __NV_E5M2);
}

// amax keys: |x| as an int (non-negative floats order like ints; every NaN becomes kNanKey,
// above +Inf), so the block maximum and the atomicMax on the stored float's bits are exact and
// order-independent.
__device__ __forceinline__ int abs_key(float x) {
  const int k = __float_as_int(x) & 0x7FFFFFFF;
  return k > 0x7F800000 ? int(fp8::kNanKey) : k;
}

// kVec elements moved as one access (at most 16 bytes wide, which is what the loads need).
template <class T, int kVec>
struct alignas(kVec * sizeof(T) < 16 ? kVec * sizeof(T) : 16) Vec {
  T v[kVec];
};
template <int kVec>
constexpr int kWords = kVec >= 4 ? kVec / 4 : 1;  // 32-bit words of kVec packed codes

// What a pass quantizes: kIn inputs of (rows, cols) mapped elementwise by Op to kOut values, each
// with its codes, optional transposed codes, amax key and scale.
template <class T, int kIn, int kOut>
struct QuantizeArgs {
  const T* in[kIn];
  uint8_t* out[kOut];
  uint8_t* out_t[kOut];  // all null without the transpose
  int* amax_key[kOut];
  const float* scale[kOut];
};

// fp8_quantize's map: the input itself (already a value of T, so no rounding step).
struct IdentityOp {
  __device__ void operator()(const float* x, float* y) const { y[0] = x[0]; }
};

template <class T, int kVec, int kIn, int kOut, class Op, bool kE4M3, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(QuantizeArgs<T, kIn, kOut> a, Op op, int64_t rows, int64_t cols,
                    int64_t tiles_c, int64_t num_tiles) {
  constexpr int kLanes = kTile / kVec;             // threads across a tile row
  constexpr int kRowsPerPass = kThreads / kLanes;  // tile rows per pass
  constexpr int kPasses = kTile / kRowsPerPass;    // passes per tile
  static_assert(kPasses * kRowsPerPass == kTile, "whole passes per tile");
  // Codes of the current tile per output, (tile rows, tile cols); the row pitch of 68 bytes (17
  // words, odd) spreads the column reads of the transposed store over the banks.
  __shared__ alignas(4) uint8_t tile[kTranspose ? kOut : 1][kTile][kTile + 4];
  __shared__ int warp_max[kOut][kThreads / 32];
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  float s[kOut];
  int key[kOut];
#pragma unroll
  for (int o = 0; o < kOut; ++o) s[o] = *a.scale[o], key[o] = 0;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t r0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    const int64_t c = c0 + int64_t(tx) * kVec;
    Vec<T, kVec> x[kPasses][kIn];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t r = r0 + ty + p * kRowsPerPass;
      // kVec > 1: cols % kVec == 0, so all kVec are in when the first is
      if (r < rows && c < cols) {
#pragma unroll
        for (int k = 0; k < kIn; ++k)
          x[p][k] = *reinterpret_cast<const Vec<T, kVec>*>(a.in[k] + r * cols + c);
      }
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int i = ty + p * kRowsPerPass;
      const int64_t r = r0 + i;
      if (r >= rows || c >= cols) continue;
      uint32_t words[kOut][kWords<kVec>] = {};
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        float xin[kIn], y[kOut];
#pragma unroll
        for (int k = 0; k < kIn; ++k) xin[k] = to_f32(x[p][k].v[q]);
        op(xin, y);
#pragma unroll
        for (int o = 0; o < kOut; ++o) {
          // The value the unfused op would store: rounded to T (a no-op for the identity).
          const float v = std::is_same_v<Op, IdentityOp> ? y[o] : to_f32(from_f32<T>(y[o]));
          key[o] = max(key[o], abs_key(v));
          words[o][q / 4] |= uint32_t(encode<kE4M3>(__fmul_rn(v, s[o]))) << (8 * (q % 4));
        }
      }
#pragma unroll
      for (int o = 0; o < kOut; ++o) {
        if constexpr (kVec >= 4) {
          Vec<uint32_t, kWords<kVec>> w;
#pragma unroll
          for (int k = 0; k < kWords<kVec>; ++k) w.v[k] = words[o][k];
          *reinterpret_cast<Vec<uint32_t, kWords<kVec>>*>(a.out[o] + r * cols + c) = w;
          if constexpr (kTranspose) {
#pragma unroll
            for (int k = 0; k < kWords<kVec>; ++k)
              *reinterpret_cast<uint32_t*>(&tile[o][i][tx * kVec + 4 * k]) = words[o][k];
          }
        } else {
          a.out[o][r * cols + c] = uint8_t(words[o][0]);
          if constexpr (kTranspose) tile[o][i][tx] = uint8_t(words[o][0]);
        }
      }
    }
    if constexpr (kTranspose) {
      __syncthreads();  // the tiles are complete
      // out_t (C,R): row c0 + j holds tile column j; each thread stores kVec consecutive rows.
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int j = ty + p * kRowsPerPass;
        const int64_t ct = c0 + j, rt = r0 + int64_t(tx) * kVec;
        if (ct >= cols || rt >= rows) continue;  // kVec > 1: rows % kVec == 0
#pragma unroll
        for (int o = 0; o < kOut; ++o) {
          if constexpr (kVec >= 4) {
            Vec<uint32_t, kWords<kVec>> w;
#pragma unroll
            for (int k = 0; k < kWords<kVec>; ++k) {
              const int i = tx * kVec + 4 * k;
              w.v[k] = uint32_t(tile[o][i][j]) | uint32_t(tile[o][i + 1][j]) << 8 |
                       uint32_t(tile[o][i + 2][j]) << 16 | uint32_t(tile[o][i + 3][j]) << 24;
            }
            *reinterpret_cast<Vec<uint32_t, kWords<kVec>>*>(a.out_t[o] + ct * rows + rt) = w;
          } else {
            a.out_t[o][ct * rows + rt] = tile[o][tx][j];
          }
        }
      }
      __syncthreads();  // before the next tile overwrites them
    }
  }
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    const int k = __reduce_max_sync(0xFFFFFFFFu, key[o]);
    if (threadIdx.x % 32 == 0) warp_max[o][threadIdx.x / 32] = k;
  }
  __syncthreads();
  if (threadIdx.x < kOut) {
    const int o = threadIdx.x;
    int m = warp_max[o][0];
    for (int w = 1; w < kThreads / 32; ++w) m = max(m, warp_max[o][w]);
    atomicMax(a.amax_key[o], m);
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <int kVec, bool kE4M3, bool kTranspose, class T, int kIn, int kOut, class Op>
void launch_vec(const QuantizeArgs<T, kIn, kOut>& a, Op op, int64_t rows, int64_t cols,
                cudaStream_t stream) {
  const auto kernel = quantize_kernel<T, kVec, kIn, kOut, Op, kE4M3, kTranspose>;
  static const int per_sm = [&] {  // resident blocks per SM, once per instantiation
    int n = 0;
    TS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return std::max(n, 1);
  }();
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t num_tiles = ((rows + kTile - 1) / kTile) * tiles_c;
  const int64_t blocks = std::min<int64_t>(num_tiles, int64_t(context().num_sms) * per_sm);
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a, op, rows, cols, tiles_c, num_tiles);
  TS_CUDA_CHECK_LAUNCH();
}

// The widest kVec the shape and every pointer allow: each row of every input and output (and,
// with the transpose, of every out_t) must start kVec-element aligned.
template <bool kE4M3, bool kTranspose, class T, int kIn, int kOut, class Op>
void launch_widest(const QuantizeArgs<T, kIn, kOut>& a, Op op, int64_t rows, int64_t cols,
                   cudaStream_t stream) {
  const auto fits = [&](int v) {
    bool ok = cols % v == 0 && (!kTranspose || rows % v == 0);
    for (int k = 0; k < kIn; ++k)
      ok = ok && aligned_to(a.in[k], std::min<size_t>(v * sizeof(T), 16));
    for (int o = 0; o < kOut; ++o)
      ok = ok && aligned_to(a.out[o], v) && (!kTranspose || aligned_to(a.out_t[o], v));
    return ok;
  };
  if (fits(8))
    launch_vec<8, kE4M3, kTranspose>(a, op, rows, cols, stream);
  else if (fits(4))
    launch_vec<4, kE4M3, kTranspose>(a, op, rows, cols, stream);
  else
    launch_vec<1, kE4M3, kTranspose>(a, op, rows, cols, stream);
}

template <class T, int kIn, int kOut, class Op>
void launch(const QuantizeArgs<T, kIn, kOut>& a, Op op, bool e4m3, bool transpose, int64_t rows,
            int64_t cols, cudaStream_t stream) {
  if (e4m3 && transpose)
    launch_widest<true, true>(a, op, rows, cols, stream);
  else if (e4m3)
    launch_widest<true, false>(a, op, rows, cols, stream);
  else if (transpose)
    launch_widest<false, true>(a, op, rows, cols, stream);
  else
    launch_widest<false, false>(a, op, rows, cols, stream);
}

// Fills output o of `a` from a quantize operand set.
template <class T, int kIn, int kOut>
void set_target(QuantizeArgs<T, kIn, kOut>& a, int o, const Tensor& out, const Tensor& out_t,
                const Tensor& amax, const Tensor& scale) {
  a.out[o] = static_cast<uint8_t*>(out.data);
  a.out_t[o] = out_t.empty() ? nullptr : static_cast<uint8_t*>(out_t.data);
  a.amax_key[o] = static_cast<int*>(amax.data);
  a.scale[o] = static_cast<const float*>(scale.data);
}

// Runs fn.template operator()<T>() for the input dtype (f32, bf16 or f16).
template <class F>
void dispatch_input(DType dtype, const char* op, F&& fn) {
  switch (dtype) {
    case DType::f32: fn.template operator()<float>(); break;
    case DType::bf16: fn.template operator()<__nv_bfloat16>(); break;
    case DType::f16: fn.template operator()<__half>(); break;
    default: TS_BUG("{}: input dtype {}", op, dtype_name(dtype));
  }
}

}  // namespace

void fp8_quantize(Tensor out, Tensor out_t, Tensor amax, Tensor in, Tensor scale,
                  ops::Stream stream) {
  const fp8::QuantizeDims d =
      fp8::check_quantize(out, out_t, amax, in, scale, Device::cuda, "fp8_quantize");
  if (d.rows == 0 || d.cols == 0) return;
  dispatch_input(in.dtype, "fp8_quantize", [&]<class T>() {
    QuantizeArgs<T, 1, 1> a{};
    a.in[0] = static_cast<const T*>(in.data);
    set_target(a, 0, out, out_t, amax, scale);
    launch(a, IdentityOp{}, out.dtype == DType::e4m3, !out_t.empty(), d.rows, d.cols,
           cuda_stream(stream));
  });
}

void swiglu_backward_fp8(Tensor dgate8, Tensor dgate8_t, Tensor dup8, Tensor dup8_t,
                         Tensor amax_gate, Tensor amax_up, Tensor dout, Tensor gate, Tensor up,
                         Tensor scale_gate, Tensor scale_up, ops::Stream stream) {
  constexpr const char* kOp = "swiglu_backward_fp8";
  const fp8::QuantizeDims d =
      fp8::check_swiglu_backward(dgate8, dgate8_t, dup8, dup8_t, amax_gate, amax_up, dout, gate, up,
                                 scale_gate, scale_up, Device::cuda, kOp);
  if (d.rows == 0 || d.cols == 0) return;
  dispatch_input(dout.dtype, kOp, [&]<class T>() {
    QuantizeArgs<T, 3, 2> a{};
    a.in[0] = static_cast<const T*>(dout.data);  // SwigluBackwardOp's order: dout, gate, up
    a.in[1] = static_cast<const T*>(gate.data);
    a.in[2] = static_cast<const T*>(up.data);
    set_target(a, 0, dgate8, dgate8_t, amax_gate, scale_gate);
    set_target(a, 1, dup8, dup8_t, amax_up, scale_up);
    launch(a, SwigluBackwardOp{}, dgate8.dtype == DType::e4m3, !dgate8_t.empty(), d.rows, d.cols,
           cuda_stream(stream));
  });
}

}  // namespace tessera::cuda
