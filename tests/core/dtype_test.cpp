// Dtype metadata and bit-exact conversions. The references here are written independently of
// src/core/dtype.cpp: decoding by the textbook formula in double, encoding by searching a sorted
// table of representable values and their midpoints (no bit tricks), so a shared mistake is
// unlikely.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace tessera {
namespace {

// A narrow float format as the spec describes it, for the reference implementations below.
struct Spec {
  const char* name;
  int exp_bits;
  int mant_bits;
  int bias;
  bool ieee_specials;  // all-ones exponent is Inf/NaN (f16, bf16, E5M2); else E4M3's S.1111.111
  uint32_t sign_bit;
  uint32_t max_finite;  // magnitude code of the largest finite value
};

constexpr Spec kSpecE4M3{"e4m3", 4, 3, 7, false, 0x80, 0x7E};
constexpr Spec kSpecE5M2{"e5m2", 5, 2, 15, true, 0x80, 0x7B};
constexpr Spec kSpecF16{"f16", 5, 10, 15, true, 0x8000, 0x7BFF};
constexpr Spec kSpecBf16{"bf16", 8, 7, 127, true, 0x8000, 0x7F7F};

// sign * 2^(e - bias) * (1 + m / 2^M) for normals, sign * 2^(1 - bias) * (m / 2^M) for subnormals.
double ref_decode(uint32_t code, const Spec& s) {
  const bool neg = (code & s.sign_bit) != 0;
  const uint32_t e = (code >> s.mant_bits) & ((1u << s.exp_bits) - 1);
  const uint32_t m = code & ((1u << s.mant_bits) - 1);
  const uint32_t e_all_ones = (1u << s.exp_bits) - 1;
  double v;
  if (s.ieee_specials && e == e_all_ones) {
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (!s.ieee_specials && e == e_all_ones && m == (1u << s.mant_bits) - 1) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m) / (1 << s.mant_bits), 1 - s.bias);
  } else {
    v = std::ldexp(1.0 + static_cast<double>(m) / (1 << s.mant_bits), static_cast<int>(e) - s.bias);
  }
  return neg ? -v : v;
}

// Reference encoder: values[k] = decode(k) for the magnitude codes 0..max_finite; mids[k] is the
// midpoint above values[k] (the last one is half a top-binade quantum above the maximum, where an
// unbounded exponent range would put the next value). Returns max_finite + 1 for "overflow".
struct RefEncoder {
  Spec spec;
  std::vector<double> values;
  std::vector<double> mids;

  explicit RefEncoder(const Spec& s) : spec(s) {
    for (uint32_t k = 0; k <= s.max_finite; ++k) values.push_back(ref_decode(k, s));
    for (uint32_t k = 0; k < s.max_finite; ++k) mids.push_back((values[k] + values[k + 1]) / 2);
    mids.push_back(values.back() + (values.back() - values[s.max_finite - 1]) / 2);
  }
  // Magnitude code nearest to |x|, ties to the even code (the even mantissa).
  uint32_t magnitude_code(double mag) const {
    const auto it = std::lower_bound(mids.begin(), mids.end(), mag);  // first mid >= mag
    const uint32_t k = static_cast<uint32_t>(it - mids.begin());
    if (it != mids.end() && *it == mag && (k & 1)) return k + 1;
    return k;
  }
};

struct Fp8Case {
  Spec spec;
  std::function<uint8_t(float, bool)> encode;
  std::function<float(uint8_t)> decode;
  uint32_t overflow_code;  // magnitude code of non-saturated overflow: E5M2 Inf, E4M3 NaN
};

std::vector<Fp8Case> fp8_cases() {
  return {
      {kSpecE4M3, [](float x, bool sat) { return f32_to_e4m3_bits(x, sat); }, e4m3_bits_to_f32,
       0x7F},
      {kSpecE5M2, [](float x, bool sat) { return f32_to_e5m2_bits(x, sat); }, e5m2_bits_to_f32,
       0x7C},
  };
}

bool same_float(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

TEST(Dtype, MetadataAndParsing) {
  const DType all[] = {DType::f32,  DType::f64, DType::bf16, DType::f16, DType::e4m3,
                       DType::e5m2, DType::i8,  DType::i4,   DType::i32};
  const size_t sizes[] = {4, 8, 2, 2, 1, 1, 1, 0, 4};
  const char* names[] = {"fp32",     "fp64", "bf16", "fp16", "fp8_e4m3",
                         "fp8_e5m2", "int8", "int4", "int32"};
  for (int i = 0; i < 9; ++i) {
    EXPECT_EQ(dtype_size(all[i]), sizes[i]) << names[i];
    EXPECT_EQ(dtype_name(all[i]), names[i]);
    DType parsed = DType::i32;
    ASSERT_TRUE(parse_dtype(names[i], &parsed)) << names[i];
    EXPECT_EQ(parsed, all[i]);
    EXPECT_EQ(dtype_is_float(all[i]), i < 6) << names[i];
  }
  DType t = DType::i8;
  EXPECT_TRUE(parse_dtype("f32", &t));
  EXPECT_EQ(t, DType::f32);
  EXPECT_TRUE(parse_dtype("f16", &t));
  EXPECT_EQ(t, DType::f16);
  EXPECT_TRUE(parse_dtype("e4m3", &t));
  EXPECT_EQ(t, DType::e4m3);
  EXPECT_TRUE(parse_dtype("e5m2", &t));
  EXPECT_EQ(t, DType::e5m2);
  EXPECT_FALSE(parse_dtype("fp33", &t));
  EXPECT_FALSE(parse_dtype("", &t));
  EXPECT_FALSE(parse_dtype("FP32", &t));
  EXPECT_EQ(t, DType::e5m2);  // untouched on failure
  EXPECT_EQ(dtype_storage_bytes(DType::i4, 5), 3u);
  EXPECT_EQ(dtype_storage_bytes(DType::i4, 6), 3u);
  EXPECT_EQ(dtype_storage_bytes(DType::bf16, 7), 14u);
  EXPECT_THROW(dtype_storage_bytes(DType::f32, -1), Error);
}

TEST(Fp8, DecodeAllCodesMatchesFormula) {
  for (const Fp8Case& c : fp8_cases()) {
    for (uint32_t code = 0; code < 256; ++code) {
      const double want = ref_decode(code, c.spec);
      const float got = c.decode(static_cast<uint8_t>(code));
      EXPECT_TRUE(same_float(got, want))
          << c.spec.name << " code " << code << ": " << got << " vs " << want;
    }
  }
  // Anchors from the OCP OFP8 v1.0 tables.
  EXPECT_EQ(e4m3_bits_to_f32(0x7E), 448.0f);
  EXPECT_EQ(e4m3_bits_to_f32(0x08), 0x1.0p-6f);  // min normal
  EXPECT_EQ(e4m3_bits_to_f32(0x01), 0x1.0p-9f);  // min subnormal
  EXPECT_TRUE(std::isnan(e4m3_bits_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_bits_to_f32(0xFF)));
  EXPECT_EQ(e4m3_bits_to_f32(0x78), 256.0f);  // S.1111.000 is a number in E4M3
  EXPECT_EQ(e5m2_bits_to_f32(0x7B), 57344.0f);
  EXPECT_EQ(e5m2_bits_to_f32(0x04), 0x1.0p-14f);
  EXPECT_EQ(e5m2_bits_to_f32(0x01), 0x1.0p-16f);
  EXPECT_EQ(e5m2_bits_to_f32(0x7C), std::numeric_limits<float>::infinity());
  EXPECT_EQ(e5m2_bits_to_f32(0xFC), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(e5m2_bits_to_f32(0x7D)));
  EXPECT_TRUE(std::signbit(e5m2_bits_to_f32(0x80)));
}

TEST(Fp8, EveryRepresentableValueRoundTrips) {
  for (const Fp8Case& c : fp8_cases()) {
    for (uint32_t mag = 0; mag <= c.spec.max_finite; ++mag) {
      for (uint32_t code : {mag, mag | 0x80}) {
        const float v = c.decode(static_cast<uint8_t>(code));
        for (bool sat : {true, false})
          EXPECT_EQ(c.encode(v, sat), code) << c.spec.name << " code " << code << " sat " << sat;
      }
    }
  }
}

TEST(Fp8, MidpointsRoundToEvenAndNeighboursRoundToNearest) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const Fp8Case& c : fp8_cases()) {
    for (uint32_t k = 0; k < c.spec.max_finite; ++k) {
      const double lo = c.decode(static_cast<uint8_t>(k)),
                   hi = c.decode(static_cast<uint8_t>(k + 1));
      const float mid = static_cast<float>((lo + hi) / 2);
      ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2) << "midpoint not exact in f32";
      const uint32_t even = (k & 1) ? k + 1 : k;
      for (bool sat : {true, false}) {
        EXPECT_EQ(c.encode(mid, sat), even) << c.spec.name << " mid above code " << k;
        EXPECT_EQ(c.encode(-mid, sat), even | 0x80) << c.spec.name << " -mid above code " << k;
        EXPECT_EQ(c.encode(std::nextafter(mid, inf), sat), k + 1) << c.spec.name << " " << k;
        EXPECT_EQ(c.encode(std::nextafter(mid, 0.0f), sat), k) << c.spec.name << " " << k;
        EXPECT_EQ(c.encode(-std::nextafter(mid, inf), sat), (k + 1) | 0x80) << c.spec.name;
        EXPECT_EQ(c.encode(-std::nextafter(mid, 0.0f), sat), k | 0x80) << c.spec.name;
      }
    }
  }
}

TEST(Fp8, OverflowSaturatesOrGivesInfNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  // E4M3: 464 is halfway between 448 (mantissa 110) and the unrepresentable 480: ties to 448.
  EXPECT_EQ(f32_to_e4m3_bits(464.0f, false), 0x7E);
  EXPECT_EQ(f32_to_e4m3_bits(std::nextafter(464.0f, inf), false), 0x7F);  // NaN: no Inf in E4M3
  EXPECT_EQ(f32_to_e4m3_bits(std::nextafter(464.0f, inf), true), 0x7E);
  EXPECT_EQ(f32_to_e4m3_bits(-1e30f, false), 0xFF);
  EXPECT_EQ(f32_to_e4m3_bits(-1e30f, true), 0xFE);
  EXPECT_EQ(f32_to_e4m3_bits(inf, false), 0x7F);
  EXPECT_EQ(f32_to_e4m3_bits(inf, true), 0x7E);
  EXPECT_EQ(f32_to_e4m3_bits(-inf, true), 0xFE);
  EXPECT_EQ(f32_to_e4m3_bits(std::numeric_limits<float>::max(), true), 0x7E);
  // E5M2: 61440 is halfway between 57344 (mantissa 11, odd) and 65536: ties to even = Inf.
  EXPECT_EQ(f32_to_e5m2_bits(61440.0f, false), 0x7C);
  EXPECT_EQ(f32_to_e5m2_bits(61440.0f, true), 0x7B);
  EXPECT_EQ(f32_to_e5m2_bits(std::nextafter(61440.0f, 0.0f), false), 0x7B);
  EXPECT_EQ(f32_to_e5m2_bits(-1e30f, false), 0xFC);
  EXPECT_EQ(f32_to_e5m2_bits(-1e30f, true), 0xFB);
  EXPECT_EQ(f32_to_e5m2_bits(inf, false), 0x7C);
  EXPECT_EQ(f32_to_e5m2_bits(inf, true), 0x7B);
  EXPECT_EQ(f32_to_e5m2_bits(-inf, false), 0xFC);
  // The default is saturating, as training uses.
  EXPECT_EQ(f32_to_e4m3_bits(1000.0f), 0x7E);
  EXPECT_EQ(f32_to_e5m2_bits(1e6f), 0x7B);
  EXPECT_EQ(round_e4m3(-1000.0f), -448.0f);
}

TEST(Fp8, NanStaysNanAndZeroKeepsItsSign) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const Fp8Case& c : fp8_cases()) {
    for (bool sat : {true, false}) {
      EXPECT_TRUE(std::isnan(c.decode(c.encode(nan, sat)))) << c.spec.name;
      EXPECT_TRUE(std::isnan(c.decode(c.encode(-nan, sat)))) << c.spec.name;
      EXPECT_EQ(c.encode(-0.0f, sat), 0x80) << c.spec.name;
      EXPECT_EQ(c.encode(0.0f, sat), 0x00) << c.spec.name;
      EXPECT_EQ(c.encode(-1e-30f, sat), 0x80) << c.spec.name;  // underflow keeps the sign
      EXPECT_EQ(c.encode(1e-45f, sat), 0x00) << c.spec.name;   // f32 subnormal input
    }
  }
  EXPECT_EQ(f32_to_e4m3_bits(nan), 0x7F);
  EXPECT_EQ(f32_to_e4m3_bits(-nan), 0xFF);
}

// Random inputs over a wide exponent range against the table-search reference.
template <class Encode>
void expect_matches_reference(const Spec& spec, Encode encode, bool saturate, uint32_t overflow_mag,
                              int min_exp, int max_exp, int num_samples) {
  const RefEncoder ref(spec);
  std::mt19937 gen(1234);
  std::uniform_int_distribution<uint32_t> mant(0, (1u << 23) - 1);
  std::uniform_int_distribution<int> exp(min_exp, max_exp);
  for (int i = 0; i < num_samples; ++i) {
    // Biased exponent field 0 gives f32 subnormals; values are drawn with both signs.
    const int e = exp(gen);
    const uint32_t bits = (static_cast<uint32_t>(i & 1) << 31) |
                          (static_cast<uint32_t>(std::max(e + 127, 0)) << 23) | mant(gen);
    const float x = std::bit_cast<float>(bits);
    uint32_t mag = ref.magnitude_code(std::fabs(static_cast<double>(x)));
    if (mag > spec.max_finite) mag = saturate ? spec.max_finite : overflow_mag;
    const uint32_t want = (std::signbit(x) ? spec.sign_bit : 0) | mag;
    ASSERT_EQ(static_cast<uint32_t>(encode(x)), want)
        << spec.name << " x=" << x << " bits " << bits;
  }
}

TEST(Fp8, RandomInputsMatchTableSearch) {
  for (bool sat : {true, false}) {
    expect_matches_reference(
        kSpecE4M3, [&](float x) { return f32_to_e4m3_bits(x, sat); }, sat, 0x7F, -127, 12, 40000);
    expect_matches_reference(
        kSpecE5M2, [&](float x) { return f32_to_e5m2_bits(x, sat); }, sat, 0x7C, -127, 20, 40000);
  }
}

TEST(Half, ExhaustiveDecodeAndRoundTrip) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const double want_f16 = ref_decode(b, kSpecF16);
    const double want_bf16 = ref_decode(b, kSpecBf16);
    ASSERT_TRUE(same_float(f16_bits_to_f32(bits), want_f16)) << "f16 " << b;
    ASSERT_TRUE(same_float(bf16_bits_to_f32(bits), want_bf16)) << "bf16 " << b;
    if (!std::isnan(want_f16)) {
      ASSERT_EQ(f32_to_f16_bits(f16_bits_to_f32(bits)), bits) << "f16 " << b;
    } else {
      ASSERT_TRUE(std::isnan(f16_bits_to_f32(f32_to_f16_bits(f16_bits_to_f32(bits)))));
    }
    if (!std::isnan(want_bf16)) {
      ASSERT_EQ(f32_to_bf16_bits(bf16_bits_to_f32(bits)), bits) << "bf16 " << b;
    } else {
      ASSERT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(bf16_bits_to_f32(bits)))));
    }
  }
}

TEST(Half, AllMidpointsRoundToEven) {
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    Spec spec;
    uint16_t (*encode)(float);
    float (*decode)(uint16_t);
  };
  const Case cases[] = {{kSpecF16, f32_to_f16_bits, f16_bits_to_f32},
                        {kSpecBf16, f32_to_bf16_bits, bf16_bits_to_f32}};
  for (const Case& c : cases) {
    // k runs to max_finite inclusive: the last pair is (max, Inf), where the "midpoint" is the
    // overflow threshold and ties go to Inf because max has an odd mantissa.
    for (uint32_t k = 0; k <= c.spec.max_finite; ++k) {
      const double lo = c.decode(static_cast<uint16_t>(k));
      const double hi = k < c.spec.max_finite ? static_cast<double>(c.decode(k + 1))
                                              : lo + (lo - c.decode(k - 1));
      const float mid = static_cast<float>((lo + hi) / 2);
      ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2) << c.spec.name << " " << k;
      const uint32_t even = (k & 1) ? k + 1 : k;
      ASSERT_EQ(c.encode(mid), even) << c.spec.name << " mid above " << k;
      ASSERT_EQ(c.encode(-mid), even | 0x8000) << c.spec.name << " -mid above " << k;
      ASSERT_EQ(c.encode(std::nextafter(mid, inf)), k + 1) << c.spec.name << " " << k;
      ASSERT_EQ(c.encode(std::nextafter(mid, 0.0f)), k) << c.spec.name << " " << k;
    }
  }
}

TEST(Half, OverflowSubnormalsAndSpecials) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(f32_to_f16_bits(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16_bits(65520.0f), 0x7C00);  // tie between 65504 (odd) and 65536 -> Inf
  EXPECT_EQ(f32_to_f16_bits(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(f32_to_f16_bits(-1e6f), 0xFC00);
  EXPECT_EQ(f32_to_f16_bits(inf), 0x7C00);
  EXPECT_EQ(f32_to_f16_bits(0x1.0p-14f), 0x0400);  // min normal
  EXPECT_EQ(f32_to_f16_bits(0x1.0p-24f), 0x0001);  // min subnormal
  EXPECT_EQ(f32_to_f16_bits(0x1.0p-25f), 0x0000);  // tie with 0 -> even
  EXPECT_EQ(f32_to_f16_bits(std::nextafter(0x1.0p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16_bits(0x1.8p-24f), 0x0002);    // tie between 1 and 2 -> 2
  EXPECT_EQ(f32_to_f16_bits(0x1.ff8p-15f), 0x03FF);  // max subnormal
  EXPECT_EQ(f32_to_f16_bits(0x1.ffcp-15f), 0x0400);  // tie above it carries into the exponent
  EXPECT_EQ(f32_to_f16_bits(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16_bits(-1e-30f), 0x8000);
  EXPECT_TRUE(std::isnan(f16_bits_to_f32(f32_to_f16_bits(nan))));
  EXPECT_EQ(f16_bits_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f32_to_bf16_bits(std::numeric_limits<float>::max()), 0x7F80);  // above the tie
  EXPECT_EQ(f32_to_bf16_bits(-inf), 0xFF80);
  EXPECT_EQ(f32_to_bf16_bits(0x1.0p-133f), 0x0001);  // bf16 subnormal (from an f32 subnormal)
  EXPECT_EQ(f32_to_bf16_bits(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(nan))));
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(std::bit_cast<float>(0x7F800001u)))))
      << "a signalling NaN whose payload sits in the dropped half must not become Inf";
  EXPECT_EQ(round_bf16(1.0f + 0x1.0p-8f), 1.0f);  // tie -> even
  EXPECT_EQ(round_f16(1.0f + 0x1.0p-11f + 0x1.0p-20f), 1.0f + 0x1.0p-10f);
}

TEST(Half, RandomInputsMatchTableSearch) {
  expect_matches_reference(kSpecF16, f32_to_f16_bits, false, 0x7C00, -127, 17, 60000);
  expect_matches_reference(kSpecBf16, f32_to_bf16_bits, false, 0x7F80, -127, 127, 60000);
}

TEST(Int4, PackUnpackAllPairs) {
  std::vector<int8_t> values;
  for (int a = -8; a <= 7; ++a)
    for (int b = -8; b <= 7; ++b) {
      values.push_back(static_cast<int8_t>(a));
      values.push_back(static_cast<int8_t>(b));
    }
  std::vector<uint8_t> packed(values.size() / 2);
  pack_int4(values.data(), static_cast<int64_t>(values.size()), packed.data());
  std::vector<int8_t> back(values.size());
  unpack_int4(packed.data(), static_cast<int64_t>(values.size()), back.data());
  EXPECT_EQ(back, values);

  const int8_t two[] = {1, -1};  // element 0 in the low nibble
  uint8_t byte = 0;
  pack_int4(two, 2, &byte);
  EXPECT_EQ(byte, 0xF1);
  const int8_t odd[] = {3, -2, 7};  // odd count: the last high nibble is zero
  uint8_t bytes[2] = {0xAA, 0xAA};
  pack_int4(odd, 3, bytes);
  EXPECT_EQ(bytes[0], 0xE3);
  EXPECT_EQ(bytes[1], 0x07);
  const int8_t bad[] = {0, 8};
  EXPECT_THROW(pack_int4(bad, 2, bytes), Error);
  const int8_t bad_neg[] = {-9};
  EXPECT_THROW(pack_int4(bad_neg, 1, bytes), Error);
}

TEST(ConvertBuffer, RoundsOnceFromDouble) {
  // 1 + 2^-8 + 2^-40 is just above the bf16 midpoint between 1 and 1 + 2^-7. Via f32 it would
  // first round to the midpoint and then tie to 1.0: the conversion must not double-round.
  const double x = 1.0 + 0x1.0p-8 + 0x1.0p-40;
  uint16_t b = 0;
  convert_buffer(&x, DType::f64, &b, DType::bf16, 1);
  EXPECT_EQ(b, 0x3F81);
  const double y = 1.0 + 0x1.0p-11 + 0x1.0p-40;  // same trap for f16 (1 and 1 + 2^-10)
  convert_buffer(&y, DType::f64, &b, DType::f16, 1);
  EXPECT_EQ(b, 0x3C01);
  const double z = 1.0625 + 0x1.0p-40;  // and for E4M3 (1 and 1.125)
  uint8_t q = 0;
  convert_buffer(&z, DType::f64, &q, DType::e4m3, 1);
  EXPECT_EQ(q, 0x39);
  const double tie = 1.0625;  // an exact tie still goes to even
  convert_buffer(&tie, DType::f64, &q, DType::e4m3, 1);
  EXPECT_EQ(q, 0x38);
}

TEST(ConvertBuffer, FloatPathsAgreeWithScalarConversions) {
  std::mt19937 gen(99);
  std::vector<float> src(4096);
  for (float& v : src) {
    v = std::bit_cast<float>(static_cast<uint32_t>(gen()));
    if (std::isnan(v)) v = 1.5f;  // NaN payloads are allowed to differ between paths
  }
  const int64_t n = static_cast<int64_t>(src.size());
  std::vector<uint16_t> b16(n), h16(n);
  std::vector<uint8_t> f8a(n), f8b(n);
  convert_buffer(src.data(), DType::f32, b16.data(), DType::bf16, n);
  convert_buffer(src.data(), DType::f32, h16.data(), DType::f16, n);
  convert_buffer(src.data(), DType::f32, f8a.data(), DType::e4m3, n);
  convert_buffer(src.data(), DType::f32, f8b.data(), DType::e5m2, n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(b16[i], f32_to_bf16_bits(src[i])) << src[i];
    ASSERT_EQ(h16[i], f32_to_f16_bits(src[i])) << src[i];
    ASSERT_EQ(f8a[i], f32_to_e4m3_bits(src[i], true)) << src[i];
    ASSERT_EQ(f8b[i], f32_to_e5m2_bits(src[i], true)) << src[i];
  }
  std::vector<float> back(n);
  convert_buffer(h16.data(), DType::f16, back.data(), DType::f32, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(same_float(back[i], f16_bits_to_f32(h16[i])));
}

// The fast widenings (bf16/f16 -> f32) and the fast f32 -> bf16 rounding give the bits of the
// general path, which reads every element as a double (an f64 source always takes it): on every
// 16-bit pattern, NaNs included, and on sampled f32 patterns with their NaNs.
TEST(ConvertBuffer, FastPathsEqualTheGeneralPath) {
  std::vector<uint16_t> all(65536);
  for (uint32_t b = 0; b < 65536; ++b) all[b] = static_cast<uint16_t>(b);
  for (DType t : {DType::bf16, DType::f16}) {
    std::vector<float> fast(65536);
    std::vector<double> wide(65536);
    convert_buffer(all.data(), t, fast.data(), DType::f32, 65536);
    convert_buffer(all.data(), t, wide.data(), DType::f64, 65536);
    std::vector<float> general(65536);
    for (int i = 0; i < 65536; ++i) general[i] = static_cast<float>(wide[i]);
    for (int i = 0; i < 65536; ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(fast[i]), std::bit_cast<uint32_t>(general[i]))
          << dtype_name(t) << " pattern " << i;
  }
  std::mt19937 gen(7);
  std::vector<float> src(1 << 16);
  for (float& v : src) v = std::bit_cast<float>(static_cast<uint32_t>(gen()));
  src[0] = std::bit_cast<float>(0x7F800001u);  // a signalling NaN
  src[1] = std::bit_cast<float>(0xFFC00000u);
  src[2] = std::bit_cast<float>(0x7F7FFFFFu);  // rounds up to Inf
  const int64_t n = static_cast<int64_t>(src.size());
  std::vector<double> wide(src.begin(), src.end());
  std::vector<uint16_t> fast(n), general(n);
  convert_buffer(src.data(), DType::f32, fast.data(), DType::bf16, n);
  convert_buffer(wide.data(), DType::f64, general.data(), DType::bf16, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(fast[i], general[i]) << "f32 bits " << i;
}

TEST(ConvertBuffer, IntegersRoundToEvenAndSaturate) {
  const float src[] = {2.5f,  3.5f,   -2.5f,   -0.5f,
                       1.49f, 200.0f, -300.0f, std::numeric_limits<float>::quiet_NaN()};
  const int8_t want_i8[] = {2, 4, -2, 0, 1, 127, -128, 0};
  int8_t i8[8];
  convert_buffer(src, DType::f32, i8, DType::i8, 8);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(i8[i], want_i8[i]) << src[i];

  const double big[] = {3e9, -3e9, 2147483646.5, -7.5};
  const int32_t want_i32[] = {INT32_MAX, INT32_MIN, 2147483646, -8};
  int32_t i32[4];
  convert_buffer(big, DType::f64, i32, DType::i32, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(i32[i], want_i32[i]) << big[i];

  const float q[] = {7.6f, -8.4f, 0.5f, 1.5f, -3.0f};
  uint8_t packed[3];
  convert_buffer(q, DType::f32, packed, DType::i4, 5);
  int8_t unpacked[5];
  unpack_int4(packed, 5, unpacked);
  const int8_t want_i4[] = {7, -8, 0, 2, -3};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(unpacked[i], want_i4[i]) << q[i];
  EXPECT_EQ(packed[2] >> 4, 0);
  float back[5];
  convert_buffer(packed, DType::i4, back, DType::f32, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back[i], want_i4[i]);

  const int32_t ints[] = {16777217, -3};  // 2^24 + 1 is not an f32: ties to even 2^24
  float f[2];
  convert_buffer(ints, DType::i32, f, DType::f32, 2);
  EXPECT_EQ(f[0], 16777216.0f);
  EXPECT_EQ(f[1], -3.0f);
}

}  // namespace
}  // namespace tessera
