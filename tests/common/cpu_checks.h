// The two structural checks every CPU reference op gets in its tests/kernels/<op>_test.cpp:
// outputs written only inside their bounds (each output a view into a larger buffer whose guard
// elements on both sides hold a sentinel: catches off-by-one rows, wrong leading dimensions and
// stray writes past the end), and results independent of the OpenMP thread count (1 vs 3 threads,
// bitwise). Part of the shared test kit (tests/common).
#pragma once
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "tests/common/tensors.h"

namespace tessera::testing {

constexpr int64_t kGuard = 37;              // guard elements on each side of an output
constexpr double kSentinel = -12345.5;      // what f32/f64 guards (and initial contents) hold
constexpr unsigned char kGuardByte = 0xA5;  // what guards of any other dtype hold, byte by byte

// An output tensor of `dtype` with kGuard sentinel elements before and after it. Its own elements
// start as sentinels too (ops that accumulate add onto them).
class Guarded {
 public:
  explicit Guarded(Shape s, DType dtype = DType::f32) : elem_(dtype_size(dtype)) {
    const int64_t n = s.numel() + 2 * kGuard;
    bytes_.resize(size_t(n) * elem_);
    for (int64_t i = 0; i < n; ++i) fill_sentinel(dtype, bytes_.data() + i * elem_);
    initial_ = bytes_;
    t_ = Tensor(bytes_.data() + kGuard * elem_, dtype, Device::cpu, s);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  operator Tensor() const { return t_; }
  const Tensor& t() const { return t_; }

  void expect_guards_intact(const std::string& what) const {
    const size_t guard_bytes = size_t(kGuard) * elem_, end = bytes_.size();
    for (size_t i = 0; i < guard_bytes; ++i) {
      EXPECT_EQ(bytes_[i], initial_[i])
          << what << ": wrote " << (guard_bytes - i + elem_ - 1) / elem_ << " elements before";
      EXPECT_EQ(bytes_[end - 1 - i], initial_[end - 1 - i])
          << what << ": wrote " << (guard_bytes - i + elem_ - 1) / elem_ << " elements after";
    }
  }

 private:
  static void fill_sentinel(DType dtype, unsigned char* p) {
    if (dtype == DType::f32) {
      const float v = float(kSentinel);
      std::memcpy(p, &v, sizeof v);
    } else if (dtype == DType::f64) {
      std::memcpy(p, &kSentinel, sizeof kSentinel);
    } else {
      std::memset(p, kGuardByte, dtype_size(dtype));
    }
  }

  size_t elem_;
  std::vector<unsigned char> bytes_, initial_;
  Tensor t_;
};

// Every guard of `outputs` intact after the op ran.
inline void expect_guards_intact(std::initializer_list<const Guarded*> outputs,
                                 const std::string& what) {
  for (const Guarded* g : outputs) g->expect_guards_intact(what);
}

// Runs `op` (which writes into `outputs`) under 1 and 3 threads and compares every output bitwise.
// Outputs are restored between the runs, so ops that accumulate start from the same values.
inline void expect_thread_independent(const std::string& what, std::vector<HostTensor*> outputs,
                                      const std::function<void()>& op) {
  std::vector<HostTensor> initial;
  for (HostTensor* h : outputs) initial.push_back(*h);
  with_threads(1, op);
  std::vector<HostTensor> serial;
  for (size_t i = 0; i < outputs.size(); ++i) {
    serial.push_back(*outputs[i]);
    *outputs[i] = initial[i];
  }
  with_threads(3, op);
  for (size_t i = 0; i < outputs.size(); ++i) expect_identical(*outputs[i], serial[i], what);
}

}  // namespace tessera::testing
