// Shared test helpers: owned host tensors, random fills, and central finite differences in double.
// Gradient checks: for a scalar loss L(x) = sum(dout * f(x)) the analytic dx from backward must
// match (L(x + h e_i) - L(x - h e_i)) / 2h for every (or a sampled set of) element i.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "core/tensor.h"

namespace tessera::testing {

// A host tensor that owns its storage (f64, f32 or i32 only).
struct HostTensor {
  std::vector<double> f64;
  std::vector<float> f32;
  std::vector<int32_t> i32;
  Tensor t;

  HostTensor() = default;
  HostTensor(DType dtype, Shape s) {
    const int64_t n = s.numel();
    void* p = nullptr;
    if (dtype == DType::f64) {
      f64.assign(n, 0.0);
      p = f64.data();
    } else if (dtype == DType::f32) {
      f32.assign(n, 0.0f);
      p = f32.data();
    } else if (dtype == DType::i32) {
      i32.assign(n, 0);
      p = i32.data();
    } else
      ADD_FAILURE() << "HostTensor: unsupported dtype";
    t = Tensor(p, dtype, Device::cpu, s);
  }
  HostTensor(const HostTensor& o) : f64(o.f64), f32(o.f32), i32(o.i32), t(o.t) { rebind(); }
  HostTensor& operator=(const HostTensor& o) {
    f64 = o.f64;
    f32 = o.f32;
    i32 = o.i32;
    t = o.t;
    rebind();
    return *this;
  }
  void rebind() {
    if (t.dtype == DType::f64)
      t.data = f64.data();
    else if (t.dtype == DType::f32)
      t.data = f32.data();
    else if (t.dtype == DType::i32)
      t.data = i32.data();
  }
  int64_t size() const { return t.numel(); }
  double get(int64_t i) const {
    return t.dtype == DType::f64 ? f64[i] : t.dtype == DType::f32 ? f32[i] : i32[i];
  }
  void set(int64_t i, double v) {
    if (t.dtype == DType::f64)
      f64[i] = v;
    else if (t.dtype == DType::f32)
      f32[i] = float(v);
    else
      i32[i] = int32_t(v);
  }
  operator Tensor() const { return t; }
};

inline HostTensor randn(DType dtype, Shape s, std::mt19937_64& rng, double stddev = 1.0) {
  HostTensor h(dtype, s);
  std::normal_distribution<double> d(0.0, stddev);
  for (int64_t i = 0; i < h.size(); ++i) h.set(i, d(rng));
  return h;
}

inline HostTensor randint(Shape s, int lo, int hi, std::mt19937_64& rng) {
  HostTensor h(DType::i32, s);
  std::uniform_int_distribution<int> d(lo, hi - 1);
  for (int64_t i = 0; i < h.size(); ++i) h.set(i, d(rng));
  return h;
}

inline double dot(const HostTensor& a, const HostTensor& b) {
  double s = 0.0;
  for (int64_t i = 0; i < a.size(); ++i) s += a.get(i) * b.get(i);
  return s;
}

// Central finite difference of `loss` with respect to every element of `x` (or `max_checks`
// evenly spaced ones); compares with `analytic`. Relative error is measured against the larger of
// |fd|, |analytic| and `abs_floor`, so tiny gradients do not produce spurious failures.
inline void expect_grad_matches(HostTensor& x, const HostTensor& analytic,
                                const std::function<double()>& loss, double tol, const char* what,
                                double h = 1e-6, int64_t max_checks = 256,
                                double abs_floor = 1e-6) {
  const int64_t n = x.size();
  const int64_t stride = std::max<int64_t>(1, n / max_checks);
  double worst = 0.0;
  int64_t worst_i = -1;
  for (int64_t i = 0; i < n; i += stride) {
    const double x0 = x.get(i);
    x.set(i, x0 + h);
    const double lp = loss();
    x.set(i, x0 - h);
    const double lm = loss();
    x.set(i, x0);
    const double fd = (lp - lm) / (2 * h);
    const double an = analytic.get(i);
    const double denom = std::max({std::fabs(fd), std::fabs(an), abs_floor});
    const double rel = std::fabs(fd - an) / denom;
    if (rel > worst) {
      worst = rel;
      worst_i = i;
    }
    EXPECT_LE(rel, tol) << what << " element " << i << ": fd=" << fd << " analytic=" << an;
  }
  (void)worst_i;
}

}  // namespace tessera::testing
