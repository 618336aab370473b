// Tests of the FP8 ops (kernels/ops_fp8.h; kernels/cpu/fp8.cpp, kernels/cuda/fp8_cast.cu,
// fp8_scaling.cu, gemm_fp8.cu): fp8_quantize, swiglu_backward_fp8, gemm_fp8, fp8_update_scales.
// CPU: quantize against the scalar conversions of core/dtype.h and hand-computed codes, the fused
// transpose, amax accumulation (NaN/Inf too), the fused SwiGLU backward against its two steps, the
// scaled GEMM against an independent double-precision product, the delayed-scaling update (history
// shift, max vs most_recent, margin, amax 0 / Inf / NaN, scale overflow); bounds and thread
// counts. GPU parity (compute capability 8.9+): quantize and the fused SwiGLU backward bit for bit,
// the hardware conversion against core/dtype.h, the GEMM within its bound (scales at any offset,
// model sizes), the scale update bit for bit over steps.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cfloat>
#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

#include "kernels/ops_fp8.h"

namespace tessera {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

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

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Fp8, OpsWriteOnlyTheirOutputs) {
  std::mt19937_64 rng(88);
  const int64_t r = 9, c = 24;
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> in(r * c), dout(r * c), gate(r * c), up(r * c), one{1.0f}, half{0.5f};
  for (auto* v : {&in, &dout, &gate, &up})
    for (float& x : *v) x = d(rng);
  ::tessera::testing::Guarded out({r, c}, DType::e4m3), out_t({c, r}, DType::e4m3), amax({1});
  std::vector<float> zero{0.0f};
  ops::fp8_quantize(out, out_t, host(zero, {1}), host(in, {r, c}), host(one, {1}));
  ops::fp8_quantize(out, Tensor(), amax, host(in, {r, c}), host(half, {1}));
  ::tessera::testing::Guarded g8({r, c}, DType::e5m2), g8_t({c, r}, DType::e5m2),
      u8({r, c}, DType::e5m2), u8_t({c, r}, DType::e5m2), amax_g({1}), amax_u({1});
  ops::swiglu_backward_fp8(g8, g8_t, u8, u8_t, amax_g, amax_u, host(dout, {r, c}),
                           host(gate, {r, c}), host(up, {r, c}), host(one, {1}), host(one, {1}));
  // c (M,N) = a (M,K) b (N,K)^T from the quantized operands above: M = 9, N = 9, K = 24.
  ::tessera::testing::Guarded gemm_c({r, r});
  ops::gemm_fp8(gemm_c, out, g8, host(one, {1}), host(one, {1}), false);
  ::tessera::testing::Guarded hist({4, 2}), scale({2}), scale_inv({2}), amax2({2});
  std::vector<float> maxes{448.0f, 57344.0f};
  ops::Fp8UpdateParams params;
  params.fp8_max = host(maxes, {2});
  ops::fp8_update_scales(hist, scale, scale_inv, amax2, params);
  ::tessera::testing::expect_guards_intact({&out, &out_t, &amax, &g8, &g8_t, &u8, &u8_t, &amax_g,
                                            &amax_u, &gemm_c, &hist, &scale, &scale_inv, &amax2},
                                           "fp8 ops");
}

TEST(Fp8, QuantizeAndGemmAreThreadCountIndependent) {
  std::mt19937_64 rng(89);
  const int64_t m = 300, k = 256, n = 96;  // above the parallel thresholds
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> in(m * k), w(n * k), one{1.0f};
  for (float& x : in) x = d(rng);
  for (float& x : w) x = d(rng);
  std::vector<uint8_t> a8[2], b8(n * k);
  std::vector<float> amax[2], c[2];
  std::vector<float> amax_w{0.0f};
  ops::fp8_quantize(host(b8, DType::e4m3, {n, k}), Tensor(), host(amax_w, {1}), host(w, {n, k}),
                    host(one, {1}));
  for (int threads : {1, 3}) {
    const int i = threads == 1 ? 0 : 1;
    a8[i].assign(m * k, 0);
    amax[i] = {0.0f};
    c[i].assign(m * n, 0.0f);
    ::tessera::testing::with_threads(threads, [&] {
      ops::fp8_quantize(host(a8[i], DType::e4m3, {m, k}), Tensor(), host(amax[i], {1}),
                        host(in, {m, k}), host(one, {1}));
      ops::gemm_fp8(host(c[i], {m, n}), host(a8[i], DType::e4m3, {m, k}),
                    host(b8, DType::e4m3, {n, k}), host(one, {1}), host(one, {1}), false);
    });
  }
  EXPECT_EQ(a8[0], a8[1]);
  EXPECT_EQ(amax[0], amax[1]);
  EXPECT_EQ(c[0], c[1]);
}

}  // namespace
}  // namespace tessera

// ---- GPU parity (kernels/cuda/fp8_cast.cu, fp8_scaling.cu, gemm_fp8.cu) ------------------------

namespace tessera::testing {
namespace {

// FP8 tensor cores and the cvt.satfinite conversions need compute capability 8.9.
// (The GpuCase fixture has already skipped the case on a machine without a GPU.)
#define TESSERA_REQUIRE_FP8_GPU()                                                           \
  do {                                                                                      \
    if (gpu_compute_capability() < 89) GTEST_SKIP() << "FP8 needs compute capability 8.9+"; \
  } while (0)

template <class T>
void upload_raw(const DeviceTensor& d, const std::vector<T>& host) {
  ASSERT_EQ(host.size() * sizeof(T), d.t().nbytes());
  copy_bytes(d.t().data, Device::cuda, host.data(), Device::cpu, d.t().nbytes());
}
template <class T>
std::vector<T> download_raw(const DeviceTensor& d) {
  ops::synchronize(Device::cuda);
  std::vector<T> host(d.t().nbytes() / sizeof(T));
  copy_bytes(host.data(), Device::cpu, d.t().data, Device::cuda, d.t().nbytes());
  return host;
}
Tensor host_f32(std::vector<float>& v, Shape s) {
  return Tensor(v.data(), DType::f32, Device::cpu, s);
}

// Random values with the hard cases mixed in (each format's max, ties, subnormals, signed zeros,
// Inf, NaN), encoded in `dtype` (f32, bf16 or f16) as raw bits.
std::vector<uint8_t> tricky_input(int64_t n, DType dtype, std::mt19937_64& rng, bool with_nan) {
  const float specials[] = {0.0f,
                            -0.0f,
                            448.0f,
                            -464.0f,
                            480.0f,
                            57344.0f,
                            61440.0f,
                            1e30f,
                            std::ldexp(1.0f, -10),
                            std::ldexp(3.0f, -10),
                            std::ldexp(1.0f, -17),
                            std::ldexp(3.0f, -17),
                            1.0625f,
                            1.1875f,
                            1e-40f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 99), exp(-20, 18);
  std::uniform_int_distribution<size_t> which(0, std::size(specials) - 1);
  std::vector<uint8_t> bytes(n * dtype_size(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const int p = pick(rng);
    float x = 30.0f * normal(rng);
    if (p < 5)
      x = specials[which(rng)];
    else if (p < 25)
      x = std::ldexp(normal(rng), exp(rng));
    else if (p == 99 && with_nan)
      x = std::numeric_limits<float>::quiet_NaN();
    if (dtype == DType::f32)
      std::memcpy(&bytes[4 * i], &x, 4);
    else {
      const uint16_t h = dtype == DType::bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

struct QuantizeCase {
  int64_t rows, cols;
};

TS_GPU_PARITY_TEST(Fp8Quantize, BitExactWithCpuIncludingTransposeAndAmax, "fp8_quantize") {
  TESSERA_REQUIRE_FP8_GPU();
  std::mt19937_64 rng(3);
  // The kernel's widths: 8-wide (cols % 8 == 0, and rows % 8 == 0 for the transpose) with
  // partial tiles: {1000, 1040}, {72, 40}, {64, 64}; 4-wide: {68, 36}, and {6, 36} without the
  // transpose; 1-wide: the rest. More tiles than the grid's blocks, so blocks stride over tiles:
  // {2176, 2048} (8-wide), {2180, 2052} (4-wide) and {2177, 2050} (1-wide).
  const QuantizeCase cases[] = {{1000, 1040}, {1, 1},       {3, 65},      {64, 64},    {129, 250},
                                {7, 1},       {1, 4097},    {513, 31},    {68, 36},    {6, 36},
                                {72, 40},     {2176, 2048}, {2180, 2052}, {2177, 2050}};
  for (const QuantizeCase& qc : cases) {
    for (DType in_type : {DType::f32, DType::bf16, DType::f16}) {
      for (DType format : {DType::e4m3, DType::e5m2}) {
        for (bool transpose : {false, true}) {
          const int64_t r = qc.rows, c = qc.cols, n = r * c;
          SCOPED_TRACE(::testing::Message() << r << "x" << c << " " << dtype_name(in_type) << "->"
                                            << dtype_name(format) << " transpose " << transpose);
          std::vector<uint8_t> in_bytes = tricky_input(n, in_type, rng, /*with_nan=*/n > 1000);
          std::vector<float> scale{format == DType::e4m3 ? 1.7f : 0.011f};
          std::vector<float> amax{0.5f};  // a prior amax both sides must max into
          // CPU reference.
          std::vector<uint8_t> out_cpu(n), out_t_cpu(n);
          std::vector<float> amax_cpu = amax;
          ops::fp8_quantize(
              Tensor(out_cpu.data(), format, Device::cpu, {r, c}),
              transpose ? Tensor(out_t_cpu.data(), format, Device::cpu, {c, r}) : Tensor(),
              host_f32(amax_cpu, {1}), Tensor(in_bytes.data(), in_type, Device::cpu, {r, c}),
              host_f32(scale, {1}));
          // GPU.
          DeviceTensor in(in_type, {r, c}), out(format, {r, c}), out_t(format, {c, r}),
              amax_d(DType::f32, {1}), scale_d(DType::f32, {1});
          upload_raw(in, in_bytes);
          upload_raw(amax_d, amax);
          upload_raw(scale_d, scale);
          ops::fp8_quantize(out, transpose ? out_t.t() : Tensor(), amax_d, in, scale_d);
          const std::vector<uint8_t> out_gpu = download_raw<uint8_t>(out);
          int64_t mismatches = 0;
          for (int64_t i = 0; i < n && mismatches < 5; ++i)
            if (out_gpu[i] != out_cpu[i]) {
              ++mismatches;
              ADD_FAILURE() << "out[" << i << "]: gpu " << int(out_gpu[i]) << ", cpu "
                            << int(out_cpu[i]);
            }
          if (transpose) {
            EXPECT_EQ(download_raw<uint8_t>(out_t), out_t_cpu);
          }
          EXPECT_EQ(std::bit_cast<uint32_t>(download_raw<float>(amax_d)[0]),
                    std::bit_cast<uint32_t>(amax_cpu[0]));
          EXPECT_TRUE(out.guards_intact() && out_t.guards_intact() && amax_d.guards_intact());
        }
      }
    }
  }
}

// swiglu_backward_fp8 on the GPU equals the two ops it fuses on the GPU (swiglu_backward into the
// inputs' dtype, then fp8_quantize of dgate and of dup) bit for bit: codes, transposes and both
// amaxes, on every kernel width and dtype, with the hard values (Inf, NaN, overflow) mixed in.
// Each unfused GPU op has its own parity test with the CPU; the CPU reference of the fused op is
// that composition (tests/optim/fp8_linear_test.cpp checks it in the FP8 linears).
TS_GPU_PARITY_TEST(SwigluBackwardFp8, EqualsSwigluBackwardThenQuantizeOnTheGpu,
                   "swiglu_backward_fp8") {
  TESSERA_REQUIRE_FP8_GPU();
  std::mt19937_64 rng(9);
  // 8-wide (with the striding over tiles at {2176, 2048}), 4-wide, 1-wide, and {6, 36}: 4-wide
  // without the transpose, 1-wide with it.
  const QuantizeCase cases[] = {{1000, 1040}, {68, 36}, {129, 250}, {2176, 2048}, {6, 36}};
  for (const QuantizeCase& qc : cases) {
    for (DType in_type : {DType::f32, DType::bf16, DType::f16}) {
      for (DType format : {DType::e5m2, DType::e4m3}) {
        for (bool transpose : {true, false}) {
          const int64_t r = qc.rows, c = qc.cols, n = r * c;
          SCOPED_TRACE(::testing::Message() << r << "x" << c << " " << dtype_name(in_type) << "->"
                                            << dtype_name(format) << " transpose " << transpose);
          DeviceTensor dout(in_type, {r, c}), gate(in_type, {r, c}), up(in_type, {r, c});
          upload_raw(dout, tricky_input(n, in_type, rng, /*with_nan=*/n > 1000));
          upload_raw(gate, tricky_input(n, in_type, rng, false));
          upload_raw(up, tricky_input(n, in_type, rng, false));
          std::vector<float> scales{format == DType::e4m3 ? 0.9f : 0.013f, 1.7f}, prior{0.25f};
          DeviceTensor scale_g(DType::f32, {1}), scale_u(DType::f32, {1});
          upload_raw(scale_g, std::vector<float>{scales[0]});
          upload_raw(scale_u, std::vector<float>{scales[1]});
          struct Side {
            DeviceTensor g8, g8_t, u8, u8_t, amax_g, amax_u;
            Side(DType f, int64_t rows, int64_t cols, const std::vector<float>& amax)
                : g8(f, {rows, cols}),
                  g8_t(f, {cols, rows}),
                  u8(f, {rows, cols}),
                  u8_t(f, {cols, rows}),
                  amax_g(DType::f32, {1}),
                  amax_u(DType::f32, {1}) {
              upload_raw(amax_g, amax);
              upload_raw(amax_u, amax);
            }
          };
          Side fused(format, r, c, prior), split(format, r, c, prior);
          ops::swiglu_backward_fp8(fused.g8, transpose ? fused.g8_t.t() : Tensor(), fused.u8,
                                   transpose ? fused.u8_t.t() : Tensor(), fused.amax_g,
                                   fused.amax_u, dout, gate, up, scale_g, scale_u);
          DeviceTensor dgate(in_type, {r, c}), dup(in_type, {r, c});
          ops::swiglu_backward(dgate, dup, dout, gate, up);
          ops::fp8_quantize(split.g8, transpose ? split.g8_t.t() : Tensor(), split.amax_g, dgate,
                            scale_g);
          ops::fp8_quantize(split.u8, transpose ? split.u8_t.t() : Tensor(), split.amax_u, dup,
                            scale_u);
          EXPECT_EQ(download_raw<uint8_t>(fused.g8), download_raw<uint8_t>(split.g8));
          EXPECT_EQ(download_raw<uint8_t>(fused.u8), download_raw<uint8_t>(split.u8));
          if (transpose) {
            EXPECT_EQ(download_raw<uint8_t>(fused.g8_t), download_raw<uint8_t>(split.g8_t));
            EXPECT_EQ(download_raw<uint8_t>(fused.u8_t), download_raw<uint8_t>(split.u8_t));
          }
          EXPECT_EQ(download_raw<uint32_t>(fused.amax_g), download_raw<uint32_t>(split.amax_g));
          EXPECT_EQ(download_raw<uint32_t>(fused.amax_u), download_raw<uint32_t>(split.amax_u));
          for (const Side* s : {&fused, &split})
            EXPECT_TRUE(s->g8.guards_intact() && s->g8_t.guards_intact() && s->u8.guards_intact() &&
                        s->u8_t.guards_intact());
        }
      }
    }
  }
}

// The brief's claim, checked rather than assumed: cvt.rn.satfinite (what __nv_cvt_float_to_fp8
// with __NV_SATFINITE compiles to on sm_89+) rounds like core/dtype.h for every non-NaN input.
// The sweep covers all f32 bit patterns whose low 6 bits are zero: every sign, exponent and the
// top 17 mantissa bits, so every rounding boundary (ties included) of both formats, and the
// patterns just above each tie. Scale 1 makes the product the input itself.
TS_GPU_TEST(Fp8Quantize, HardwareConversionMatchesDtypeH) {
  TESSERA_REQUIRE_FP8_GPU();
  const int64_t rows = 1 << 13, cols = 1 << 13;  // 2^26 patterns
  std::vector<uint32_t> bits(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) bits[i] = uint32_t(i) << 6;
  DeviceTensor in(DType::f32, {rows, cols}), amax_d(DType::f32, {1}), scale_d(DType::f32, {1});
  upload_raw(in, bits);
  upload_raw(amax_d, std::vector<float>{0.0f});
  upload_raw(scale_d, std::vector<float>{1.0f});
  for (DType format : {DType::e4m3, DType::e5m2}) {
    DeviceTensor out(format, {rows, cols});
    ops::fp8_quantize(out, {}, amax_d, in, scale_d);
    const std::vector<uint8_t> got = download_raw<uint8_t>(out);
    int64_t mismatches = 0;
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float x = std::bit_cast<float>(bits[i]);
      const uint8_t want = std::isnan(x)           ? 0x7F
                           : format == DType::e4m3 ? f32_to_e4m3_bits(x, true)
                                                   : f32_to_e5m2_bits(x, true);
      if (got[i] != want && ++mismatches <= 5)
        ADD_FAILURE() << dtype_name(format) << ": bits 0x" << std::hex << bits[i] << " -> gpu 0x"
                      << int(got[i]) << ", dtype.h 0x" << int(want) << std::dec;
    }
    EXPECT_EQ(mismatches, 0) << dtype_name(format);
  }
}

// ---- gemm_fp8 -------------------------------------------------------------------------------

struct GemmCase {
  int64_t m, n, k;
};

// Error bound of the GPU against the CPU reference (which is the exact product up to double
// rounding, then c's rounding). Hopper's FP8 MMA adds its products in an accumulator that keeps
// about 14 significant bits (DeepSeek-V3 report, §3.3.2), so each addition may lose up to ~2^-13
// of the running magnitude, which is at most S = sa*sb*sum_k |a_ik b_jk|. With fast accumulation
// the whole K loop stays in that accumulator: we allow 2^-9 S (the errors of up to K/32 MMA steps
// add like a random walk, far below the worst case of (K/32) 2^-13 S for these K). With split
// accumulation only each 32-deep MMA is inexact and f32 adds the rest: 2^-11 S. Plus the output
// rounding: one ulp of c's dtype (f32: 2^-23 |ref|, bf16: 2^-7 |ref|), because a GPU sum that
// differs from the exact one by a hair can round to the other neighbour of a midpoint. And when
// accumulating into bf16, half an ulp of the product P = sa*sb*sum_k a_ik b_jk: measured on H100,
// the FP8 kernels round P to bf16 before adding c (errors up to 2^-9 where P ~ 0.5 and c ~ -P
// cancel), where the CPU adds in f32 and rounds once. A wrong scale, operand order, transpose or a
// missed accumulate gives errors of order |ref| or S, far above this.
double gemm_bound(double s_abs, double p_abs, double ref, bool split, DType c_type,
                  bool accumulate) {
  const bool bf16 = c_type == DType::bf16;
  return (split ? 0x1p-11 : 0x1p-9) * s_abs + (bf16 ? 0x1p-7 : 0x1p-23) * std::fabs(ref) +
         (bf16 && accumulate ? 0x1p-8 * p_abs : 0.0) + 1e-30;
}

TS_GPU_PARITY_TEST(GemmFp8, MatchesCpuWithinBound, "gemm_fp8") {
  TESSERA_REQUIRE_FP8_GPU();
  std::mt19937_64 rng(9);
  const GemmCase cases[] = {{1, 16, 16}, {77, 64, 96}, {256, 272, 1024}, {1000, 48, 512}};
  const std::pair<DType, DType> combos[] = {
      {DType::e4m3, DType::e4m3}, {DType::e5m2, DType::e4m3}, {DType::e4m3, DType::e5m2}};
  for (const GemmCase& gc : cases) {
    for (auto [ta, tb] : combos) {
      for (DType c_type : {DType::f32, DType::bf16}) {
        for (bool accumulate : {false, true}) {
          const int64_t m = gc.m, n = gc.n, k = gc.k;
          SCOPED_TRACE(::testing::Message() << m << "x" << n << "x" << k << " " << dtype_name(ta)
                                            << " x " << dtype_name(tb) << " -> "
                                            << dtype_name(c_type) << " accumulate " << accumulate);
          // Operands: random normals quantized by the CPU op itself, with realistic scales.
          auto make = [&](int64_t rows, DType format, float stddev, float scale_v,
                          std::vector<uint8_t>* codes) {
            std::vector<float> x = random_vector(rows * k, rng, stddev), amax{0.0f}, scale{scale_v};
            codes->resize(rows * k);
            ops::fp8_quantize(Tensor(codes->data(), format, Device::cpu, {rows, k}), {},
                              host_f32(amax, {1}), host_f32(x, {rows, k}), host_f32(scale, {1}));
          };
          std::vector<uint8_t> a_codes, b_codes;
          make(m, ta, 0.02f, 4096.0f, &a_codes);
          make(n, tb, 1.5f, 64.0f, &b_codes);
          std::vector<float> sa{1.0f / 4096.0f}, sb{1.0f / 64.0f};
          // c starts with values in c's dtype (bf16-representable), used when accumulating.
          std::vector<float> c0 = round_to(DType::bf16, random_vector(m * n, rng, 0.3f));

          // CPU reference (in c's dtype too, so its rounding is the GPU's).
          std::vector<float> c_cpu32 = c0;
          std::vector<uint16_t> c_cpu16(m * n);
          for (int64_t i = 0; i < m * n; ++i) c_cpu16[i] = f32_to_bf16_bits(c0[i]);
          const Tensor c_cpu = c_type == DType::f32
                                   ? host_f32(c_cpu32, {m, n})
                                   : Tensor(c_cpu16.data(), DType::bf16, Device::cpu, {m, n});
          ops::gemm_fp8(c_cpu, Tensor(a_codes.data(), ta, Device::cpu, {m, k}),
                        Tensor(b_codes.data(), tb, Device::cpu, {n, k}), host_f32(sa, {1}),
                        host_f32(sb, {1}), accumulate);
          std::vector<float> ref(m * n);
          for (int64_t i = 0; i < m * n; ++i)
            ref[i] = c_type == DType::f32 ? c_cpu32[i] : bf16_bits_to_f32(c_cpu16[i]);

          DeviceTensor a(ta, {m, k}), b(tb, {n, k}), c(c_type, {m, n}), sa_d(DType::f32, {1}),
              sb_d(DType::f32, {1});
          upload_raw(a, a_codes);
          upload_raw(b, b_codes);
          upload_raw(sa_d, sa);
          upload_raw(sb_d, sb);
          c.upload(c0);
          ops::gemm_fp8(c, a, b, sa_d, sb_d, accumulate);
          const std::vector<float> got = c.download();
          EXPECT_TRUE(c.guards_intact());

          // S per element from the decoded operands.
          auto decode = [](const std::vector<uint8_t>& codes, DType f) {
            std::vector<double> v(codes.size());
            for (size_t i = 0; i < codes.size(); ++i)
              v[i] = f == DType::e4m3 ? e4m3_bits_to_f32(codes[i]) : e5m2_bits_to_f32(codes[i]);
            return v;
          };
          const std::vector<double> av = decode(a_codes, ta), bv = decode(b_codes, tb);
          const bool split = ta == DType::e5m2 || tb == DType::e5m2;
          int64_t failures = 0;
          double worst = 0.0;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
              double s_abs = 0.0, p = 0.0;
              for (int64_t q = 0; q < k; ++q) {
                s_abs += std::fabs(av[i * k + q] * bv[j * k + q]);
                p += av[i * k + q] * bv[j * k + q];
              }
              s_abs *= double(sa[0]) * sb[0];
              p *= double(sa[0]) * sb[0];
              const double err = std::fabs(double(got[i * n + j]) - ref[i * n + j]);
              const double bound =
                  gemm_bound(s_abs, std::fabs(p), ref[i * n + j], split, c_type, accumulate);
              worst = std::max(worst, err / bound);
              if (!(err <= bound) && ++failures <= 5)
                ADD_FAILURE() << "c[" << i << "," << j << "]: gpu " << got[i * n + j] << ", cpu "
                              << ref[i * n + j] << ", bound " << bound;
            }
          EXPECT_EQ(failures, 0) << "worst error / bound " << worst;
          // The margin, printed on success too, so that the bound can be set from measurements.
          std::printf(
              "gemm_fp8 %s x %s -> %s, %lldx%lldx%lld%s: measured %.3g of the bound "
              "(bound 1)\n",
              std::string(dtype_name(ta)).c_str(), std::string(dtype_name(tb)).c_str(),
              std::string(dtype_name(c_type)).c_str(), (long long)m, (long long)n, (long long)k,
              accumulate ? ", accumulate" : "", worst);
        }
      }
    }
  }
}

TS_GPU_TEST(GemmFp8, RejectsUnsupportedOperands) {
  TESSERA_REQUIRE_FP8_GPU();
  DeviceTensor a(DType::e5m2, {32, 32}), b(DType::e5m2, {32, 32}), b4(DType::e4m3, {32, 32}),
      c(DType::f32, {32, 32}), s(DType::f32, {1});
  EXPECT_THROW(ops::gemm_fp8(c, a, b, s, s, false), Error);  // e5m2 x e5m2
  DeviceTensor a_odd(DType::e4m3, {32, 24}), b_odd(DType::e4m3, {32, 24});
  EXPECT_THROW(ops::gemm_fp8(c, a_odd, b_odd, s, s, false), Error);  // K = 24, not a multiple of 16
  DeviceTensor c_odd(DType::f32, {32, 24}), b_n24(DType::e4m3, {24, 32});
  EXPECT_THROW(ops::gemm_fp8(c_odd, b4, b_n24, s, s, false), Error);  // N = 24
}

// Scales inside an f32 array (at 4- and 8-byte offsets, as Fp8ScalingState keeps them) with
// llama-1b's projection sizes: the same bits as scales allocated alone, and rows of the result
// within the bound of the CPU reference. Regression: such scales failed with NOT_SUPPORTED.
TS_GPU_TEST(GemmFp8, ScalesAtAnyFloatOffsetAtModelSizes) {
  TESSERA_REQUIRE_FP8_GPU();
  std::mt19937_64 rng(11);
  const int64_t m = 4096, n = 2048, k = 2048;
  auto random_codes = [&](int64_t count) {  // any finite E4M3 code (0x7F and 0xFF are NaN)
    std::vector<uint8_t> v(count);
    for (uint8_t& c : v) {
      c = uint8_t(rng());
      if ((c & 0x7F) == 0x7F) c ^= 1;
    }
    return v;
  };
  std::vector<uint8_t> a_codes = random_codes(m * k), b_codes = random_codes(n * k);
  DeviceTensor a(DType::e4m3, {m, k}), b(DType::e4m3, {n, k}), sa_alone(DType::f32, {1}),
      sb_alone(DType::f32, {1}), scales(DType::f32, {8});
  upload_raw(a, a_codes);
  upload_raw(b, b_codes);
  upload_raw(sa_alone, std::vector<float>{1.0f / 64});
  upload_raw(sb_alone, std::vector<float>{1.0f / 128});
  upload_raw(scales, std::vector<float>{0, 1.0f / 64, 1.0f / 128, 1.0f / 64, 0, 0, 0, 0});
  DeviceTensor c_alone(DType::bf16, {m, n});
  ops::gemm_fp8(c_alone, a, b, sa_alone, sb_alone, false);
  const std::vector<float> want = c_alone.download();
  // a's scale (1/64) at index 1 or 3, b's (1/128) at index 2: byte offsets 4, 12 and 8.
  for (int64_t ia : {1, 3}) {
    const int64_t ib = 2;
    SCOPED_TRACE(::testing::Message() << "scale offsets " << 4 * ia << " and " << 4 * ib);
    DeviceTensor c(DType::bf16, {m, n});
    ops::gemm_fp8(c, a, b, scales.t().slice(ia, ia + 1), scales.t().slice(ib, ib + 1), false);
    const std::vector<float> got = c.download();
    int64_t differ = 0;
    for (int64_t i = 0; i < m * n; ++i)
      differ += std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]);
    EXPECT_EQ(differ, 0);
  }
  // Rows 0, 1 and m-1 against the CPU op.
  for (int64_t row : {int64_t(0), int64_t(1), m - 1}) {
    std::vector<uint16_t> c_cpu(n);
    std::vector<float> s_a{1.0f / 64}, s_b{1.0f / 128};
    ops::gemm_fp8(Tensor(c_cpu.data(), DType::bf16, Device::cpu, {1, n}),
                  Tensor(a_codes.data() + row * k, DType::e4m3, Device::cpu, {1, k}),
                  Tensor(b_codes.data(), DType::e4m3, Device::cpu, {n, k}), host_f32(s_a, {1}),
                  host_f32(s_b, {1}), false);
    int64_t failures = 0;
    for (int64_t j = 0; j < n; ++j) {
      double s_abs = 0.0;
      for (int64_t p = 0; p < k; ++p)
        s_abs += std::fabs(double(e4m3_bits_to_f32(a_codes[row * k + p])) *
                           e4m3_bits_to_f32(b_codes[j * k + p]));
      const double ref = bf16_bits_to_f32(c_cpu[j]);
      const double bound = gemm_bound(s_abs / (64.0 * 128.0), 0.0, ref, false, DType::bf16, false);
      if (!(std::fabs(want[row * n + j] - ref) <= bound) && ++failures <= 3)
        ADD_FAILURE() << "c[" << row << "," << j << "]: gpu " << want[row * n + j] << ", cpu "
                      << ref << ", bound " << bound;
    }
    EXPECT_EQ(failures, 0) << "row " << row;
  }
}

// ---- fp8_update_scales ----------------------------------------------------------------------

TS_GPU_PARITY_TEST(Fp8UpdateScales, BitExactWithCpuOverSteps, "fp8_update_scales") {
  std::mt19937_64 rng(21);
  const float inf = std::numeric_limits<float>::infinity();
  for (auto compute : {ops::Fp8AmaxCompute::max, ops::Fp8AmaxCompute::most_recent}) {
    for (int margin : {0, 3}) {
      const int64_t len = 7, n = 300;
      std::vector<float> hist(len * n, 0.0f), scale(n, 1.0f), scale_inv(n, 1.0f), fp8_max(n);
      for (int64_t j = 0; j < n; ++j) fp8_max[j] = j % 3 == 0 ? 57344.0f : 448.0f;
      DeviceTensor hist_d(DType::f32, {len, n}), scale_d(DType::f32, {n}),
          scale_inv_d(DType::f32, {n}), amax_d(DType::f32, {n}), max_d(DType::f32, {n});
      upload_raw(hist_d, hist);
      upload_raw(scale_d, scale);
      upload_raw(scale_inv_d, scale_inv);
      upload_raw(max_d, fp8_max);
      ops::Fp8UpdateParams cpu_params, gpu_params;
      cpu_params.fp8_max = host_f32(fp8_max, {n});
      gpu_params.fp8_max = max_d;
      cpu_params.amax_compute = gpu_params.amax_compute = compute;
      cpu_params.margin = gpu_params.margin = margin;
      std::uniform_int_distribution<int> pick(0, 19), exp(-140, 30);
      std::uniform_real_distribution<float> mant(1.0f, 2.0f);
      for (int step = 0; step < 12; ++step) {
        std::vector<float> amax(n);
        for (auto& a : amax) {
          const int p = pick(rng);
          a = p == 0   ? 0.0f
              : p == 1 ? inf
              : p == 2 ? std::numeric_limits<float>::quiet_NaN()
                       : std::ldexp(mant(rng), exp(rng));
        }
        upload_raw(amax_d, amax);
        ops::fp8_update_scales(host_f32(hist, {len, n}), host_f32(scale, {n}),
                               host_f32(scale_inv, {n}), host_f32(amax, {n}), cpu_params);
        ops::fp8_update_scales(hist_d, scale_d, scale_inv_d, amax_d, gpu_params);
        auto same_bits = [](const std::vector<float>& x, const std::vector<float>& y) {
          return std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
        };
        EXPECT_TRUE(same_bits(download_raw<float>(hist_d), hist)) << "history, step " << step;
        EXPECT_TRUE(same_bits(download_raw<float>(scale_d), scale)) << "scale, step " << step;
        EXPECT_TRUE(same_bits(download_raw<float>(scale_inv_d), scale_inv))
            << "scale_inv, step " << step;
        EXPECT_TRUE(same_bits(download_raw<float>(amax_d), amax)) << "amax, step " << step;
      }
      EXPECT_TRUE(hist_d.guards_intact() && scale_d.guards_intact() &&
                  scale_inv_d.guards_intact() && amax_d.guards_intact());
    }
  }
}

}  // namespace
}  // namespace tessera::testing
