// Tests of the elementwise helpers (kernels/cpu/elementwise.cpp, kernels/cuda/elementwise.cu):
// add_forward, add_inplace, scale_inplace, fill, cast and sum_squares. CPU: values, aliasing, NaN
// propagation, fill and cast for every float dtype (rounding once, fp8 saturation, f16 overflow),
// sum_squares in double; bf16/f16 against the f32 kernel rounded once; bounds and thread counts.
// GPU parity: f32, bf16, f16 on awkward sizes, misaligned views and in place, NaN/Inf; fill and
// cast bit for bit against core/dtype.h for every castable dtype pair; sum_squares deterministic.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

Tensor view_of(std::vector<uint16_t>& bits, DType dtype) {
  return Tensor(bits.data(), dtype, Device::cpu, {int64_t(bits.size())});
}
Tensor view_of(std::vector<uint8_t>& bits, DType dtype) {
  return Tensor(bits.data(), dtype, Device::cpu, {int64_t(bits.size())});
}

TEST(Elementwise, AddAndScale) {
  std::mt19937_64 rng(61);
  for (DType dtype : {DType::f32, DType::f64}) {
    const HostTensor a = randn(dtype, {3, 7}, rng), b = randn(dtype, {3, 7}, rng);
    HostTensor out(dtype, {3, 7});
    cpu::add_forward(out, a, b);
    for (int64_t i = 0; i < 21; ++i) {
      const double sum =
          dtype == DType::f32 ? double(float(a.get(i)) + float(b.get(i))) : a.get(i) + b.get(i);
      EXPECT_EQ(out.get(i), sum);
    }
    HostTensor aliased = a;
    cpu::add_forward(aliased, aliased, b);  // out aliases a
    expect_identical(aliased, out, "add_forward with out aliasing a");
    HostTensor acc = a;
    cpu::add_inplace(acc, b);
    expect_identical(acc, out, "add_inplace");
    cpu::scale_inplace(acc, 0.5f);
    for (int64_t i = 0; i < 21; ++i) EXPECT_EQ(acc.get(i), out.get(i) * 0.5);
  }
  HostTensor a(DType::f32, {4}), b(DType::f32, {5}), b64(DType::f64, {4});
  EXPECT_THROW(cpu::add_forward(a, a, b), Error);
  EXPECT_THROW(cpu::add_inplace(a, b64), Error);
}

TEST(Elementwise, NaNPropagatesThroughAdd) {
  HostTensor a = filled(DType::f32, {3}, 1.0), b = filled(DType::f32, {3}, 2.0);
  HostTensor out(DType::f32, {3});
  b.set(1, kNaN);
  cpu::add_forward(out, a, b);
  EXPECT_EQ(count_nan(out, 0, 3), 1);
  EXPECT_TRUE(std::isnan(out.get(1)));
}

TEST(Elementwise, FillEveryFloatType) {
  HostTensor x32(DType::f32, {5}), x64(DType::f64, {5});
  cpu::fill(x32, 0.1f);
  cpu::fill(x64, 0.1f);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(x32.get(i), double(0.1f));
    EXPECT_EQ(x64.get(i), double(0.1f));
  }
  std::vector<uint16_t> bf16(9), f16(9);
  std::vector<uint8_t> e4m3(9), e5m2(9);
  cpu::fill(view_of(bf16, DType::bf16), 1.5f);
  cpu::fill(view_of(f16, DType::f16), 1.5f);
  cpu::fill(view_of(e4m3, DType::e4m3), 1.5f);
  cpu::fill(view_of(e5m2, DType::e5m2), 1.5f);
  for (int i = 0; i < 9; ++i) {
    EXPECT_EQ(bf16[i], 0x3FC0);  // 1.5 = 1.1b x 2^0
    EXPECT_EQ(f16[i], 0x3E00);
    EXPECT_EQ(e4m3[i], 0x3C);  // sign 0, exponent 0111, mantissa 100
    EXPECT_EQ(e5m2[i], 0x3E);  // sign 0, exponent 01111, mantissa 10
  }
  HostTensor ints(DType::i32, {2});
  EXPECT_THROW(cpu::fill(ints, 1.0f), Error);
}

// f64 values just above a tie of the narrow type: the correct result rounds up, while converting
// through f32 first lands exactly on the tie and rounds to even (down).
TEST(Elementwise, CastFromF64RoundsOnce) {
  HostTensor src(DType::f64, {3});
  src.set(0, 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40));   // bf16 ulp at 1 is 2^-7
  src.set(1, 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40));  // f16 ulp at 1 is 2^-10
  src.set(2, 1.0 + std::ldexp(1.0, -4) + std::ldexp(1.0, -40));   // e4m3 ulp at 1 is 2^-3
  std::vector<uint16_t> bf16(3), f16(3);
  std::vector<uint8_t> e4m3(3);
  cpu::cast(view_of(bf16, DType::bf16), src);
  cpu::cast(view_of(f16, DType::f16), src);
  cpu::cast(view_of(e4m3, DType::e4m3), src);
  EXPECT_EQ(bf16[0], 0x3F81);  // 1 + 2^-7, not 0x3F80
  EXPECT_EQ(f16[1], 0x3C01);   // 1 + 2^-10, not 0x3C00
  EXPECT_EQ(e4m3[2], 0x39);    // 1.125, not 0x38
}

TEST(Elementwise, CastSaturatesFp8AndOverflowsSixteenBit) {
  HostTensor src(DType::f64, {4});
  src.set(0, 1e300);
  src.set(1, -1000.0);
  src.set(2, kNaN);
  src.set(3, 1e6);
  std::vector<uint16_t> bf16(4), f16(4);
  std::vector<uint8_t> e4m3(4), e5m2(4);
  cpu::cast(view_of(bf16, DType::bf16), src);
  cpu::cast(view_of(f16, DType::f16), src);
  cpu::cast(view_of(e4m3, DType::e4m3), src);
  cpu::cast(view_of(e5m2, DType::e5m2), src);
  EXPECT_EQ(bf16[0], 0x7F80);  // +Inf
  EXPECT_EQ(f16[0], 0x7C00);   // +Inf
  EXPECT_EQ(f16[3], 0x7C00);   // 1e6 > 65504
  EXPECT_EQ(e4m3[0], 0x7E);    // +448
  EXPECT_EQ(e4m3[1], 0xFE);    // -448
  EXPECT_EQ(e5m2[3], 0x7B);    // +57344
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(bf16[2])));
  EXPECT_TRUE(std::isnan(e4m3_bits_to_f32(e4m3[2])));
  EXPECT_TRUE(std::isnan(e5m2_bits_to_f32(e5m2[2])));
}

TEST(Elementwise, CastChainKeepsRepresentableValuesExact) {
  // Each value is exact in every type: e5m2 (2 mantissa bits) and e4m3 (min subnormal 2^-9).
  const double values[] = {0.5, -1.75, 448.0, std::ldexp(1.0, -9), -0.0, 3.0};
  HostTensor src(DType::f64, {6});
  for (int i = 0; i < 6; ++i) src.set(i, values[i]);
  std::vector<uint8_t> e4m3(6), e5m2(6);
  std::vector<uint16_t> bf16(6), f16(6);
  HostTensor f32(DType::f32, {6}), back(DType::f64, {6});
  cpu::cast(view_of(e4m3, DType::e4m3), src);
  cpu::cast(view_of(bf16, DType::bf16), view_of(e4m3, DType::e4m3));
  cpu::cast(view_of(f16, DType::f16), view_of(bf16, DType::bf16));
  cpu::cast(view_of(e5m2, DType::e5m2), view_of(f16, DType::f16));
  cpu::cast(f32, view_of(e5m2, DType::e5m2));
  cpu::cast(back, f32);
  expect_identical(back, src, "cast chain");
  EXPECT_TRUE(std::signbit(back.get(4)));
}

TEST(Elementwise, CastFromF32MatchesScalarRounding) {
  std::mt19937_64 rng(62);
  const HostTensor src = randn(DType::f32, {4097}, rng, 100.0);
  std::vector<uint16_t> bf16(4097), f16(4097);
  cpu::cast(view_of(bf16, DType::bf16), src);
  cpu::cast(view_of(f16, DType::f16), src);
  for (int64_t i = 0; i < 4097; ++i) {
    EXPECT_EQ(bf16[i], f32_to_bf16_bits(src.f32[i]));
    EXPECT_EQ(f16[i], f32_to_f16_bits(src.f32[i]));
  }
  HostTensor wrong(DType::f32, {4096});
  EXPECT_THROW(cpu::cast(wrong, src), Error);
}

TEST(Elementwise, SumSquaresInDouble) {
  HostTensor small(DType::f32, {3});
  for (int i = 0; i < 3; ++i) small.set(i, i + 1);
  EXPECT_EQ(cpu::sum_squares(small), 14.0);
  // More than two chunks: agrees with a serial double sum up to summation order (~n eps).
  std::mt19937_64 rng(63);
  for (DType dtype : {DType::f32, DType::f64}) {
    const HostTensor x = randn(dtype, {3, 3333}, rng);
    double expect = 0.0;
    for (int64_t i = 0; i < x.size(); ++i) expect += x.get(i) * x.get(i);
    EXPECT_NEAR(cpu::sum_squares(x), expect, 1e-12 * expect);
  }
  HostTensor with_nan = filled(DType::f64, {10}, 1.0);
  with_nan.set(7, kNaN);
  EXPECT_TRUE(std::isnan(cpu::sum_squares(with_nan)));
}

// add in f32 against f64 on identical inputs: one f32 rounding of the exact sum (<= 2^-24 rel).
TEST(Elementwise, F32AgreesWithF64) {
  std::mt19937_64 rng(64);
  const HostTensor a32 = randn(DType::f32, {500}, rng), b32 = randn(DType::f32, {500}, rng);
  HostTensor out32(DType::f32, {500}), out64(DType::f64, {500});
  cpu::add_forward(out32, a32, b32);
  cpu::add_forward(out64, to_dtype(a32, DType::f64), to_dtype(b32, DType::f64));
  expect_close(out32, out64, 6e-8, 1e-45, "add f32 vs f64");
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Elementwise) {
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 180 : 80;
      const std::string tag = specials ? " with NaN/Inf" : "";
      OpRun r = expect_contract(
          "add_forward" + tag, dt, {narrow(s), narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[1], t[2]); }, seed, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));  // NaN + NaN
        EXPECT_EQ(at(r, dt, 0, 1), kInf);          // Inf + Inf
        EXPECT_EQ(at(r, dt, 0, 2), -kInf);
      }
      expect_contract(
          "add_forward out aliasing a" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[0], t[1]); }, seed + 1, specials);
      expect_contract(
          "add_forward out aliasing b" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[1], t[0], t[1]); }, seed + 2, specials);
      expect_contract(
          "add_forward out = a = b" + tag, dt, {narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[0], t[0]); }, seed + 3, specials);
      expect_contract(
          "add_forward mixed f32 a" + tag, dt, {narrow(s), f32(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[1], t[2]); }, seed + 4, specials);
      r = expect_contract(
          "add_inplace" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_inplace(t[0], t[1]); }, seed + 5, specials);
      expect_contract(
          "add_inplace into f32" + tag, dt, {f32(s), narrow(s)},
          [](const auto& t) { ops::add_inplace(t[0], t[1]); }, seed + 6, specials);
      const OpFn add = [](const auto& t) { ops::add_inplace(t[0], t[1]); };
      expect_steps("add_inplace twice" + tag, dt, {narrow(s), narrow(s)}, {add, add}, seed + 7,
                   specials);
      r = expect_contract(
          "scale_inplace" + tag, dt, {narrow(s, 100.0)},
          [](const auto& t) { ops::scale_inplace(t[0], 0.37f); }, seed + 8, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
        EXPECT_EQ(at(r, dt, 0, 1), kInf);
      }
    }
  }
}

TEST(NarrowDtype, ElementwiseRoundsOnceByHand) {
  // Independent of the f32 kernels: the 16-bit results are round(widen(x) op widen(y)).
  std::mt19937_64 rng(90);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  for (DType dt : kNarrowTypes) {
    const int64_t n = 1025;
    std::vector<uint16_t> a(n), b(n), out(n), acc(n), scaled(n);
    for (int64_t i = 0; i < n; ++i) {
      a[i] = narrow_bits(dt, normal(rng));
      b[i] = narrow_bits(dt, normal(rng));
    }
    acc = a;
    scaled = a;
    auto view = [&](std::vector<uint16_t>& v) { return Tensor(v.data(), dt, Device::cpu, {n}); };
    ops::add_forward(view(out), view(a), view(b));
    ops::add_inplace(view(acc), view(b));
    ops::scale_inplace(view(scaled), 1.0f / 3.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float x = widen(dt, a[i]), y = widen(dt, b[i]);
      EXPECT_EQ(out[i], narrow_bits(dt, x + y)) << i;
      EXPECT_EQ(acc[i], narrow_bits(dt, x + y)) << i;
      EXPECT_EQ(scaled[i], narrow_bits(dt, x * (1.0f / 3.0f))) << i;
    }
    // sum_squares reads the exact widened values and accumulates in double, like the f32 run.
    std::vector<float> a32(n);
    for (int64_t i = 0; i < n; ++i) a32[i] = widen(dt, a[i]);
    EXPECT_EQ(ops::sum_squares(view(a)),
              ops::sum_squares(Tensor(a32.data(), DType::f32, Device::cpu, {n})));
  }
}

TEST(NarrowDtype, F16OverflowRoundsToInf) {
  // FP16 loss scaling detects overflow as Inf in the gradients: the CPU must produce it.
  std::vector<uint16_t> x{f32_to_f16_bits(60000.0f), f32_to_f16_bits(-60000.0f),
                          f32_to_f16_bits(30000.0f)};
  const Tensor t(x.data(), DType::f16, Device::cpu, {3});
  ops::scale_inplace(t, 2.0f);
  EXPECT_EQ(x[0], 0x7C00);  // +Inf
  EXPECT_EQ(x[1], 0xFC00);  // -Inf
  EXPECT_EQ(f16_bits_to_f32(x[2]), 60000.0f);
  // 65504 is the largest f16; 65520 is the tie with the next binade and rounds up to Inf.
  std::vector<uint16_t> a{f32_to_f16_bits(32752.0f), f32_to_f16_bits(32768.0f)}, out(2);
  ops::add_forward(Tensor(out.data(), DType::f16, Device::cpu, {2}),
                   Tensor(a.data(), DType::f16, Device::cpu, {2}),
                   Tensor(a.data(), DType::f16, Device::cpu, {2}));
  EXPECT_EQ(out[0], 0x7BFF);  // 65504
  EXPECT_EQ(out[1], 0x7C00);  // 65536 -> Inf
  // A GEMM whose f32 result exceeds the f16 range: 300 * 300 = 90000.
  std::vector<uint16_t> p{f32_to_f16_bits(300.0f)}, c{0};
  ops::gemm(Tensor(c.data(), DType::f16, Device::cpu, {1, 1}),
            Tensor(p.data(), DType::f16, Device::cpu, {1, 1}),
            Tensor(p.data(), DType::f16, Device::cpu, {1, 1}), false, false, 1.0f, 0.0f);
  EXPECT_EQ(c[0], 0x7C00);
  // bf16 keeps f32's range: the same scaling stays finite.
  std::vector<uint16_t> y{f32_to_bf16_bits(61440.0f)};  // 1.875 * 2^15, exact in bf16
  ops::scale_inplace(Tensor(y.data(), DType::bf16, Device::cpu, {1}), 2.0f);
  EXPECT_EQ(bf16_bits_to_f32(y[0]), 122880.0f);
  // fill rounds its value once, overflow included
  std::vector<uint16_t> f(5);
  ops::fill(Tensor(f.data(), DType::f16, Device::cpu, {5}), 1e5f);
  for (uint16_t bits : f) EXPECT_EQ(bits, 0x7C00);
}

TEST(NarrowDtype, CastAndFill) {
  std::mt19937_64 rng(95);
  std::normal_distribution<float> normal(0.0f, 1000.0f);
  const int64_t n = 1025;
  std::vector<float> src32(n);
  for (float& v : src32) v = normal(rng);
  src32[0] = kQNaN;
  src32[1] = -kInf;
  src32[2] = 1e6f;
  src32[3] = 1e-8f;  // f16 subnormal range
  for (DType src_dt : kNarrowTypes) {
    std::vector<uint16_t> src(n);
    for (int64_t i = 0; i < n; ++i) src[i] = narrow_bits(src_dt, src32[i]);
    const Tensor src_t(src.data(), src_dt, Device::cpu, {n});
    for (DType dst_dt : kNarrowTypes) {
      std::vector<uint16_t> dst(n);
      ops::cast(Tensor(dst.data(), dst_dt, Device::cpu, {n}), src_t);
      for (int64_t i = 0; i < n; ++i) {
        const float x = widen(src_dt, src[i]);
        if (std::isnan(x))
          EXPECT_TRUE(std::isnan(widen(dst_dt, dst[i])));
        else
          EXPECT_EQ(dst[i], narrow_bits(dst_dt, x)) << i;
      }
    }
    std::vector<float> wide(n);
    ops::cast(Tensor(wide.data(), DType::f32, Device::cpu, {n}), src_t);
    for (int64_t i = 1; i < n; ++i) EXPECT_EQ(wide[i], widen(src_dt, src[i])) << i;
    std::vector<uint16_t> back(n);
    ops::cast(Tensor(back.data(), src_dt, Device::cpu, {n}),
              Tensor(src32.data(), DType::f32, Device::cpu, {n}));
    EXPECT_EQ(back, src);
    std::vector<uint16_t> filled_bits(n);
    ops::fill(Tensor(filled_bits.data(), src_dt, Device::cpu, {n}), 0.1f);
    for (uint16_t bits : filled_bits) EXPECT_EQ(bits, narrow_bits(src_dt, 0.1f));
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Elementwise, CastWritesOnlyItsOutput) {
  std::mt19937_64 rng(92);
  const HostTensor src = randn(DType::f32, {33}, rng);
  Guarded e4m3({33}, DType::e4m3), bf16({33}, DType::bf16);
  cpu::cast(e4m3, src);
  cpu::cast(bf16, src);
  expect_guards_intact({&e4m3, &bf16}, "cast");
}

TEST(Elementwise, OpsWriteOnlyTheirOutputs) {
  std::mt19937_64 rng(93);
  const HostTensor a = randn(DType::f32, {7, 19}, rng), b = randn(DType::f32, {7, 19}, rng);
  Guarded out({7, 19}), acc({7, 19}), filled_out({7, 19}, DType::bf16);
  cpu::add_forward(out, a, b);
  cpu::add_inplace(acc, b);
  cpu::scale_inplace(acc, 0.5f);
  cpu::fill(filled_out, 2.5f);
  expect_guards_intact({&out, &acc, &filled_out}, "add_forward / add_inplace / scale / fill");
}

TEST(Elementwise, OpsAreThreadCountIndependent) {
  std::mt19937_64 rng(94);
  const HostTensor a = randn(DType::f32, {300, 200}, rng), b = randn(DType::f32, {300, 200}, rng);
  HostTensor out(DType::f32, {300, 200}), acc = randn(DType::f32, {300, 200}, rng);
  std::vector<uint16_t> bits(300 * 200);
  HostTensor wide(DType::f32, {300, 200});
  expect_thread_independent("add_forward", {&out}, [&] { cpu::add_forward(out, a, b); });
  expect_thread_independent("add_inplace + scale_inplace", {&acc}, [&] {
    cpu::add_inplace(acc, b);
    cpu::scale_inplace(acc, 0.37f);
  });
  expect_thread_independent("cast f32 -> bf16 -> f32", {&wide}, [&] {
    const Tensor narrow(bits.data(), DType::bf16, Device::cpu, {300, 200});
    cpu::cast(narrow, a);
    cpu::cast(wide, narrow);
  });
  expect_thread_independent("fill", {&out}, [&] { cpu::fill(out, -1.25f); });
}

TEST(Elementwise, SumSquaresIsThreadCountIndependent) {
  std::mt19937_64 rng(84);
  const HostTensor x = randn(DType::f32, {100003}, rng);
  double serial = 0.0, parallel = 0.0;
  with_threads(1, [&] { serial = cpu::sum_squares(x); });
  with_threads(3, [&] { parallel = cpu::sum_squares(x); });
  EXPECT_EQ(serial, parallel);
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/elementwise.cu) --------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// f32 arithmetic on f32 data rounds exactly like the CPU's f32 loop: equal up to 0. bf16 outputs
// are the f32 result rounded once more: at most 2^-9 relative per element, ~1.1e-3 in L2; f16
// ones at most 2^-11, ~2.8e-4 in L2 (unit-normal inputs are far inside f16's range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-7, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

// A view that starts one element into a larger allocation: no longer 16-byte aligned.
Tensor shifted(const DeviceTensor& d, DType dtype, int64_t n) {
  return Tensor(static_cast<char*>(d.t().data) + dtype_size(dtype), dtype, Device::cuda, Shape{n});
}

std::vector<float> with_specials(std::vector<float> v) {
  if (v.size() > 3) {
    v[1] = kNan;
    v[2] = kInf;
    v[v.size() - 1] = -kInf;
  }
  return v;
}

class ElementwiseGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(ElementwiseGpu, AddForwardMatchesCpu, "add_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(1);
  for (int64_t n : {1, 7, 1025, 4097, (1 << 20) + 3}) {
    auto a = testing::round_to(dtype, with_specials(testing::random_vector(n, rng)));
    auto b = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> ref(n);
    cpu::add_forward(host(ref, {n}), host(a, {n}), host(b, {n}));
    DeviceTensor da(dtype, {n}), db(dtype, {n}), dout(dtype, {n});
    da.upload(a);
    db.upload(b);
    settle();
    ops::add_forward(dout, da, db);
    const auto out = dout.download();
    EXPECT_LE(testing::rel_l2(out, ref), tolerance(dtype)) << "n=" << n;
    testing::expect_same_nonfinite(out, ref, "add_forward");
    EXPECT_TRUE(dout.guards_intact());
    // In place: out is a.
    ops::add_forward(da, da, db);
    EXPECT_LE(testing::rel_l2(da.download(), ref), tolerance(dtype)) << "in place, n=" << n;
    EXPECT_TRUE(da.guards_intact());
  }
}

TS_GPU_PARITY_TEST_P(ElementwiseGpu, AddInplaceAndScaleMatchCpuOnMisalignedViews, "add_inplace",
                     "scale_inplace") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(2);
  for (int64_t n : {1, 9, 4099}) {
    auto dst = testing::round_to(dtype, with_specials(testing::random_vector(n + 1, rng)));
    auto src = testing::round_to(dtype, testing::random_vector(n + 1, rng));
    // Reference on elements [1, n + 1) of each buffer.
    std::vector<float> ref(dst.begin() + 1, dst.end()), src_tail(src.begin() + 1, src.end());
    cpu::add_inplace(host(ref, {n}), host(src_tail, {n}));
    cpu::scale_inplace(host(ref, {n}), -1.75f);
    DeviceTensor ddst(dtype, {n + 1}), dsrc(dtype, {n + 1});
    ddst.upload(dst);
    dsrc.upload(src);
    settle();
    const Tensor view = shifted(ddst, dtype, n);
    ops::add_inplace(view, shifted(dsrc, dtype, n));
    ops::scale_inplace(view, -1.75f);
    const auto all = ddst.download();
    EXPECT_EQ(std::bit_cast<uint32_t>(all[0]), std::bit_cast<uint32_t>(dst[0]))
        << "element before the view was written";
    const std::vector<float> out(all.begin() + 1, all.end());
    // 16-bit types round twice here (after the add and after the scale): 2 * 2^-9 (bf16) or
    // 2 * 2^-11 (f16) per element.
    EXPECT_LE(testing::rel_l2(out, ref), 2 * tolerance(dtype)) << "n=" << n;
    testing::expect_same_nonfinite(out, ref, "add_inplace + scale_inplace");
    EXPECT_TRUE(ddst.guards_intact());
  }
}

TS_GPU_PARITY_TEST_P(ElementwiseGpu, SumSquaresMatchesCpuAndIsDeterministic, "sum_squares") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(3);
  for (int64_t n : {1, 7, 4097, 3000005}) {
    auto x = testing::round_to(dtype, testing::random_vector(n, rng, 3.0f));
    const double ref = cpu::sum_squares(host(x, {n}));
    DeviceTensor dx(dtype, {n});
    dx.upload(x);
    settle();
    const double got = ops::sum_squares(dx);
    // Squares of f32 values are exact in double; only the order of the double additions
    // differs from the CPU's, ~1e-16 relative per addition.
    EXPECT_NEAR(got, ref, 1e-12 * ref) << "n=" << n;
    EXPECT_EQ(std::bit_cast<uint64_t>(ops::sum_squares(dx)), std::bit_cast<uint64_t>(got));
  }
  auto x = testing::random_vector(1001, rng);
  x[500] = kNan;
  DeviceTensor dx(dtype, {1001});
  dx.upload(x);
  settle();
  EXPECT_TRUE(std::isnan(ops::sum_squares(dx)));
  DeviceTensor misaligned(dtype, {1002});
  misaligned.upload(testing::round_to(dtype, testing::random_vector(1002, rng)));
  const auto values = misaligned.download();
  double ref = 0.0;
  for (int i = 1; i < 1002; ++i) ref += double(values[i]) * values[i];
  EXPECT_NEAR(ops::sum_squares(shifted(misaligned, dtype, 1001)), ref, 1e-12 * ref);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ElementwiseGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// f16 storage: each op is the f32 operation on the stored values, rounded once to nearest even
// (core/dtype.h's round_f16), so results match bit for bit, including overflow past 65504 to Inf
// (65504 + 15 = 65519 rounds down to 65504; 65520 is the tie, which rounds to even: Inf). FP16
// loss scaling detects overflow through these Infs, and through sum_squares seeing them.
TS_GPU_TEST(ElementwiseF16, RoundsOnceAndOverflowsToInf) {
  std::mt19937_64 rng(4);
  const int64_t n = 4099;
  auto a = testing::round_to(DType::f16, testing::random_vector(n, rng, 1000.0f));
  auto b = testing::round_to(DType::f16, testing::random_vector(n, rng, 1000.0f));
  const float pairs[][2] = {{65504.0f, 15.0f},      {65504.0f, 16.0f},     {60000.0f, 10000.0f},
                            {-60000.0f, -10000.0f}, {65504.0f, -65504.0f}, {kInf, -kInf},
                            {3e-5f, 3e-5f},         {6e-8f, 0.0f}};
  for (size_t i = 0; i < std::size(pairs); ++i) {
    a[10 * i] = round_f16(pairs[i][0]);
    b[10 * i] = round_f16(pairs[i][1]);
  }
  std::vector<float> sum(n), scaled(n);
  for (int64_t i = 0; i < n; ++i) {
    sum[i] = round_f16(a[i] + b[i]);
    scaled[i] = round_f16(sum[i] * 40.0f);  // |sum| > 1638 overflows here
  }
  ASSERT_TRUE(std::isinf(sum[10])) << "65504 + 16 must overflow in the reference too";
  ASSERT_EQ(sum[0], 65504.0f);
  DeviceTensor da(DType::f16, {n}), db(DType::f16, {n}), dout(DType::f16, {n});
  da.upload(a);
  db.upload(b);
  settle();
  ops::add_forward(dout, da, db);
  auto expect_bits = [](const std::vector<float>& got, const std::vector<float>& want,
                        const char* what) {
    for (size_t i = 0; i < got.size(); ++i) {
      const bool same = std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i]) ||
                        (std::isnan(got[i]) && std::isnan(want[i]));
      if (!same) {
        ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", want " << want[i];
        return;
      }
    }
  };
  expect_bits(dout.download(), sum, "add_forward f16");
  ops::add_inplace(da, db);
  expect_bits(da.download(), sum, "add_inplace f16");
  ops::scale_inplace(da, 40.0f);
  expect_bits(da.download(), scaled, "scale_inplace f16");
  EXPECT_TRUE(dout.guards_intact() && da.guards_intact());
  // The gradient norm of an overflowed f16 gradient is Inf (NaN when Inf - Inf made a NaN).
  EXPECT_TRUE(std::isinf(ops::sum_squares(da)) || std::isnan(ops::sum_squares(da)));
  std::vector<float> finite(n, 1.0f);
  finite[77] = kInf;
  DeviceTensor dinf(DType::f16, {n});
  dinf.upload(finite);
  settle();
  EXPECT_EQ(ops::sum_squares(dinf), std::numeric_limits<double>::infinity());
}

// ---- fill and cast: bit patterns ------------------------------------------------------------

const DType kCastable[] = {DType::f32, DType::bf16, DType::f16, DType::e4m3, DType::e5m2};

// Raw device buffer with guard bytes, for the narrow dtypes DeviceTensor cannot download.
std::vector<uint8_t> download_bytes(const Tensor& t) {
  std::vector<uint8_t> bytes(t.nbytes());
  ops::synchronize(Device::cuda);
  copy_bytes(bytes.data(), Device::cpu, t.data, Device::cuda, bytes.size());
  return bytes;
}
void upload_bytes(const Tensor& t, const std::vector<uint8_t>& bytes) {
  ASSERT_EQ(bytes.size(), t.nbytes());
  copy_bytes(t.data, Device::cuda, bytes.data(), Device::cpu, bytes.size());
}

// Element i of a host buffer as an f32 bit pattern or narrow code, for messages.
uint32_t code_at(const std::vector<uint8_t>& b, DType t, int64_t i) {
  const size_t size = dtype_size(t);
  uint32_t v = 0;
  std::memcpy(&v, b.data() + i * size, size);
  return v;
}

bool is_nan_code(uint32_t code, DType t) {
  switch (t) {
    case DType::f32: return std::isnan(std::bit_cast<float>(code));
    case DType::bf16: return std::isnan(bf16_bits_to_f32(uint16_t(code)));
    case DType::f16: return std::isnan(f16_bits_to_f32(uint16_t(code)));
    case DType::e4m3: return std::isnan(e4m3_bits_to_f32(uint8_t(code)));
    default: return std::isnan(e5m2_bits_to_f32(uint8_t(code)));
  }
}

TS_GPU_PARITY_TEST(Fill, MatchesCpuBitsForEveryDtype, "fill") {
  for (DType dtype : kCastable) {
    for (float value : {1.5f, -3.1e-3f, 1e30f, -kInf, kNan, 0.0f, 1e-40f}) {
      for (int64_t n : {1, 17, 4103}) {
        std::vector<uint8_t> ref(dtype_storage_bytes(dtype, n));
        cpu::fill(Tensor(ref.data(), dtype, Device::cpu, Shape{n}), value);
        DeviceTensor d(dtype, {n + 1});
        settle();
        const Tensor view(static_cast<char*>(d.t().data) + (n % 2) * dtype_size(dtype), dtype,
                          Device::cuda, Shape{n});
        ops::fill(view, value);
        EXPECT_EQ(download_bytes(view), ref)
            << dtype_name(dtype) << " value " << value << " n " << n;
        EXPECT_TRUE(d.guards_intact());
      }
    }
  }
}

// f32 inputs that stress narrowing: every class of bit pattern, exact ties between neighbouring
// codes of each narrow format, the subnormal ranges, and values around the largest finite ones.
std::vector<float> hard_f32_values(std::mt19937_64& rng) {
  std::vector<float> v;
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 20000; ++i) v.push_back(std::bit_cast<float>(any_bits(rng)));
  // Midpoints (ties) and near-midpoints between consecutive fp8 values, both signs.
  for (int code = 0; code < 127; ++code) {
    for (auto decode : {e4m3_bits_to_f32, e5m2_bits_to_f32}) {
      const float lo = decode(uint8_t(code)), hi = decode(uint8_t(code + 1));
      if (!std::isfinite(lo) || !std::isfinite(hi)) continue;
      const float mid = 0.5f * (lo + hi);
      for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, kInf), lo, hi})
        for (float s : {1.0f, -1.0f}) v.push_back(s * x);
    }
  }
  // Ties for bf16 and f16: an f32 whose dropped bits are exactly half.
  std::uniform_int_distribution<uint32_t> top(0, 0xFFFF);
  for (int i = 0; i < 2000; ++i) {
    v.push_back(std::bit_cast<float>((top(rng) << 16) | 0x8000u));
    v.push_back(std::bit_cast<float>((top(rng) << 16) | 0x1000u));  // f16 ties (13 dropped bits)
  }
  // Log-uniform magnitudes over the fp8/f16 subnormal-to-overflow range.
  std::uniform_real_distribution<float> exponent(-26.0f, 20.0f);
  for (int i = 0; i < 20000; ++i) v.push_back((i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng)));
  for (float x : {0.0f, -0.0f, kInf, -kInf, kNan, -kNan, 448.0f, 464.0f, 480.0f, 57344.0f, 61440.0f,
                  65504.0f, 65520.0f, 1e-45f, 3.4e38f})
    v.push_back(x);
  return v;
}

TS_GPU_PARITY_TEST(Cast, F32ToNarrowMatchesCoreDtypeBitForBit, "cast") {
  std::mt19937_64 rng(4);
  const auto values = hard_f32_values(rng);
  const int64_t n = int64_t(values.size());
  DeviceTensor src(DType::f32, {n});
  src.upload(values);
  for (DType dst_type : {DType::bf16, DType::f16, DType::e4m3, DType::e5m2}) {
    std::vector<uint8_t> ref(dtype_storage_bytes(dst_type, n));
    convert_buffer(values.data(), DType::f32, ref.data(), dst_type, n);
    DeviceTensor dst(dst_type, {n});
    settle();
    ops::cast(dst, src);
    const auto got = download_bytes(dst.t());
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n && mismatches < 10; ++i) {
      if (code_at(got, dst_type, i) != code_at(ref, dst_type, i)) {
        ++mismatches;
        ADD_FAILURE() << dtype_name(dst_type) << ": x = " << values[i] << " (bits 0x" << std::hex
                      << std::bit_cast<uint32_t>(values[i]) << "): gpu 0x"
                      << code_at(got, dst_type, i) << ", cpu 0x" << code_at(ref, dst_type, i);
      }
    }
    EXPECT_TRUE(dst.guards_intact());
  }
}

// Every source code (all of them for the narrow types) into every other castable dtype, with
// aligned (vector path) and odd-offset (scalar path) buffers.
TS_GPU_TEST(Cast, EveryDtypePairMatchesCoreDtype) {
  std::mt19937_64 rng(5);
  for (DType src_type : kCastable) {
    std::vector<uint32_t> codes;
    if (src_type == DType::f32) {
      for (float x : hard_f32_values(rng)) codes.push_back(std::bit_cast<uint32_t>(x));
    } else {
      const uint32_t num_codes = dtype_size(src_type) == 2 ? 65536u : 256u;
      for (uint32_t c = 0; c < num_codes; ++c) codes.push_back(c);
    }
    const int64_t n = int64_t(codes.size());
    const size_t src_size = dtype_size(src_type);
    std::vector<uint8_t> src_bytes(n * src_size);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&src_bytes[i * src_size], &codes[i], src_size);
    for (DType dst_type : kCastable) {
      if (dst_type == src_type) continue;
      std::vector<uint8_t> ref(dtype_storage_bytes(dst_type, n));
      convert_buffer(src_bytes.data(), src_type, ref.data(), dst_type, n);
      for (int offset : {0, 1}) {
        DeviceTensor src(src_type, {n + 1}), dst(dst_type, {n + 1});
        const Tensor s(static_cast<char*>(src.t().data) + offset * src_size, src_type, Device::cuda,
                       Shape{n});
        const Tensor d(static_cast<char*>(dst.t().data) + offset * dtype_size(dst_type), dst_type,
                       Device::cuda, Shape{n});
        settle();
        upload_bytes(s, src_bytes);
        ops::cast(d, s);
        const auto got = download_bytes(d);
        int64_t mismatches = 0;
        for (int64_t i = 0; i < n && mismatches < 5; ++i) {
          const uint32_t g = code_at(got, dst_type, i), r = code_at(ref, dst_type, i);
          // f32 NaN payloads are not specified; every narrow NaN code is.
          const bool same = g == r || (dst_type == DType::f32 && is_nan_code(g, dst_type) &&
                                       is_nan_code(r, dst_type));
          if (!same) {
            ++mismatches;
            ADD_FAILURE() << dtype_name(src_type) << " 0x" << std::hex << codes[i] << " -> "
                          << dtype_name(dst_type) << ": gpu 0x" << g << ", cpu 0x" << r
                          << " (offset " << offset << ")";
          }
        }
        EXPECT_TRUE(dst.guards_intact()) << dtype_name(src_type) << "->" << dtype_name(dst_type);
      }
    }
  }
}

TS_GPU_TEST(Cast, SameTensorIsANoOpAndOverlapIsRejected) {
  std::mt19937_64 rng(6);
  auto x = testing::random_vector(100, rng);
  DeviceTensor d(DType::f32, {100});
  d.upload(x);
  settle();
  ops::cast(d, d);
  EXPECT_EQ(d.download(), x);
  const Tensor half1(d.t().data, DType::bf16, Device::cuda, Shape{100});
  EXPECT_THROW(ops::cast(half1, d), Error);
  DeviceTensor copy(DType::f32, {100});
  settle();
  ops::cast(copy, d);
  EXPECT_EQ(copy.download(), x);
}

}  // namespace
}  // namespace tessera
