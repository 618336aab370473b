// Host-tensor helpers for the kernel tests (tests/kernels): dtype copies, fills, the one family of
// comparisons (tolerance, bitwise, largest difference), the finite-difference loss and step, and
// running a body under a fixed OpenMP thread count. Part of the shared test kit (tests/common);
// HostTensor and expect_grad_matches live in testing.h.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>

#include "tests/common/testing.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tessera::testing {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Finite differences in f64. The central difference errs by about h^2 |f'''| / 6 (truncation)
// plus u |out| sqrt(C) / h (rounding of the C outputs a perturbed element changes, u = 1.1e-16),
// which balance near h ~ u^(1/3) times the input scale (inputs here have |x| up to ~6 and rows up
// to 1025 elements). At h = 1e-6 the rounding term reached 1e-8 absolute on 1025-wide LayerNorm
// rows, 3e-5 relative on small entries; at h = 3e-5 the worst entry over all tests here is
// ~2e-7 relative. kFdTol = 1e-5 keeps a 50x margin, while a wrong formula or index errs by O(1).
constexpr double kFdStep = 3e-5;
constexpr double kFdTol = 1e-5;

// The same values in another dtype (f32 <-> f64 <-> i32), rounded to nearest.
inline HostTensor to_dtype(const HostTensor& src, DType dtype) {
  HostTensor out(dtype, src.t.shape);
  for (int64_t i = 0; i < src.size(); ++i) out.set(i, src.get(i));
  return out;
}

inline HostTensor filled(DType dtype, Shape s, double value) {
  HostTensor h(dtype, s);
  for (int64_t i = 0; i < h.size(); ++i) h.set(i, value);
  return h;
}

// ---- comparisons ------------------------------------------------------------------------------

// Every element satisfies |a - b| <= atol + rtol * |b|; reports the worst element.
inline void expect_close(const HostTensor& a, const HostTensor& b, double rtol, double atol,
                         const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double worst = 0.0;
  int64_t worst_idx = -1;
  for (int64_t i = 0; i < a.size(); ++i) {
    const double err = std::fabs(a.get(i) - b.get(i)) - (atol + rtol * std::fabs(b.get(i)));
    if (!(err <= worst)) {  // also catches NaN
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      worst_idx = i;
    }
  }
  EXPECT_EQ(worst_idx, -1) << what << ": element " << worst_idx
                           << " differs: " << (worst_idx >= 0 ? a.get(worst_idx) : 0.0) << " vs "
                           << (worst_idx >= 0 ? b.get(worst_idx) : 0.0) << " (rtol " << rtol
                           << ", atol " << atol << ")";
}

// Bitwise equality of two host tensors of one dtype (determinism and exact-formula checks); a NaN
// matches a NaN (payloads are not part of any contract).
inline void expect_identical(const HostTensor& a, const HostTensor& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_EQ(a.t.dtype, b.t.dtype) << what;
  for (int64_t i = 0; i < a.size(); ++i) {
    const double x = a.get(i), y = b.get(i);
    if (!(x == y || (std::isnan(x) && std::isnan(y)))) {
      ADD_FAILURE() << what << ": element " << i << " differs: " << x << " vs " << y;
      return;
    }
  }
}

// Equality by ==, so a NaN matches nothing: two code paths that must perform the very same
// arithmetic on finite data (aliasing, sharding, thread counts).
inline void expect_identical_no_nan(const HostTensor& a, const HostTensor& b,
                                    const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_EQ(a.t.dtype, b.t.dtype) << what;
  for (int64_t i = 0; i < a.size(); ++i) {
    if (!(a.get(i) == b.get(i))) {
      ADD_FAILURE() << what << ": element " << i << " differs: " << a.get(i) << " vs " << b.get(i);
      return;
    }
  }
}

// Largest |a - b| over all elements; NaN anywhere gives NaN (so EXPECT_LE fails on it).
inline double max_abs_diff(const HostTensor& a, const HostTensor& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (int64_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(a.get(i) - b.get(i));
    if (std::isnan(diff)) return diff;
    worst = std::max(worst, diff);
  }
  return worst;
}

inline int64_t count_nan(const HostTensor& h, int64_t begin, int64_t end) {
  int64_t n = 0;
  for (int64_t i = begin; i < end; ++i) n += std::isnan(h.get(i)) ? 1 : 0;
  return n;
}

// ---- finite differences -----------------------------------------------------------------------

// The loss for finite differences: loss(x) = sum(dout * (f(x) - f(x0))), where `forward` writes
// f(x) into `out` and f(x0) is its value when fd_loss is called. Subtracting f(x0) leaves an exact
// zero for every output the perturbed element does not touch (the kernels are deterministic), so
// the loss's rounding error scales with the few outputs that change rather than with the whole
// sum: for 1e4 outputs the plain sum(dout * f(x)) carries ~1e-16 |loss| / h ~ 1e-8 of absolute
// noise into the difference quotient, too coarse for gradient entries near 1e-4.
inline std::function<double()> fd_loss(const HostTensor& dout, const HostTensor& out,
                                       std::function<void()> forward) {
  forward();
  auto base = std::make_shared<const HostTensor>(out);
  return [&dout, &out, base, forward] {
    forward();
    double sum = 0.0;
    for (int64_t i = 0; i < out.size(); ++i) sum += dout.get(i) * (out.get(i) - base->get(i));
    return sum;
  };
}

// ---- threads ----------------------------------------------------------------------------------

// Runs body with the OpenMP thread count set to num_threads, then restores it.
inline void with_threads(int num_threads, const std::function<void()>& body) {
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  omp_set_num_threads(num_threads);
  body();
  omp_set_num_threads(saved);
#else
  (void)num_threads;
  body();
#endif
}

}  // namespace tessera::testing
