// Helpers shared by the CPU reference kernels (kernels/cpu/*.cpp): operand checks with clear
// messages, a dtype switch that runs one generic body with T = float (f32) or double (f64), and
// the OpenMP threshold. Internal to kernels/cpu; model code calls tessera::ops.
// Hazard: never throw (TS_CHECK) inside an OpenMP parallel region; that terminates the process.
// Validate first, then enter the parallel loop.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>

#include "core/tensor.h"

namespace tessera::cpu {

// Below this many scalar operations a loop stays serial: forking threads costs more than it saves
// (and on a busy CI machine idle OpenMP threads spin). The result never depends on this choice.
constexpr int64_t kMinParallelWork = 1 << 15;

// A required operand: present and in host memory.
inline void check_host(const Tensor& t, const char* op, const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == Device::cpu, "{}: {} is {}, expected a cpu tensor", op, name, t.str());
}

// The first float operand of an op fixes the compute dtype, which must be f32 or f64.
inline void check_compute_dtype(const Tensor& t, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::f32 || t.dtype == DType::f64,
           "{}: {} is {}; the CPU kernels compute in f32 or f64 only", op, name, t.str());
}

// Any further float operand: host memory and the op's compute dtype.
inline void check_float(const Tensor& t, DType dtype, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == dtype,
           "{}: {} is {}, but the op computes in {} (all float tensors of one "
           "call share a dtype)",
           op, name, t.str(), dtype_name(dtype));
}

inline void check_shape(const Tensor& t, const Shape& s, const char* op, const char* name) {
  TS_CHECK(t.shape == s, "{}: {} has shape {}, expected {}", op, name, t.shape.str(), s.str());
}

// Rows of a (..., C) tensor: the product of all dims but the last.
inline int64_t num_rows(const Tensor& t) {
  int64_t n = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) n *= t.dim(i);
  return n;
}

// True when the byte ranges of two tensors intersect (outputs that must not alias inputs).
// check_float then check_shape: the pairing nearly every operand check needs.
inline void check_like(const Tensor& t, DType dtype, const Shape& s, const char* op,
                       const char* name) {
  check_float(t, dtype, op, name);
  check_shape(t, s, op, name);
}

inline bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.empty() || b.empty()) return false;
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// Runs fn(T{}) with T = float for f32 and double for f64. Callers check the dtype first, so any
// other dtype here is a bug.
template <class Fn>
void dispatch_float(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f32: std::forward<Fn>(fn)(float{}); return;
    case DType::f64: std::forward<Fn>(fn)(double{}); return;
    default: TS_BUG("{}: no CPU kernel for dtype {}", op, dtype_name(dtype));
  }
}

// Saved row statistics (mean, rstd of the norms) are f32, or f64 when the op computes in f64 so
// that finite-difference tests stay exact. These accessors hide which one it is.
inline void check_stat(const Tensor& t, DType dtype, int64_t n, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::f32 || t.dtype == dtype,
           "{}: {} is {}, expected f32 or the op's dtype {}", op, name, t.str(), dtype_name(dtype));
  TS_CHECK(t.numel() == n, "{}: {} is {}, expected {} elements (one per row)", op, name, t.str(),
           n);
}
inline double load_stat(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? static_cast<const double*>(t.data)[i]
                               : static_cast<const float*>(t.data)[i];
}
inline void store_stat(const Tensor& t, int64_t i, double value) {
  if (t.dtype == DType::f64)
    static_cast<double*>(t.data)[i] = value;
  else
    static_cast<float*>(t.data)[i] = static_cast<float>(value);
}

// Parameter-gradient reduction: dst[col] += sum over rows of term(row, col), computed so the
// result does not depend on the thread count. Columns are split into blocks across threads; each
// column is summed in double over rows 0..rows-1 in order, then added to dst once.
template <class T, class Term>
void accumulate_column_sums(T* dst, int64_t rows, int64_t cols, Term term) {
  constexpr int64_t kBlock = 64;
  const int64_t num_blocks = (cols + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * cols > kMinParallelWork)
  for (int64_t block_idx = 0; block_idx < num_blocks; ++block_idx) {
    const int64_t col_begin = block_idx * kBlock;
    const int64_t col_end = std::min(cols, col_begin + kBlock);
    double acc[kBlock] = {};
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t col = col_begin; col < col_end; ++col) acc[col - col_begin] += term(row, col);
    for (int64_t col = col_begin; col < col_end; ++col)
      dst[col] = static_cast<T>(static_cast<double>(dst[col]) + acc[col - col_begin]);
  }
}

}  // namespace tessera::cpu
