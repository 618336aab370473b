// Tests of the host integer quantizer (kernels/quantize.h, kernels/cpu/quantize.cpp), the contract
// the fake-quantization ops and the exporters share: hand-computed codes, fp16 scales and values
// (x.5 boundaries, the int4 signed maximum and its ties, negative maxima, the int4 clamp, zero
// groups), group = K against smaller groups, and bounds on random awkward sizes.
// Shape letters: R rows, K columns, G = K / group.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/quant_math.h"
#include "kernels/quantize.h"

namespace tessera::testing {
namespace {

using quant::IntBits;

struct Quantized {
  std::vector<int8_t> codes;     // (R,K)
  std::vector<uint16_t> scales;  // (R,G)
  std::vector<float> values;     // (R,K) dequantized
};

Quantized run(const std::vector<float>& w, int64_t rows, int64_t cols, IntBits bits,
              int64_t group) {
  Quantized q{std::vector<int8_t>(w.size()), std::vector<uint16_t>(rows * (cols / group)),
              std::vector<float>(w.size())};
  quant::quantize_rows(w.data(), rows, cols, bits, group, q.codes.data(), q.scales.data());
  quant::dequantize_rows(q.codes.data(), q.scales.data(), rows, cols, group, q.values.data());
  return q;
}

std::vector<int> as_ints(const std::vector<int8_t>& c) { return {c.begin(), c.end()}; }

// Bit patterns, so that -0 and +0 differ.
void expect_bits(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
        << "element " << i << ": " << got[i] << " vs " << want[i];
}

TEST(Quantize, Int8ExactScaleRoundsHalfAwayFromZero) {
  // amax 127: d = 1 exactly (fp16 0x3C00), q = roundf(x), halves away from zero.
  const std::vector<float> w = {127.0f, -3.5f, 2.5f, 0.49f, -0.5f, 100.4f, -126.5f, 0.5f};
  const Quantized q = run(w, 1, 8, IntBits::int8, 8);
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{127, -4, 3, 0, -1, 100, -127, 1}));
  EXPECT_EQ(q.scales, (std::vector<uint16_t>{0x3C00}));
  expect_bits(q.values, {127, -4, 3, 0, -1, 100, -127, 1});
}

TEST(Quantize, Int8NegativeMaxAndHalves) {
  // amax 254 from a negative element: d = 2 (0x4000), x / 2 at .5 boundaries.
  const std::vector<float> w = {5.0f, -254.0f, -5.0f, 3.0f, 1.0f, -1.0f, 0.0f, 253.0f};
  const Quantized q = run(w, 1, 8, IntBits::int8, 8);
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{3, -127, -3, 2, 1, -1, 0, 127}));
  EXPECT_EQ(q.scales, (std::vector<uint16_t>{0x4000}));
  expect_bits(q.values, {6, -254, -6, 4, 2, -2, 0, 254});
}

TEST(Quantize, Int8ScaleIsRoundedToFp16ButCodesUseTheF32Scale) {
  // amax 1: d = 1/127 = 0.0078740157 in f32; fp16 keeps 2^-7 (1 + 8/1024) = 0.00787353515625
  // (bits: exponent 8, mantissa 8). The value of code 127 is 127 times that, in f32.
  const std::vector<float> w = {1.0f, -0.5f, 0.25f, 0.0f};
  const Quantized q = run(w, 1, 4, IntBits::int8, 4);
  EXPECT_EQ(q.scales, (std::vector<uint16_t>{0x2008}));
  // 0.5 * 127 = 63.5 -> 64 (away from zero); 0.25 * 127 = 31.75 -> 32.
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{127, -64, 32, 0}));
  EXPECT_EQ(q.values[0], 0.99993896484375f);
  EXPECT_EQ(q.values[1], -64 * 0.00787353515625f);
}

TEST(Quantize, Int4NegativeMaxGivesPositiveScale) {
  // Signed max -8: d = -8 / -8 = 1; q = min(15, trunc(x + 8.5)) - 8, i.e. halves round up.
  const std::vector<float> w = {1.0f, -8.0f, 2.5f, -2.5f, 0.49f, 7.6f, 7.4f, -7.5f};
  const Quantized q = run(w, 1, 8, IntBits::int4, 8);
  // 7.6 + 8.5 = 16.1 -> clamped to 15 -> 7; 7.4 -> 15.9 -> 15 -> 7; -7.5 -> 1.0 -> -7.
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{1, -8, 3, -2, 0, 7, 7, -7}));
  EXPECT_EQ(q.scales, (std::vector<uint16_t>{0x3C00}));
  expect_bits(q.values, {1, -8, 3, -2, 0, 7, 7, -7});
}

TEST(Quantize, Int4PositiveMaxGivesNegativeScale) {
  // Signed max +8: d = -1 (0xBC00); the max itself gets code -8 (value 8), and x = 7.6 as well
  // (-7.6 + 8.5 = 0.9 -> 0 -> -8): GGML's rule maps the top of the range onto the -8 code.
  const std::vector<float> w = {8.0f, -4.0f, 7.6f, 1.0f};
  const Quantized q = run(w, 1, 4, IntBits::int4, 4);
  EXPECT_EQ(as_ints(q.codes), (std::vector<int>{-8, 4, -8, -1}));
  EXPECT_EQ(q.scales, (std::vector<uint16_t>{0xBC00}));
  expect_bits(q.values, {8, -4, 8, 1});
}

TEST(Quantize, Int4TiesTakeTheFirstElementOfLargestMagnitude) {
  // |3| = |-3|: the first decides the sign of d. 3 first: d = -0.375 (0xB600), 3 -> code -8 and
  // -3 -> 8 + 8.5 = 16.5 -> clamped 15 -> 7 (value -2.625). -3 first: the mirror image.
  const Quantized a = run({3.0f, -3.0f, 1.0f, 0.0f}, 1, 4, IntBits::int4, 4);
  EXPECT_EQ(a.scales, (std::vector<uint16_t>{0xB600}));
  EXPECT_EQ(as_ints(a.codes), (std::vector<int>{-8, 7, -3, 0}));
  expect_bits(a.values, {3.0f, -2.625f, 1.125f, -0.0f});
  const Quantized b = run({-3.0f, 3.0f, 1.0f, 0.0f}, 1, 4, IntBits::int4, 4);
  EXPECT_EQ(b.scales, (std::vector<uint16_t>{0x3600}));
  EXPECT_EQ(as_ints(b.codes), (std::vector<int>{-8, 7, 3, 0}));
  expect_bits(b.values, {-3.0f, 2.625f, 1.125f, 0.0f});
}

TEST(Quantize, ZeroGroupsHaveZeroScaleAndCodes) {
  // Two groups of 4 per row; the second group of each row is all zeros (one with -0). int8:
  // d = 0 / 127 = +0; int4: d = 0 / -8 = -0 (fp16 0x8000), so its values are -0 (q = 0 times
  // -0), as GGML stores and dequantizes them.
  const std::vector<float> w = {1.0f, 2.0f, 3.0f, 127.0f, 0.0f, -0.0f, 0.0f, 0.0f};
  const Quantized q8 = run(w, 1, 8, IntBits::int8, 4);
  EXPECT_EQ(q8.scales[1], 0x0000);
  EXPECT_EQ(as_ints(q8.codes), (std::vector<int>{1, 2, 3, 127, 0, 0, 0, 0}));
  expect_bits(q8.values, {1, 2, 3, 127, 0, 0, 0, 0});
  const Quantized q4 = run(w, 1, 8, IntBits::int4, 4);
  EXPECT_EQ(q4.scales[1], 0x8000);
  for (int k = 4; k < 8; ++k) {
    EXPECT_EQ(q4.codes[k], 0);
    EXPECT_EQ(std::bit_cast<uint32_t>(q4.values[k]), 0x80000000u) << k;
  }
}

TEST(Quantize, GroupEqualToKIsOneScalePerRow) {
  // Two rows of 8. group 8 (per output channel): one scale per row from the row's amax; group 4:
  // the small half keeps its own, finer scale.
  const std::vector<float> w = {127.0f, 1.0f, 2.0f, 3.0f, 0.5f, 0.25f, -1.0f, 1.0f,
                                -2.0f,  1.0f, 0.0f, 0.0f, 0.0f, 0.0f,  0.0f,  254.0f};
  const Quantized whole = run(w, 2, 8, IntBits::int8, 8);
  EXPECT_EQ(whole.scales, (std::vector<uint16_t>{0x3C00, 0x4000}));
  EXPECT_EQ(as_ints(whole.codes),
            (std::vector<int>{127, 1, 2, 3, 1, 0, -1, 1, -1, 1, 0, 0, 0, 0, 0, 127}));
  const Quantized halves = run(w, 2, 8, IntBits::int8, 4);
  ASSERT_EQ(halves.scales.size(), 4u);
  EXPECT_EQ(halves.scales[0], 0x3C00);
  EXPECT_EQ(halves.scales[1], quant::scale_to_f16_bits(1.0f / 127.0f));
  EXPECT_EQ(halves.codes[4], 64);  // 0.5 * 127 = 63.5 -> 64
  EXPECT_EQ(halves.codes[6], -127);
  EXPECT_EQ(halves.scales[2], quant::scale_to_f16_bits(2.0f / 127.0f));
}

// Random awkward shapes: codes in range, each group's scale is fp16 of its rule, the values are
// the codes times that scale, and every value lies within half a step of x (int8) or within the
// rounding of the int4 grid (one step on the clamped edge).
TEST(Quantize, RandomAwkwardSizesKeepTheRules) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  struct Case {
    int64_t rows, cols, group;
    IntBits bits;
  };
  for (const Case& c : {Case{3, 96, 32, IntBits::int8}, Case{5, 1088, 64, IntBits::int4},
                        Case{1, 7, 7, IntBits::int8}, Case{17, 384, 128, IntBits::int4},
                        Case{2, 1025, 1025, IntBits::int8}, Case{9, 160, 32, IntBits::int4}}) {
    std::vector<float> w(c.rows * c.cols);
    for (float& x : w) x = normal(rng);
    const Quantized q = run(w, c.rows, c.cols, c.bits, c.group);
    const int64_t groups = c.cols / c.group;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        float amax = 0.0f, signed_max = 0.0f;
        for (int64_t j = 0; j < c.group; ++j) {
          const float x = w[r * c.cols + g * c.group + j];
          if (std::fabs(x) > amax) amax = std::fabs(x), signed_max = x;
        }
        const float d = c.bits == IntBits::int8 ? amax / 127.0f : signed_max / -8.0f;
        ASSERT_EQ(q.scales[r * groups + g], f32_to_f16_bits(d));
        const float step = std::fabs(f16_bits_to_f32(f32_to_f16_bits(d)));
        for (int64_t j = 0; j < c.group; ++j) {
          const int64_t i = r * c.cols + g * c.group + j;
          const int code = q.codes[i];
          if (c.bits == IntBits::int8)
            ASSERT_TRUE(code >= -127 && code <= 127) << code;
          else
            ASSERT_TRUE(code >= -8 && code <= 7) << code;
          ASSERT_EQ(q.values[i], float(code) * f16_bits_to_f32(f32_to_f16_bits(d)));
          // The f32 d and its fp16 rounding differ by 2^-11 relative: at most |q| 2^-11 d more.
          ASSERT_LE(std::fabs(q.values[i] - w[i]), 1.01f * step) << "row " << r << " col " << i;
        }
      }
    }
  }
}

TEST(Quantize, DequantizeIsTheInverseMapOfCodes) {
  // Arbitrary codes and scales (not from quantize_rows): dequantize_rows is q * fp16 scale.
  const std::vector<int8_t> codes = {-8, 7, 0, 1, -127, 127};
  const std::vector<uint16_t> scales = {0x3800, 0xC000};  // 0.5, -2 (groups of 3)
  std::vector<float> out(6);
  quant::dequantize_rows(codes.data(), scales.data(), 1, 6, 3, out.data());
  expect_bits(out, {-4.0f, 3.5f, 0.0f, -2.0f, 254.0f, -254.0f});
}

}  // namespace
}  // namespace tessera::testing
