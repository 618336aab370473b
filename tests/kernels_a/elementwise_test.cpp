// add_forward, add_inplace, scale_inplace, fill, cast and sum_squares: exact results, aliasing,
// bit patterns of the narrow float types, correct rounding from f64 (no double rounding through
// f32), fp8 saturation, NaN, and the chunked double-precision sum of squares.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

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

}  // namespace
}  // namespace tessera::testing
