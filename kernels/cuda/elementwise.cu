// CUDA elementwise helpers: add_forward, add_inplace, scale_inplace, fill, cast, sum_squares.
// Arithmetic ops take f32, bf16 or f16 (computed in f32, rounded once; f16 overflow gives Inf,
// and sum_squares carries Inf/NaN through, which FP16 loss scaling uses to detect overflow). fill
// and cast also take fp8 e4m3/e5m2, converted bit for bit like core/dtype.h (round to nearest
// even; fp8 saturates).
// sum_squares is a two-pass reduction in double with a grid fixed by the size, so it is
// deterministic; it is the one op here that synchronizes (it returns a host value).
#include <cstring>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

// ---- kernels ---------------------------------------------------------------------------------

struct AddOp {
  __device__ void operator()(const float* x, float* y) const { y[0] = x[0] + x[1]; }
};
struct ScaleOp {
  float s;
  __device__ void operator()(const float* x, float* y) const { y[0] = x[0] * s; }
};

// Writes one bit pattern U into every element, 16 bytes per store where aligned.
template <class U, int kWidth>
__global__ void __launch_bounds__(kBlock) fill_kernel(U* x, int64_t n, U bits) {
  const int64_t num_packs = n / kWidth;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  Pack<U, kWidth> p;
#pragma unroll
  for (int j = 0; j < kWidth; ++j) p.v[j] = bits;
  for (int64_t i = first; i < num_packs; i += stride) store_pack<U, kWidth>(x + i * kWidth, p);
  if (kWidth > 1 && first < n - num_packs * kWidth) x[num_packs * kWidth + first] = bits;
}

// A narrow float format, as in core/dtype.cpp: codes are sign | magnitude, magnitudes ordered
// like their values, so rounding up past the largest mantissa carries into the exponent.
struct NarrowFormat {
  int mant_bits;
  int bias;
  uint32_t sign_bit;
  uint32_t max_finite;  // magnitude code of the largest finite value
  uint32_t overflow;    // non-saturated overflow: Inf, or NaN for E4M3
  uint32_t quiet_nan;   // code produced for NaN inputs
  bool has_inf;         // magnitude max_finite + 1 is Inf
  bool saturate;        // cast saturates fp8 (OCP "SAT"), never bf16/f16 (IEEE overflow to Inf)
};

template <DType kType>
struct Storage;
template <>
struct Storage<DType::f32> {
  using U = uint32_t;
};
template <>
struct Storage<DType::bf16> {
  using U = uint16_t;
};
template <>
struct Storage<DType::f16> {
  using U = uint16_t;
};
template <>
struct Storage<DType::e4m3> {
  using U = uint8_t;
};
template <>
struct Storage<DType::e5m2> {
  using U = uint8_t;
};

template <DType kType>
__host__ __device__ constexpr NarrowFormat narrow_format() {
  if constexpr (kType == DType::bf16) return {7, 127, 0x8000, 0x7F7F, 0x7F80, 0x7FC0, true, false};
  if constexpr (kType == DType::f16) return {10, 15, 0x8000, 0x7BFF, 0x7C00, 0x7E00, true, false};
  if constexpr (kType == DType::e4m3) return {3, 7, 0x80, 0x7E, 0x7F, 0x7F, false, true};
  return {2, 15, 0x80, 0x7B, 0x7C, 0x7E, true, true};  // e5m2
}

// f32 -> narrow code, round to nearest, ties to even, by integer arithmetic on the f32 bits.
template <DType kType>
__device__ __forceinline__ uint32_t encode_narrow(float x) {
  constexpr NarrowFormat f = narrow_format<kType>();
  const uint32_t bits = __float_as_uint(x);
  const uint32_t sign = (bits >> 31) ? f.sign_bit : 0u;
  const uint32_t exp_field = (bits >> 23) & 0xFF;
  const uint32_t frac = bits & 0x7FFFFF;
  if (exp_field == 0xFF) {
    if (frac != 0) return sign | f.quiet_nan;
    return sign | (f.saturate ? f.max_finite : f.overflow);
  }
  // |x| = sig * 2^lsb_exp with sig an integer of at most 24 bits.
  uint32_t sig = frac;
  int lsb_exp = -149;
  if (exp_field != 0) {
    sig |= 1u << 23;
    lsb_exp = static_cast<int>(exp_field) - 150;
  }
  if (sig == 0) return sign;
  constexpr int kEmin = 1 - f.bias;
  int exp = lsb_exp + (31 - __clz(sig));  // binade of |x|, clamped up to the smallest normal one
  if (exp < kEmin) exp = kEmin;
  const int shift = (exp - f.mant_bits) - lsb_exp;  // >= 23 - mant_bits > 0
  uint32_t n = 0;
  if (shift < 32) {  // else |x| < 2^24 * 2^lsb_exp <= half a quantum: rounds to zero
    n = sig >> shift;
    const uint32_t rem = sig & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (n & 1))) ++n;
  }
  const uint32_t code = (static_cast<uint32_t>(exp - kEmin) << f.mant_bits) + n;
  if (code > f.max_finite) return sign | (f.saturate ? f.max_finite : f.overflow);
  return sign | code;
}

// Narrow code -> f32 (every f16 and fp8 value is an f32 normal or zero); bf16 is a plain shift.
template <DType kType>
__device__ __forceinline__ float decode_narrow(uint32_t code) {
  if constexpr (kType == DType::bf16) return __uint_as_float(code << 16);
  constexpr NarrowFormat f = narrow_format<kType>();
  const uint32_t sign = (code & f.sign_bit) ? 0x80000000u : 0u;
  const uint32_t mag = code & (f.sign_bit - 1);
  if (f.has_inf && mag == f.max_finite + 1) return __uint_as_float(sign | 0x7F800000u);
  if (mag > f.max_finite) return __uint_as_float(sign | 0x7FC00000u);
  const uint32_t exp_field = mag >> f.mant_bits;
  const uint32_t mant = mag & ((1u << f.mant_bits) - 1);
  if (exp_field == 0) {
    if (mant == 0) return __uint_as_float(sign);
    const int top = 31 - __clz(mant);  // normalise: the leading one becomes f32's implicit bit
    const int exp = (1 - f.bias) - f.mant_bits + top;
    const uint32_t frac = (mant & ~(1u << top)) << (23 - top);
    return __uint_as_float(sign | (static_cast<uint32_t>(exp + 127) << 23) | frac);
  }
  const int exp = static_cast<int>(exp_field) - f.bias;
  return __uint_as_float(sign | (static_cast<uint32_t>(exp + 127) << 23) |
                         (mant << (23 - f.mant_bits)));
}

template <DType kType>
__device__ __forceinline__ float decode(typename Storage<kType>::U u) {
  if constexpr (kType == DType::f32)
    return __uint_as_float(u);
  else
    return decode_narrow<kType>(u);
}
template <DType kType>
__device__ __forceinline__ typename Storage<kType>::U encode(float x) {
  using U = typename Storage<kType>::U;
  if constexpr (kType == DType::f32)
    return __float_as_uint(x);
  else
    return static_cast<U>(encode_narrow<kType>(x));
}

// dst = src converted; every source value is exact in f32, so decode-then-encode rounds once.
template <DType kSrc, DType kDst, int kWidth>
__global__ void __launch_bounds__(kBlock)
    cast_kernel(const typename Storage<kSrc>::U* src, typename Storage<kDst>::U* dst, int64_t n) {
  using S = typename Storage<kSrc>::U;
  using D = typename Storage<kDst>::U;
  const int64_t num_packs = n / kWidth;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < num_packs; i += stride) {
    const Pack<S, kWidth> in = load_pack<S, kWidth>(src + i * kWidth);
    Pack<D, kWidth> out;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) out.v[j] = encode<kDst>(decode<kSrc>(in.v[j]));
    store_pack<D, kWidth>(dst + i * kWidth, out);
  }
  if (kWidth > 1 && first < n - num_packs * kWidth) {
    const int64_t i = num_packs * kWidth + first;
    dst[i] = encode<kDst>(decode<kSrc>(src[i]));
  }
}

// Block-wide sum in double (blockDim.x == kBlock); thread 0 holds the result. Fixed order.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_totals[kBlock / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kBlock / 32; ++w) total += warp_totals[w];
  return total;
}

// Pass 1: block b sums x^2 in double over a fixed, size-determined set of packs into partial[b].
template <class T, int kWidth>
__global__ void __launch_bounds__(kBlock)
    sum_squares_partial_kernel(double* partial, const T* x, int64_t n) {
  const int64_t num_packs = n / kWidth;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (int64_t i = first; i < num_packs; i += stride) {
    const Pack<T, kWidth> p = load_pack<T, kWidth>(x + i * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const double v = to_f32(p.v[j]);
      acc += v * v;
    }
  }
  if (kWidth > 1 && first < n - num_packs * kWidth) {
    const double v = to_f32(x[num_packs * kWidth + first]);
    acc += v * v;
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Pass 2: one block adds the partials in a fixed order.
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(double* out, const double* partial, int num_partials) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < num_partials; i += kBlock) acc += partial[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) *out = total;
}

// ---- launchers ------------------------------------------------------------------------------

bool is_castable(DType t) {
  return t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::e4m3 ||
         t == DType::e5m2;
}

template <DType kSrc, DType kDst>
void launch_cast(const Tensor& dst, const Tensor& src, cudaStream_t stream) {
  using S = typename Storage<kSrc>::U;
  using D = typename Storage<kDst>::U;
  constexpr int kWidth = 8;  // 8 elements: 8..32 bytes on each side
  const int64_t n = dst.numel();
  const auto* s = static_cast<const S*>(src.data);
  auto* d = static_cast<D*>(dst.data);
  if (is_aligned(s, sizeof(S) * kWidth) && is_aligned(d, sizeof(D) * kWidth)) {
    cast_kernel<kSrc, kDst, kWidth><<<grid_for(ceil_div(n, kWidth)), kBlock, 0, stream>>>(s, d, n);
  } else {
    cast_kernel<kSrc, kDst, 1><<<grid_for(n), kBlock, 0, stream>>>(s, d, n);
  }
  TS_CUDA_CHECK_LAUNCH();
}

// Runs f.template operator()<kType>() for the castable dtype t.
template <class F>
void dispatch_castable(DType t, F&& f) {
  switch (t) {
    case DType::f32: f.template operator()<DType::f32>(); return;
    case DType::bf16: f.template operator()<DType::bf16>(); return;
    case DType::f16: f.template operator()<DType::f16>(); return;
    case DType::e4m3: f.template operator()<DType::e4m3>(); return;
    case DType::e5m2: f.template operator()<DType::e5m2>(); return;
    default: TS_BUG("cast: dtype {} is not castable", dtype_name(t));
  }
}

template <class U>
void launch_fill(const Tensor& x, U bits, cudaStream_t stream) {
  constexpr int kWidth = kPackBytes / sizeof(U);
  const int64_t n = x.numel();
  auto* p = static_cast<U*>(x.data);
  if (is_aligned(p)) {
    fill_kernel<U, kWidth><<<grid_for(ceil_div(n, kWidth)), kBlock, 0, stream>>>(p, n, bits);
  } else {
    fill_kernel<U, 1><<<grid_for(n), kBlock, 0, stream>>>(p, n, bits);
  }
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void add_forward(Tensor out, Tensor a, Tensor b, ops::Stream stream) {
  constexpr const char* kOp = "add_forward";
  expect_compute_dtype(out, kOp, "out");
  expect_tensor(a, out.dtype, out.shape, kOp, "a");
  expect_tensor(b, out.dtype, out.shape, kOp, "b");
  TS_CHECK(!overlaps(out, a) || out.data == a.data, "{}: out partially overlaps a", kOp);
  TS_CHECK(!overlaps(out, b) || out.data == b.data, "{}: out partially overlaps b", kOp);
  dispatch_float(out, kOp, [&]<class T>() {
    MapArgs<T, 2, 1> args;
    args.in[0] = static_cast<const T*>(a.data);
    args.in[1] = static_cast<const T*>(b.data);
    args.out[0] = static_cast<T*>(out.data);
    launch_map(args, out.numel(), AddOp{}, cuda_stream(stream));
  });
}

void add_inplace(Tensor dst, Tensor src, ops::Stream stream) {
  constexpr const char* kOp = "add_inplace";
  expect_compute_dtype(dst, kOp, "dst");
  expect_tensor(src, dst.dtype, dst.shape, kOp, "src");
  TS_CHECK(!overlaps(dst, src) || dst.data == src.data, "{}: dst partially overlaps src", kOp);
  dispatch_float(dst, kOp, [&]<class T>() {
    MapArgs<T, 2, 1> args;
    args.in[0] = static_cast<const T*>(dst.data);
    args.in[1] = static_cast<const T*>(src.data);
    args.out[0] = static_cast<T*>(dst.data);
    launch_map(args, dst.numel(), AddOp{}, cuda_stream(stream));
  });
}

void scale_inplace(Tensor x, float s, ops::Stream stream) {
  constexpr const char* kOp = "scale_inplace";
  expect_compute_dtype(x, kOp, "x");
  dispatch_float(x, kOp, [&]<class T>() {
    MapArgs<T, 1, 1> args;
    args.in[0] = static_cast<const T*>(x.data);
    args.out[0] = static_cast<T*>(x.data);
    launch_map(args, x.numel(), ScaleOp{s}, cuda_stream(stream));
  });
}

void fill(Tensor x, float value, ops::Stream stream) {
  constexpr const char* kOp = "fill";
  TS_CHECK(!x.empty() && x.device == Device::cuda, "{}: x must be a cuda tensor, got {}", kOp,
           x.str());
  TS_CHECK(is_castable(x.dtype), "{}: x is {}; fill on cuda takes f32, bf16, f16, e4m3 or e5m2",
           kOp, x.str());
  if (x.numel() == 0) return;
  // The value is converted once on the host (exactly as the CPU backend does), then replicated.
  uint32_t bits = 0;
  convert_buffer(&value, DType::f32, &bits, x.dtype, 1);
  switch (dtype_size(x.dtype)) {
    case 4: launch_fill<uint32_t>(x, bits, cuda_stream(stream)); break;
    case 2: launch_fill<uint16_t>(x, static_cast<uint16_t>(bits), cuda_stream(stream)); break;
    default: launch_fill<uint8_t>(x, static_cast<uint8_t>(bits), cuda_stream(stream)); break;
  }
}

void cast(Tensor dst, Tensor src, ops::Stream stream) {
  constexpr const char* kOp = "cast";
  TS_CHECK(!dst.empty() && dst.device == Device::cuda, "{}: dst must be a cuda tensor, got {}", kOp,
           dst.str());
  TS_CHECK(!src.empty() && src.device == Device::cuda, "{}: src must be a cuda tensor, got {}", kOp,
           src.str());
  TS_CHECK(is_castable(dst.dtype) && is_castable(src.dtype),
           "{}: {} -> {}: cast on cuda takes f32, bf16, f16, e4m3 or e5m2", kOp, src.str(),
           dst.str());
  TS_CHECK(src.shape == dst.shape, "{}: src has shape {}, expected {}", kOp, src.shape.str(),
           dst.shape.str());
  if (dst.data == src.data && dst.dtype == src.dtype) return;
  TS_CHECK(!overlaps(dst, src), "{}: dst overlaps src without being the same tensor", kOp);
  if (dst.numel() == 0) return;
  if (dst.dtype == src.dtype) {
    TS_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, dst.nbytes(), cudaMemcpyDeviceToDevice,
                                  cuda_stream(stream)));
    return;
  }
  dispatch_castable(src.dtype, [&]<DType kSrc>() {
    dispatch_castable(
        dst.dtype, [&]<DType kDst>() { launch_cast<kSrc, kDst>(dst, src, cuda_stream(stream)); });
  });
}

double sum_squares(Tensor x, ops::Stream stream) {
  constexpr const char* kOp = "sum_squares";
  expect_compute_dtype(x, kOp, "x");
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  // The partition depends only on n (and alignment), never on the device: deterministic sums.
  constexpr int kMaxPartials = 1024;
  constexpr int64_t kElementsPerThread = 32;
  const int num_blocks =
      static_cast<int>(std::min<int64_t>(kMaxPartials, ceil_div(n, kBlock * kElementsPerThread)));
  Context& ctx = context();
  TS_CHECK(ctx.workspace_bytes >= (kMaxPartials + 1) * sizeof(double), "{}: workspace too small",
           kOp);
  auto* partial = static_cast<double*>(ctx.workspace);
  double* result = partial + kMaxPartials;
  dispatch_float(x, kOp, [&]<class T>() {
    const auto* p = static_cast<const T*>(x.data);
    if (is_aligned(p)) {
      sum_squares_partial_kernel<T, kVecWidth<T>>
          <<<num_blocks, kBlock, 0, cuda_stream(stream)>>>(partial, p, n);
    } else {
      sum_squares_partial_kernel<T, 1>
          <<<num_blocks, kBlock, 0, cuda_stream(stream)>>>(partial, p, n);
    }
    TS_CUDA_CHECK_LAUNCH();
  });
  sum_partials_kernel<<<1, kBlock, 0, cuda_stream(stream)>>>(result, partial, num_blocks);
  TS_CUDA_CHECK_LAUNCH();
  double host = 0.0;
  TS_CUDA_CHECK(
      cudaMemcpyAsync(&host, result, sizeof(double), cudaMemcpyDeviceToHost, cuda_stream(stream)));
  TS_CUDA_CHECK(cudaStreamSynchronize(cuda_stream(stream)));
  return host;
}

}  // namespace tessera::cuda
