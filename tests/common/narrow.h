// The 16-bit contract check for CPU ops (kernels/cpu/narrow.h): an op run on bf16/f16 tensors
// must equal, bit for bit, the f32 kernel run on the exactly widened operands with each 16-bit
// output rounded once to nearest even; f32 operands (statistics, or an f32 parameter gradient
// beside 16-bit activations) must equal the f32 run's, integer and read-only operands stay
// untouched. expect_contract runs one op, expect_steps a sequence (rounding between steps, as
// storage would), expect_same compares a fused op with its step-by-step definition. Used by the
// NarrowDtype cases of each tests/kernels/<op>_test.cpp. Part of the shared test kit.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

// In its own namespace: its short names (narrow, f32, ints, at, Kind) would clash with test code.
namespace tessera::testing::n16 {

inline constexpr float kInf = std::numeric_limits<float>::infinity();
inline constexpr float kQNaN = std::numeric_limits<float>::quiet_NaN();

inline uint16_t narrow_bits(DType dtype, float x) {
  return dtype == DType::bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
}
inline float widen(DType dtype, uint16_t bits) {
  return dtype == DType::bf16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}
inline bool same_or_both_nan(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0;
}

// How an operand is stored in the 16-bit run (the reference run stores every float as f32).
enum class Kind {
  narrow,  // the dtype under test (bf16 or f16)
  f32,     // f32 in both runs: statistics, or the f32 side of a mixed-dtype call
  i32,     // tokens, targets
};

struct Operand {
  Shape shape;
  Kind kind = Kind::narrow;
  double stddev = 1.0;    // floats: normal(0, stddev)
  bool positive = false;  // floats: |normal| + 0.5 (rstd, AdamW's v)
  int lo = 0, hi = 1;     // i32: uniform in [lo, hi)
};

inline Operand narrow(Shape s, double stddev = 1.0) { return Operand{s, Kind::narrow, stddev}; }
inline Operand f32(Shape s, bool positive = false) { return Operand{s, Kind::f32, 1.0, positive}; }
inline Operand ints(Shape s, int lo, int hi) { return Operand{s, Kind::i32, 1.0, false, lo, hi}; }

// One run's memory for every operand; tensors[i] views operand i.
struct OpRun {
  std::vector<std::vector<uint16_t>> bits;
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<int32_t>> i32;
  std::vector<Tensor> tensors;
};

// values[i] holds operand i's initial values, exactly representable in its storage dtype.
inline OpRun make_run(const std::vector<Operand>& specs,
                      const std::vector<std::vector<double>>& values, DType narrow_dtype) {
  OpRun run;
  const size_t n = specs.size();
  run.bits.resize(n);
  run.f32.resize(n);
  run.i32.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Operand& op = specs[i];
    const auto numel = static_cast<size_t>(op.shape.numel());
    void* data = nullptr;
    DType dtype = DType::f32;
    if (op.kind == Kind::i32) {
      for (double v : values[i]) run.i32[i].push_back(int32_t(v));
      data = run.i32[i].data();
      dtype = DType::i32;
    } else if (op.kind == Kind::narrow && narrow_dtype != DType::f32) {
      for (double v : values[i]) run.bits[i].push_back(narrow_bits(narrow_dtype, float(v)));
      data = run.bits[i].data();
      dtype = narrow_dtype;
    } else {
      for (double v : values[i]) run.f32[i].push_back(float(v));
      data = run.f32[i].data();
    }
    EXPECT_EQ(values[i].size(), numel);
    run.tensors.emplace_back(data, dtype, Device::cpu, op.shape);
  }
  return run;
}

// Random initial values; 16-bit operands are rounded to `dtype` first, so the widened reference
// sees exactly what the 16-bit run stores. With `specials`, the first three elements of every
// 16-bit operand are NaN, +Inf, -Inf.
inline std::vector<std::vector<double>> draw(const std::vector<Operand>& specs, DType dtype,
                                             uint64_t seed, bool specials) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<std::vector<double>> values(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const Operand& op = specs[i];
    for (int64_t j = 0; j < op.shape.numel(); ++j) {
      if (op.kind == Kind::i32) {
        values[i].push_back(std::uniform_int_distribution<int>(op.lo, op.hi - 1)(rng));
        continue;
      }
      double v = normal(rng) * op.stddev;
      if (op.positive) v = std::fabs(v) + 0.5;
      v = float(v);
      if (op.kind == Kind::narrow) {
        if (specials && j < 3) v = j == 0 ? kQNaN : j == 1 ? kInf : -kInf;
        v = widen(dtype, narrow_bits(dtype, float(v)));
      }
      values[i].push_back(v);
    }
  }
  return values;
}

using OpFn = std::function<void(const std::vector<Tensor>&)>;

// Runs `steps` (ops called one after another) on 16-bit storage and on the f32 widening of the same
// values, then demands every 16-bit operand equal the once-rounded f32 result bit for bit (read-
// only ones: unchanged), every f32 operand equal the f32 run's and every integer operand be
// unchanged. Between steps the reference rounds its copies of the 16-bit operands, as their
// storage would (a sequence of ops rounds once per op, not once at the end). Returns the 16-bit
// run.
inline OpRun expect_steps(const std::string& what, DType dtype, const std::vector<Operand>& specs,
                          const std::vector<OpFn>& steps, uint64_t seed, bool specials = false) {
  SCOPED_TRACE(what + " on " + std::string(dtype_name(dtype)));
  const auto values = draw(specs, dtype, seed, specials);
  OpRun low = make_run(specs, values, dtype);
  OpRun ref = make_run(specs, values, DType::f32);
  for (const OpFn& step : steps) {
    step(low.tensors);
    step(ref.tensors);
    for (size_t i = 0; i < specs.size(); ++i)
      if (specs[i].kind == Kind::narrow)
        for (float& v : ref.f32[i]) v = std::isnan(v) ? v : widen(dtype, narrow_bits(dtype, v));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t n = specs[i].shape.numel();
    int64_t bad = -1;
    for (int64_t j = 0; j < n && bad < 0; ++j) {
      if (specs[i].kind == Kind::i32) {
        if (low.i32[i][j] != int32_t(values[i][j]) || ref.i32[i][j] != low.i32[i][j]) bad = j;
      } else if (specs[i].kind == Kind::narrow) {
        // NaN payloads are not part of the contract; every other value is compared by its bits
        // (so -0 and +0 differ).
        const float want = ref.f32[i][j];
        if (std::isnan(want) ? !std::isnan(widen(dtype, low.bits[i][j]))
                             : low.bits[i][j] != narrow_bits(dtype, want))
          bad = j;
      } else if (!same_or_both_nan(low.f32[i][j], ref.f32[i][j])) {
        bad = j;
      }
    }
    if (bad >= 0) {
      const double got = specs[i].kind == Kind::narrow ? widen(dtype, low.bits[i][bad])
                         : specs[i].kind == Kind::f32  ? low.f32[i][bad]
                                                       : low.i32[i][bad];
      const double want = specs[i].kind == Kind::i32 ? ref.i32[i][bad] : ref.f32[i][bad];
      ADD_FAILURE() << "operand " << i << " " << specs[i].shape.str() << " element " << bad
                    << ": got " << got << ", f32 reference " << want;
    }
  }
  return low;
}

inline OpRun expect_contract(const std::string& what, DType dtype,
                             const std::vector<Operand>& specs, const OpFn& op, uint64_t seed,
                             bool specials = false) {
  return expect_steps(what, dtype, specs, {op}, seed, specials);
}

// Two ways of computing the same thing on the same 16-bit operands must agree bit for bit (the
// fused sequences against their step-by-step definition).
inline void expect_same(const std::string& what, DType dtype, const std::vector<Operand>& specs,
                        const OpFn& fused, const OpFn& sequence, uint64_t seed) {
  SCOPED_TRACE(what + " on " + std::string(dtype_name(dtype)));
  const auto values = draw(specs, dtype, seed, false);
  OpRun a = make_run(specs, values, dtype);
  OpRun b = make_run(specs, values, dtype);
  fused(a.tensors);
  sequence(b.tensors);
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(a.bits[i], b.bits[i]) << "operand " << i;
    EXPECT_EQ(a.f32[i], b.f32[i]) << "operand " << i;
  }
}

inline constexpr DType kNarrowTypes[] = {DType::bf16, DType::f16};

// Widened value of element j of 16-bit operand i of a run.
inline float at(const OpRun& run, DType dtype, size_t i, int64_t j) {
  return widen(dtype, run.bits[i][j]);
}

}  // namespace tessera::testing::n16
