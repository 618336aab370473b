// CPU elementwise helpers: add_forward, add_inplace, scale_inplace, fill, cast, sum_squares.
// Any shape; arithmetic ops take f32 or f64, fill and cast also the narrow float types (bf16, f16,
// fp8 e4m3/e5m2, stored as bit patterns and converted by core/dtype.h's convert_buffer, which
// rounds once from the exact value and saturates fp8). sum_squares adds fixed chunks in a fixed
// order, so its result does not depend on the thread count.
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

namespace {

bool is_castable(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16 ||
         t == DType::e4m3 || t == DType::e5m2;
}

}  // namespace

void add_forward(Tensor out, Tensor a, Tensor b) {
  constexpr const char* kOp = "add_forward";
  check_compute_dtype(out, kOp, "out");
  check_like(a, out.dtype, out.shape, kOp, "a");
  check_like(b, out.dtype, out.shape, kOp, "b");
  const int64_t n = out.numel();
  dispatch_float(out.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* x = a.ptr<T>();
    const T* y = b.ptr<T>();
    T* o = out.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
  });
}

void add_inplace(Tensor dst, Tensor src) {
  constexpr const char* kOp = "add_inplace";
  check_compute_dtype(dst, kOp, "dst");
  check_like(src, dst.dtype, dst.shape, kOp, "src");
  const int64_t n = dst.numel();
  dispatch_float(dst.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* s = src.ptr<T>();
    T* d = dst.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  });
}

void scale_inplace(Tensor x, float s) {
  constexpr const char* kOp = "scale_inplace";
  check_compute_dtype(x, kOp, "x");
  const int64_t n = x.numel();
  dispatch_float(x.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    T* p = x.ptr<T>();
    const T scale = static_cast<T>(s);
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t i = 0; i < n; ++i) p[i] *= scale;
  });
}

void fill(Tensor x, float value) {
  constexpr const char* kOp = "fill";
  check_host(x, kOp, "x");
  TS_CHECK(is_castable(x.dtype), "{}: x is {}; fill takes f32, f64, bf16, f16, e4m3 or e5m2", kOp,
           x.str());
  const int64_t n = x.numel();
  if (n == 0) return;
  convert_buffer(&value, DType::f32, x.data, x.dtype, 1);  // convert once, then replicate the bits
  const size_t elem = dtype_size(x.dtype);
  auto* base = static_cast<char*>(x.data);
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
  for (int64_t i = 1; i < n; ++i) std::memcpy(base + i * elem, base, elem);
}

void cast(Tensor dst, Tensor src) {
  constexpr const char* kOp = "cast";
  check_host(dst, kOp, "dst");
  check_host(src, kOp, "src");
  TS_CHECK(is_castable(dst.dtype) && is_castable(src.dtype),
           "{}: {} -> {}: cast takes f32, f64, bf16, f16, e4m3 or e5m2", kOp, src.str(), dst.str());
  check_shape(src, dst.shape, kOp, "src");
  const int64_t n = dst.numel();
  if (dst.data == src.data && dst.dtype == src.dtype) return;
  TS_CHECK(!overlaps(dst, src), "{}: dst overlaps src without being the same tensor", kOp);
  convert_buffer(src.data, src.dtype, dst.data, dst.dtype, n);
}

double sum_squares(Tensor x) {
  constexpr const char* kOp = "sum_squares";
  check_compute_dtype(x, kOp, "x");
  // Chunk sums are independent of the thread count; they are then added in chunk order.
  constexpr int64_t kChunk = 4096;
  const int64_t n = x.numel();
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(num_chunks, 0.0);
  dispatch_float(x.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* p = x.ptr<T>();
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
    for (int64_t chunk_idx = 0; chunk_idx < num_chunks; ++chunk_idx) {
      const int64_t end = std::min(n, (chunk_idx + 1) * kChunk);
      double sum = 0.0;
      for (int64_t i = chunk_idx * kChunk; i < end; ++i) sum += double(p[i]) * double(p[i]);
      partial[chunk_idx] = sum;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace tessera::cpu
