// CPU references of the FP8 ops (kernels/ops_fp8.h): quantize against the scalar conversions of
// core/dtype.h and hand-computed codes, the fused transpose, amax accumulation (NaN/Inf too), the
// scaled GEMM against an independent double-precision product, and the delayed-scaling update
// (history shift, max vs most_recent, margin, amax 0 / Inf / NaN, scale overflow).
#include <gtest/gtest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/ops_fp8.h"

namespace tessera {
namespace {

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
Tensor host(std::vector<uint8_t>& v, DType t, Shape s) {
  return Tensor(v.data(), t, Device::cpu, s);
}
Tensor host(std::vector<uint16_t>& v, DType t, Shape s) {
  return Tensor(v.data(), t, Device::cpu, s);
}

// The expected code of one product, written out independently of kernels/cpu/fp8.cpp.
uint8_t expected_code(float product, DType format) {
  if (std::isnan(product)) return 0x7F;
  return format == DType::e4m3 ? f32_to_e4m3_bits(product, true) : f32_to_e5m2_bits(product, true);
}

// Random values with the hard cases mixed in: around each format's max, subnormals and exact
// ties of both formats, signed zeros, infinities and NaN.
std::vector<float> tricky_values(int64_t n, std::mt19937_64& rng) {
  const float specials[] = {0.0f,
                            -0.0f,
                            448.0f,
                            -448.0f,
                            464.0f,
                            465.0f,
                            480.0f,
                            57344.0f,
                            61440.0f,
                            65536.0f,
                            1e30f,
                            -1e30f,
                            std::ldexp(1.0f, -9),
                            std::ldexp(1.0f, -10),
                            std::ldexp(3.0f, -10),
                            std::ldexp(5.0f, -11),
                            std::ldexp(1.0f, -16),
                            std::ldexp(1.0f, -17),
                            std::ldexp(3.0f, -17),
                            1.0625f,
                            1.1875f,
                            1.125f,
                            1.375f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            1e-40f,
                            -1e-40f};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 9), exp(-20, 18);
  std::uniform_int_distribution<size_t> which(0, std::size(specials) - 1);
  std::vector<float> v(n);
  for (auto& x : v) {
    const int p = pick(rng);
    if (p == 0)
      x = specials[which(rng)];
    else if (p < 3)
      x = std::ldexp(normal(rng), exp(rng));  // every binade, subnormals too
    else
      x = 40.0f * normal(rng);
  }
  return v;
}

TEST(Fp8Quantize, KnownCodes) {
  // Hand-computed OCP codes: E4M3 max 448 = 0x7E, min subnormal 2^-9 = 0x01; E5M2 max 57344 =
  // 0x7B, min subnormal 2^-16 = 0x01. Ties go to even; overflow and Inf saturate; NaN -> 0x7F.
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    float x;
    uint8_t e4m3, e5m2;
  };
  const Case cases[] = {
      {448.0f, 0x7E, 0x5F},
      {500.0f, 0x7E, 0x60},
      {-inf, 0xFE, 0xFB},
      {57344.0f, 0x7E, 0x7B},
      {1e9f, 0x7E, 0x7B},
      {std::ldexp(1.0f, -9), 0x01, 0x18},
      {std::ldexp(1.0f, -10), 0x00, 0x14},
      {std::ldexp(3.0f, -10), 0x02, 0x1A},
      {std::ldexp(1.0f, -17), 0x00, 0x00},
      {std::ldexp(3.0f, -17), 0x00, 0x02},
      {-0.0f, 0x80, 0x80},
      {1.0625f, 0x38, 0x3C},
      {1.1875f, 0x3A, 0x3D},
      {std::numeric_limits<float>::quiet_NaN(), 0x7F, 0x7F},
      {-std::numeric_limits<float>::quiet_NaN(), 0x7F, 0x7F},
  };
  for (const Case& c : cases) {
    for (DType format : {DType::e4m3, DType::e5m2}) {
      std::vector<float> in{c.x}, amax{0.0f}, scale{1.0f};
      std::vector<uint8_t> out(1, 0xAA);
      ops::fp8_quantize(host(out, format, {1, 1}), {}, host(amax, {1}), host(in, {1, 1}),
                        host(scale, {1}));
      EXPECT_EQ(int(out[0]), int(format == DType::e4m3 ? c.e4m3 : c.e5m2))
          << c.x << " as " << dtype_name(format);
    }
  }
}

TEST(Fp8Quantize, MatchesScalarConversionsWithTranspose) {
  std::mt19937_64 rng(11);
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},   {1, 67},  {67, 1},   {37, 53},
                                                {64, 64}, {130, 7}, {200, 150}};
  for (auto [rows, cols] : shapes) {
    for (DType in_type : {DType::f32, DType::bf16, DType::f16}) {
      for (DType format : {DType::e4m3, DType::e5m2}) {
        const int64_t n = rows * cols;
        std::vector<float> x = tricky_values(n, rng);
        std::vector<uint16_t> x16(n);
        if (in_type != DType::f32)
          for (int64_t i = 0; i < n; ++i) {
            x16[i] = in_type == DType::bf16 ? f32_to_bf16_bits(x[i]) : f32_to_f16_bits(x[i]);
            x[i] = in_type == DType::bf16 ? bf16_bits_to_f32(x16[i]) : f16_bits_to_f32(x16[i]);
          }
        // A scale that is not a power of two, so the f32 product rounds.
        std::vector<float> scale{format == DType::e4m3 ? 3.7f : 0.3f}, amax{0.0f};
        std::vector<uint8_t> out(n, 0xAA), out_t(n, 0xAA);
        const Tensor in =
            in_type == DType::f32 ? host(x, {rows, cols}) : host(x16, in_type, {rows, cols});
        ops::fp8_quantize(host(out, format, {rows, cols}), host(out_t, format, {cols, rows}),
                          host(amax, {1}), in, host(scale, {1}));
        uint32_t want_amax = 0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const float xv = x[r * cols + c];
            const uint8_t want = expected_code(xv * scale[0], format);
            ASSERT_EQ(int(out[r * cols + c]), int(want))
                << "x=" << xv << " at (" << r << "," << c << ") " << dtype_name(in_type) << "->"
                << dtype_name(format);
            ASSERT_EQ(int(out_t[c * rows + r]), int(want))
                << "transpose at (" << c << "," << r << ")";
            uint32_t key = std::bit_cast<uint32_t>(xv) & 0x7FFFFFFFu;
            if (key > 0x7F800000u) key = 0x7FC00000u;  // every NaN: the canonical quiet NaN
            want_amax = std::max(want_amax, key);
          }
        EXPECT_EQ(std::bit_cast<uint32_t>(amax[0]), want_amax);
      }
    }
  }
}

TEST(Fp8Quantize, AmaxAccumulatesAndFlagsNonFinite) {
  std::vector<float> scale{2.0f}, amax{5.0f};
  std::vector<uint8_t> out(3);
  auto run = [&](std::vector<float> x) {
    ops::fp8_quantize(host(out, DType::e4m3, {3}), {}, host(amax, {1}), host(x, {3}),
                      host(scale, {1}));
  };
  run({1.0f, -3.0f, 2.0f});
  EXPECT_EQ(amax[0], 5.0f);  // the earlier, larger amax stays (and the scale is not applied)
  run({1.0f, -7.0f, 2.0f});
  EXPECT_EQ(amax[0], 7.0f);
  run({-std::numeric_limits<float>::infinity(), 0.0f, 0.0f});
  EXPECT_EQ(amax[0], std::numeric_limits<float>::infinity());
  run({-std::numeric_limits<float>::signaling_NaN(), 1.0f, 0.0f});
  EXPECT_EQ(std::bit_cast<uint32_t>(amax[0]), 0x7FC00000u) << "NaN amax is the quiet NaN";
  EXPECT_EQ(int(out[0]), 0x7F);
  run({1.0f, 1.0f, 1.0f});
  EXPECT_TRUE(std::isnan(amax[0])) << "a NaN amax must stick until the update consumes it";
}

TEST(Fp8Quantize, RejectsBadOperands) {
  std::vector<float> x(6), scale{1.0f}, amax{0.0f};
  std::vector<uint8_t> out(6), out_t(6);
  EXPECT_THROW(ops::fp8_quantize(host(out, DType::e4m3, {2, 3}), host(out_t, DType::e4m3, {2, 3}),
                                 host(amax, {1}), host(x, {2, 3}), host(scale, {1})),
               Error);  // out_t must be (3, 2)
  EXPECT_THROW(ops::fp8_quantize(host(out, DType::e4m3, {2, 3}), host(out_t, DType::e5m2, {3, 2}),
                                 host(amax, {1}), host(x, {2, 3}), host(scale, {1})),
               Error);  // out_t must share out's format
  EXPECT_THROW(ops::fp8_quantize(host(out, DType::e4m3, {3, 2}), {}, host(amax, {1}),
                                 host(x, {2, 3}), host(scale, {1})),
               Error);
}

// ---- swiglu_backward_fp8 ---------------------------------------------------------------------

// The fused op is swiglu_backward then fp8_quantize of each gradient, with dgate's operands going
// with scale_gate and dup's with scale_up (distinct scales and formats of values make a swap show).
TEST(SwigluBackwardFp8, EqualsSwigluBackwardThenQuantize) {
  std::mt19937_64 rng(21);
  const int64_t r = 5, c = 7, n = r * c;
  std::vector<float> dout(n), gate(n), up(n);
  std::normal_distribution<float> d(0.0f, 2.0f);
  for (int64_t i = 0; i < n; ++i) dout[i] = d(rng), gate[i] = d(rng), up[i] = 3.0f * d(rng);
  for (DType format : {DType::e4m3, DType::e5m2}) {
    std::vector<float> sg{0.7f}, su{3.1f};
    std::vector<uint8_t> g8(n), g8_t(n), u8(n), u8_t(n), eg8(n), eg8_t(n), eu8(n), eu8_t(n);
    std::vector<float> ag{0.0f}, au{0.0f}, eag{0.0f}, eau{0.0f}, dg(n), du(n);
    ops::swiglu_backward_fp8(host(g8, format, {r, c}), host(g8_t, format, {c, r}),
                             host(u8, format, {r, c}), host(u8_t, format, {c, r}), host(ag, {1}),
                             host(au, {1}), host(dout, {r, c}), host(gate, {r, c}),
                             host(up, {r, c}), host(sg, {1}), host(su, {1}));
    ops::swiglu_backward(host(dg, {r, c}), host(du, {r, c}), host(dout, {r, c}), host(gate, {r, c}),
                         host(up, {r, c}));
    ops::fp8_quantize(host(eg8, format, {r, c}), host(eg8_t, format, {c, r}), host(eag, {1}),
                      host(dg, {r, c}), host(sg, {1}));
    ops::fp8_quantize(host(eu8, format, {r, c}), host(eu8_t, format, {c, r}), host(eau, {1}),
                      host(du, {r, c}), host(su, {1}));
    EXPECT_EQ(g8, eg8);
    EXPECT_EQ(g8_t, eg8_t);
    EXPECT_EQ(u8, eu8);
    EXPECT_EQ(u8_t, eu8_t);
    EXPECT_EQ(ag, eag);
    EXPECT_EQ(au, eau);
    EXPECT_NE(g8, u8);
  }
}

TEST(SwigluBackwardFp8, RejectsBadOperands) {
  std::vector<float> x(6), scale{1.0f}, amax{0.0f};
  std::vector<uint8_t> a(6), b(6), at(6), bt(6);
  const auto call = [&](DType fa, DType fb, bool ta, bool tb, Shape up_shape) {
    ops::swiglu_backward_fp8(host(a, fa, {2, 3}), ta ? host(at, fa, {3, 2}) : Tensor(),
                             host(b, fb, {2, 3}), tb ? host(bt, fb, {3, 2}) : Tensor(),
                             host(amax, {1}), host(amax, {1}), host(x, {2, 3}), host(x, {2, 3}),
                             host(x, up_shape), host(scale, {1}), host(scale, {1}));
  };
  EXPECT_NO_THROW(call(DType::e5m2, DType::e5m2, true, true, {2, 3}));
  EXPECT_THROW(call(DType::e5m2, DType::e4m3, false, false, {2, 3}), Error);  // mixed formats
  EXPECT_THROW(call(DType::e5m2, DType::e5m2, true, false, {2, 3}), Error);   // one transpose
  EXPECT_THROW(call(DType::e5m2, DType::e5m2, false, false, {3, 2}), Error);  // up unlike dout
}

// ---- gemm_fp8 -------------------------------------------------------------------------------

struct Fp8Matrix {
  std::vector<uint8_t> codes;
  std::vector<double> values;  // decoded
};

Fp8Matrix random_fp8(int64_t n, DType format, std::mt19937_64& rng, float stddev) {
  std::normal_distribution<float> d(0.0f, stddev);
  Fp8Matrix m;
  for (int64_t i = 0; i < n; ++i) {
    const float x = d(rng);
    const uint8_t code = format == DType::e4m3 ? f32_to_e4m3_bits(x) : f32_to_e5m2_bits(x);
    m.codes.push_back(code);
    m.values.push_back(format == DType::e4m3 ? e4m3_bits_to_f32(code) : e5m2_bits_to_f32(code));
  }
  return m;
}

TEST(GemmFp8, MatchesDoubleReference) {
  std::mt19937_64 rng(5);
  const std::pair<DType, DType> combos[] = {
      {DType::e4m3, DType::e4m3}, {DType::e5m2, DType::e4m3}, {DType::e4m3, DType::e5m2}};
  const int64_t m = 13, n = 32, k = 48;
  for (auto [ta, tb] : combos) {
    for (DType c_type : {DType::f32, DType::bf16}) {
      for (bool accumulate : {false, true}) {
        Fp8Matrix a = random_fp8(m * k, ta, rng, 30.0f), b = random_fp8(n * k, tb, rng, 0.5f);
        std::vector<float> sa{0.0123f}, sb{3.25f};
        std::vector<float> c_init(m * n);
        for (auto& v : c_init) v = round_bf16(std::normal_distribution<float>(0.0f, 5.0f)(rng));
        std::vector<float> c32 = c_init;
        std::vector<uint16_t> c16(m * n);
        for (int64_t i = 0; i < m * n; ++i) c16[i] = f32_to_bf16_bits(c_init[i]);
        const Tensor c = c_type == DType::f32 ? host(c32, {m, n}) : host(c16, DType::bf16, {m, n});
        ops::gemm_fp8(c, host(a.codes, ta, {m, k}), host(b.codes, tb, {n, k}), host(sa, {1}),
                      host(sb, {1}), accumulate);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            // Independent reference: summed backwards in long double.
            long double sum = 0.0L;
            for (int64_t p = k - 1; p >= 0; --p)
              sum += (long double)a.values[i * k + p] * b.values[j * k + p];
            const double ref =
                double(sum * sa[0] * sb[0]) + (accumulate ? double(c_init[i * n + j]) : 0.0);
            const double got =
                c_type == DType::f32 ? c32[i * n + j] : bf16_bits_to_f32(c16[i * n + j]);
            // One rounding to f32 (half an ulp, 2^-24 relative), then for bf16 one more (2^-9);
            // the double sum's own error (k * 2^-53 of the magnitudes) is far below either.
            const double tol = (c_type == DType::f32 ? 0x1p-23 : 0x1p-8) * std::fabs(ref) + 1e-30;
            ASSERT_NEAR(got, ref, tol)
                << "(" << i << "," << j << ") " << dtype_name(ta) << "x" << dtype_name(tb) << " -> "
                << dtype_name(c_type) << " accumulate " << accumulate;
          }
      }
    }
  }
}

TEST(GemmFp8, RejectsE5m2TimesE5m2AndBadShapes) {
  std::vector<uint8_t> a(32), b(32);
  std::vector<float> c(4), s{1.0f};
  try {
    ops::gemm_fp8(host(c, {2, 2}), host(a, DType::e5m2, {2, 16}), host(b, DType::e5m2, {2, 16}),
                  host(s, {1}), host(s, {1}), false);
    ADD_FAILURE() << "e5m2 x e5m2 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("e5m2 x e5m2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::gemm_fp8(host(c, {2, 2}), host(a, DType::e4m3, {2, 16}),
                             host(b, DType::e4m3, {1, 32}), host(s, {1}), host(s, {1}), false),
               Error);
}

// ---- fp8_update_scales ----------------------------------------------------------------------

struct UpdateFixture {
  int64_t len, n;
  std::vector<float> hist, scale, scale_inv, amax, fp8_max;
  ops::Fp8UpdateParams params;
  UpdateFixture(int64_t l, std::vector<DType> formats, ops::Fp8AmaxCompute compute, int margin)
      : len(l),
        n(int64_t(formats.size())),
        hist(l * n, 0.0f),
        scale(n, 1.0f),
        scale_inv(n, 1.0f),
        amax(n, 0.0f) {
    for (DType f : formats) fp8_max.push_back(ops::fp8_max_of(f));
    params.fp8_max = host(fp8_max, {n});
    params.amax_compute = compute;
    params.margin = margin;
  }
  void step(std::vector<float> now) {
    amax = now;
    ops::fp8_update_scales(host(hist, {len, n}), host(scale, {n}), host(scale_inv, {n}),
                           host(amax, {n}), params);
    for (float a : amax) EXPECT_EQ(a, 0.0f) << "amax must be zeroed by the update";
    for (int64_t j = 0; j < n; ++j) EXPECT_EQ(scale_inv[j], 1.0f / scale[j]);
  }
};

TEST(Fp8UpdateScales, ShiftsHistoryAndTakesMax) {
  UpdateFixture f(3, {DType::e4m3, DType::e5m2}, ops::Fp8AmaxCompute::max, 0);
  f.step({2.0f, 8.0f});
  EXPECT_EQ(f.hist, (std::vector<float>{2, 8, 0, 0, 0, 0}));
  EXPECT_EQ(f.scale[0], 448.0f / 2.0f);
  EXPECT_EQ(f.scale[1], 57344.0f / 8.0f);
  f.step({1.0f, 16.0f});
  EXPECT_EQ(f.hist, (std::vector<float>{1, 16, 2, 8, 0, 0}));
  EXPECT_EQ(f.scale[0], 448.0f / 2.0f);  // the max of the window is still 2
  EXPECT_EQ(f.scale[1], 57344.0f / 16.0f);
  f.step({0.5f, 4.0f});
  f.step({0.25f, 4.0f});  // the 2 of the first step has now left the 3-row window
  EXPECT_EQ(f.hist, (std::vector<float>{0.25f, 4, 0.5f, 4, 1, 16}));
  EXPECT_EQ(f.scale[0], 448.0f / 1.0f);
  EXPECT_EQ(f.scale[1], 57344.0f / 16.0f);
}

TEST(Fp8UpdateScales, MostRecentAndMargin) {
  UpdateFixture f(4, {DType::e4m3}, ops::Fp8AmaxCompute::most_recent, 3);
  f.step({10.0f});
  EXPECT_EQ(f.scale[0], 448.0f / 10.0f / 8.0f);
  f.step({3.0f});
  EXPECT_EQ(f.scale[0], 448.0f / 3.0f / 8.0f);  // most recent, not the window's 10
  EXPECT_EQ(f.hist, (std::vector<float>{3, 10, 0, 0}));
}

TEST(Fp8UpdateScales, KeepsScaleOnZeroOrNonFiniteAmax) {
  const float inf = std::numeric_limits<float>::infinity();
  UpdateFixture f(2, {DType::e4m3, DType::e4m3, DType::e4m3}, ops::Fp8AmaxCompute::most_recent, 0);
  f.step({4.0f, 4.0f, 4.0f});
  const float s = 448.0f / 4.0f;
  f.step({0.0f, inf, std::numeric_limits<float>::quiet_NaN()});
  EXPECT_EQ(f.scale, (std::vector<float>{s, s, s}));
  // Non-finite amaxes enter the history as 0, so they cannot freeze the window.
  EXPECT_EQ(f.hist, (std::vector<float>{0, 0, 0, 4, 4, 4}));
  // In max mode the older entry still decides after a zero step; an Inf step keeps the scale.
  UpdateFixture g(2, {DType::e4m3, DType::e4m3}, ops::Fp8AmaxCompute::max, 0);
  g.step({4.0f, 4.0f});
  g.step({2.0f, 2.0f});
  g.step({0.0f, inf});
  EXPECT_EQ(g.scale[0], 448.0f / 2.0f);
  EXPECT_EQ(g.scale[1], 448.0f / 4.0f);  // unchanged from the step before the Inf
}

TEST(Fp8UpdateScales, OverflowingScaleClampsToFltMax) {
  UpdateFixture f(1, {DType::e5m2}, ops::Fp8AmaxCompute::max, 0);
  f.step({1e-40f});  // 57344 / 1e-40 overflows f32
  EXPECT_EQ(f.scale[0], FLT_MAX);
  EXPECT_GT(f.scale_inv[0], 0.0f);
}

TEST(Fp8UpdateScales, RejectsBadParams) {
  UpdateFixture f(2, {DType::e4m3}, ops::Fp8AmaxCompute::max, 65);
  EXPECT_THROW(f.step({1.0f}), Error);
  UpdateFixture g(2, {DType::e4m3, DType::e4m3}, ops::Fp8AmaxCompute::max, 0);
  std::vector<float> short_scale(1);
  EXPECT_THROW(ops::fp8_update_scales(host(g.hist, {2, 2}), host(short_scale, {1}),
                                      host(g.scale_inv, {2}), host(g.amax, {2}), g.params),
               Error);
}

}  // namespace
}  // namespace tessera
