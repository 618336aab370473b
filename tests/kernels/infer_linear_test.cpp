// Tests of infer_linear_forward (kernels/cpu/infer_linear.cpp, kernels/cuda/infer_linear.cu).
// CPU: INT8/INT4 weights against quant::dequantize_rows plus a double matmul, float weights
// against a double matmul, awkward shapes (K not a multiple of 64, odd M, N = 1, groups 2..K),
// batch invariance (a row alone equals that row inside a batch, bit for bit), bf16/f16 through
// NarrowScope against the f32 kernel rounded once, rejected arguments, bounds, thread counts.
// GPU: parity with the CPU on aligned and unaligned shapes in f32/bf16/f16, and bitwise batch
// invariance (rows alone, inside M = 3, 8, 9, 33, 300, decode passes against prefill passes).
// Shape letters: M rows, N output features, K input features, G = K / group.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/infer.h"
#include "kernels/ops_infer.h"
#include "kernels/quantize.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

enum class WFormat { int8, int4, dense };

const char* format_name(WFormat f) {
  return f == WFormat::int8 ? "int8" : f == WFormat::int4 ? "int4" : "dense";
}

// A weight (N,K) in host memory in the layout InferWeight expects, and its exact f32 values.
struct HostWeight {
  WFormat format = WFormat::dense;
  int64_t n = 0, k = 0, group = 0;
  std::vector<int8_t> codes;     // (N,K) int8 codes, or int4 codes one per byte
  std::vector<uint8_t> packed;   // (N,K/2) int4: element 2j in the low nibble
  std::vector<uint16_t> scales;  // (N,G) f16 bits
  std::vector<float> values;     // (N,K) what the weight stands for (dequantized, or dense)

  // The weight over host memory (`dense` holds the dense weight in its dtype when not f32).
  ops::InferWeight view(Tensor dense = {}) {
    ops::InferWeight w;
    w.group = format == WFormat::dense ? 0 : group;
    if (format == WFormat::int8) {
      w.w = Tensor(codes.data(), DType::i8, Device::cpu, {n, k});
    } else if (format == WFormat::int4) {
      w.w = Tensor(packed.data(), DType::i4, Device::cpu, {n, k});
    } else {
      w.w = dense.empty() ? Tensor(values.data(), DType::f32, Device::cpu, {n, k}) : dense;
    }
    if (format != WFormat::dense)
      w.scales = Tensor(scales.data(), DType::f16, Device::cpu, {n, k / group});
    return w;
  }
};

// Random weight; quantized ones through quant::quantize_rows and back through dequantize_rows.
// Rows get different magnitudes so the group scales differ.
HostWeight make_weight(WFormat format, int64_t n, int64_t k, int64_t group, std::mt19937_64& rng) {
  HostWeight w;
  w.format = format, w.n = n, w.k = k, w.group = group;
  std::vector<float> raw = random_vector(n * k, rng);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) raw[r * k + c] *= 0.25f + 0.1f * float(r % 7) + float(c % 5);
  if (format == WFormat::dense) {
    w.values = raw;
    return w;
  }
  w.codes.resize(n * k);
  w.scales.resize(n * (k / group));
  const auto bits = format == WFormat::int8 ? quant::IntBits::int8 : quant::IntBits::int4;
  quant::quantize_rows(raw.data(), n, k, bits, group, w.codes.data(), w.scales.data());
  w.values.resize(n * k);
  quant::dequantize_rows(w.codes.data(), w.scales.data(), n, k, group, w.values.data());
  if (format == WFormat::int4) {
    w.packed.assign(n * k / 2, 0);
    for (int64_t i = 0; i < n * k; ++i)
      w.packed[i / 2] |= uint8_t((uint8_t(w.codes[i]) & 0xF) << (i % 2 == 0 ? 0 : 4));
  }
  return w;
}

// out (M,N) = x · values^T + bias in double, rounded once to f32.
std::vector<float> naive_linear(const std::vector<float>& x, const HostWeight& w, int64_t m,
                                const std::vector<float>& bias) {
  std::vector<float> out(m * w.n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < w.n; ++c) {
      double acc = 0.0;
      for (int64_t i = 0; i < w.k; ++i)
        acc += double(x[r * w.k + i]) * double(w.values[c * w.k + i]);
      out[r * w.n + c] = float(acc + (bias.empty() ? 0.0 : double(bias[c])));
    }
  return out;
}

struct LinearShape {
  int64_t m, n, k, group;  // group: 0 for dense
};

// ---- CPU reference -----------------------------------------------------------------------------

TS_CPU_VALUE_TEST(InferLinear, MatchesDequantizedDoubleMatmul, "infer_linear_forward") {
  std::mt19937_64 rng(1);
  const LinearShape shapes[] = {{1, 1, 64, 64},    {3, 5, 96, 32}, {7, 17, 200, 40},
                                {1, 33, 128, 128}, {5, 9, 258, 2}, {2, 3, 192, 64},
                                {9, 1, 100, 100},  {4, 6, 160, 32}};
  for (WFormat format : {WFormat::int8, WFormat::int4, WFormat::dense})
    for (const LinearShape& s : shapes)
      for (bool with_bias : {false, true}) {
        const HostWeight w0 = make_weight(format, s.n, s.k, s.group, rng);
        HostWeight w = w0;
        std::vector<float> x = random_vector(s.m * s.k, rng);
        std::vector<float> bias = with_bias ? random_vector(s.n, rng) : std::vector<float>{};
        std::vector<float> out(s.m * s.n, -1.0f);
        cpu::infer_linear_forward(host(out, {s.m, s.n}), host(x, {s.m, s.k}), w.view(),
                                  with_bias ? host(bias, {s.n}) : Tensor());
        const std::vector<float> want = naive_linear(x, w0, s.m, bias);
        // Both sum exact f32 products in double in k order and round once: equal but for the
        // double sums' own rounding (1e-16 relative), far below one f32 ulp.
        for (size_t i = 0; i < out.size(); ++i)
          ASSERT_NEAR(out[i], want[i], 1e-6 * (1.0 + std::fabs(want[i])))
              << format_name(format) << " M " << s.m << " N " << s.n << " K " << s.k << " group "
              << s.group << " bias " << with_bias << " element " << i;
      }
}

TEST(InferLinear, HandExampleInt4) {
  // One row, K = 4, group 2: codes (-8, 7 | 1, -1), scales (0.5 | 2): w = (-4, 3.5, 2, -2).
  HostWeight w;
  w.format = WFormat::int4, w.n = 1, w.k = 4, w.group = 2;
  w.packed = {uint8_t(0x8 | (0x7 << 4)), uint8_t(0x1 | (0xF << 4))};
  w.scales = {f32_to_f16_bits(0.5f), f32_to_f16_bits(2.0f)};
  std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f}, out(1), bias = {0.25f};
  cpu::infer_linear_forward(host(out, {1, 1}), host(x, {1, 4}), w.view(), host(bias, {1}));
  EXPECT_EQ(out[0], -4.0f + 7.0f + 6.0f - 8.0f + 0.25f);
}

TEST(InferLinear, RowAloneEqualsRowInBatch) {
  std::mt19937_64 rng(2);
  const int64_t n = 13, k = 320, m = 9;
  for (WFormat format : {WFormat::int8, WFormat::int4, WFormat::dense}) {
    HostWeight w = make_weight(format, n, k, 64, rng);
    std::vector<float> x = random_vector(m * k, rng), all(m * n), one(n);
    cpu::infer_linear_forward(host(all, {m, n}), host(x, {m, k}), w.view(), Tensor());
    for (int64_t r : {0, 4, 8}) {
      std::vector<float> row(x.begin() + r * k, x.begin() + (r + 1) * k);
      cpu::infer_linear_forward(host(one, {1, n}), host(row, {1, k}), w.view(), Tensor());
      for (int64_t c = 0; c < n; ++c)
        ASSERT_EQ(one[c], all[r * n + c]) << format_name(format) << " row " << r << " col " << c;
    }
  }
}

TEST(InferLinear, F32MatchesF64) {
  std::mt19937_64 rng(3);
  const int64_t m = 3, n = 7, k = 96;
  HostWeight w = make_weight(WFormat::int8, n, k, 32, rng);
  HostTensor x32 = randn(DType::f32, {m, k}, rng);
  HostTensor x64 = to_dtype(x32, DType::f64);
  HostTensor o32(DType::f32, {m, n}), o64(DType::f64, {m, n});
  cpu::infer_linear_forward(o32, x32, w.view(), Tensor());
  cpu::infer_linear_forward(o64, x64, w.view(), Tensor());
  // The same double sums; f32 adds one rounding of outputs of size ~10 (6e-8 relative).
  EXPECT_LE(max_abs_diff(o32, o64), 1e-5);
}

TEST(InferLinear, RejectsBadArguments) {
  std::mt19937_64 rng(4);
  HostWeight w8 = make_weight(WFormat::int8, 4, 64, 32, rng);
  HostTensor x(DType::f32, {2, 64}), out(DType::f32, {2, 4}), x64(DType::f64, {2, 64});
  ops::InferWeight bad = w8.view();
  bad.group = 24;  // does not divide K
  EXPECT_THROW(cpu::infer_linear_forward(out, x, bad, Tensor()), Error);
  bad = w8.view();
  bad.scales.shape = Shape{4, 3};
  EXPECT_THROW(cpu::infer_linear_forward(out, x, bad, Tensor()), Error);
  HostWeight w4 = make_weight(WFormat::int4, 4, 64, 32, rng);
  bad = w4.view();
  bad.scales = Tensor(w4.scales.data(), DType::f16, Device::cpu, {4, 64});
  bad.group = 1;  // int4 groups are even
  EXPECT_THROW(cpu::infer_linear_forward(out, x, bad, Tensor()), Error);
  HostWeight dense = make_weight(WFormat::dense, 4, 64, 0, rng);
  EXPECT_THROW(cpu::infer_linear_forward(out, x64, dense.view(), Tensor()), Error);  // dtypes
  HostTensor wrong_out(DType::f32, {2, 5});
  EXPECT_THROW(cpu::infer_linear_forward(wrong_out, x, w8.view(), Tensor()), Error);
  HostTensor no_rows(DType::f32, {0, 64}), no_out(DType::f32, {0, 4});
  EXPECT_THROW(cpu::infer_linear_forward(no_out, no_rows, w8.view(), Tensor()), Error);
}

// ---- bf16/f16 through ops:: on the CPU ----------------------------------------------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, InferLinearDense) {
  for (DType dt : kNarrowTypes) {
    expect_contract(
        "infer_linear_forward dense", dt, {narrow({3, 5}), narrow({3, 40}), narrow({5, 40})},
        [](const auto& t) {
          ops::InferWeight w;
          w.w = t[2];
          ops::infer_linear_forward(t[0], t[1], w, Tensor());
        },
        60);
  }
}

// Quantized weights: the codes and f16 scales are not float operands of the contract check, so
// they are captured from a fixed weight; bias (N) is the fourth operand.
TEST(NarrowDtype, InferLinearQuantized) {
  std::mt19937_64 rng(61);
  for (WFormat format : {WFormat::int8, WFormat::int4}) {
    HostWeight w = make_weight(format, 6, 96, 32, rng);
    for (DType dt : kNarrowTypes)
      expect_contract(
          std::string("infer_linear_forward ") + format_name(format), dt,
          {narrow({4, 6}), narrow({4, 96}), narrow({6})},
          [&](const auto& t) { ops::infer_linear_forward(t[0], t[1], w.view(), t[2]); }, 62);
  }
}

}  // namespace narrow_cases

TEST(InferLinear, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(97);
  HostWeight w = make_weight(WFormat::int4, 5, 64, 32, rng);
  const HostTensor x = randn(DType::f32, {3, 64}, rng);
  Guarded out({3, 5});
  cpu::infer_linear_forward(out, x, w.view(), Tensor());
  expect_guards_intact({&out}, "infer_linear_forward");
}

TEST(InferLinear, IsThreadCountIndependent) {
  std::mt19937_64 rng(98);
  HostWeight w = make_weight(WFormat::int8, 96, 512, 64, rng);
  const HostTensor x = randn(DType::f32, {8, 512}, rng);
  HostTensor out(DType::f32, {8, 96});
  expect_thread_independent("infer_linear_forward", {&out},
                            [&] { cpu::infer_linear_forward(out, x, w.view(), Tensor()); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/infer_linear.cu) ------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::HostWeight;
using testing::settle;
using testing::WFormat;

// The weight on the device: codes (i8 or i4) and f16 scales as stored, or the dense weight rounded
// to the activations' dtype (hw.values is rounded in place, so the CPU sees the same weight).
struct DeviceWeight {
  std::unique_ptr<DeviceTensor> w, scales;
  ops::InferWeight view;

  DeviceWeight(HostWeight& hw, DType act) {
    if (hw.format == WFormat::dense) {
      hw.values = testing::round_to(act, hw.values);
      w = std::make_unique<DeviceTensor>(act, Shape{hw.n, hw.k});
      w->upload(hw.values);
    } else {
      const bool int8 = hw.format == WFormat::int8;
      w = std::make_unique<DeviceTensor>(int8 ? DType::i8 : DType::i4, Shape{hw.n, hw.k});
      w->upload_bytes(int8 ? static_cast<const void*>(hw.codes.data()) : hw.packed.data());
      scales = std::make_unique<DeviceTensor>(DType::f16, Shape{hw.n, hw.k / hw.group});
      scales->upload_bytes(hw.scales.data());
      view.scales = scales->t();
      view.group = hw.group;
    }
    view.w = w->t();
  }
};

// CPU reference on the host copy (exact f32 weight values, dense or dequantized).
std::vector<float> cpu_reference(std::vector<float> x, const HostWeight& hw, int64_t m,
                                 std::vector<float> bias) {
  std::vector<float> out(m * hw.n);
  HostWeight dense = hw;
  dense.format = WFormat::dense;  // the dequantized values as a dense f32 weight
  cpu::infer_linear_forward(host(out, {m, hw.n}), host(x, {m, hw.k}), dense.view(),
                            bias.empty() ? Tensor() : host(bias, {hw.n}));
  return out;
}

// The CPU sums exact products in double and rounds once; the GPU sums the same products with f32
// FMAs, 32 lane sums of K/32 terms then a 5-level butterfly: relative error ~ sqrt(K) * 2^-24 on
// outputs whose terms do not cancel badly, < 1e-5 in L2 for K <= 4096. bf16 output rounding adds
// 2^-9 per element (~2.3e-3 in L2 of normal data), f16 2^-11 (~6e-4).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct GpuLinearCase {
  WFormat format;
  int64_t m, n, k, group;
};
// Aligned rows (16-byte loads) and unaligned ones (K = 200, 258, 100: byte loads and a partial
// last chunk), groups from 2 to K, chunk-aligned and not, N = 1, M on both sides of 8.
const GpuLinearCase kCases[] = {
    {WFormat::int8, 1, 2048, 2048, 32}, {WFormat::int8, 3, 37, 200, 40},
    {WFormat::int8, 9, 64, 4096, 128},  {WFormat::int8, 33, 1, 96, 96},
    {WFormat::int4, 1, 512, 2048, 32},  {WFormat::int4, 5, 37, 258, 2},
    {WFormat::int4, 9, 130, 2048, 64},  {WFormat::int4, 17, 3, 2048, 2048},
    {WFormat::int4, 2, 20, 96, 48},     {WFormat::dense, 1, 300, 2048, 0},
    {WFormat::dense, 8, 17, 100, 0},    {WFormat::dense, 40, 257, 512, 0},
};

class InferLinearGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(InferLinearGpu, MatchesCpu, "infer_linear_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(41);
  for (const GpuLinearCase& c : kCases) {
    for (bool with_bias : {false, true}) {
      HostWeight hw = testing::make_weight(c.format, c.n, c.k, c.group, rng);
      DeviceWeight dw(hw, dtype);
      auto x = testing::round_to(dtype, testing::random_vector(c.m * c.k, rng));
      auto bias = with_bias ? testing::round_to(dtype, testing::random_vector(c.n, rng))
                            : std::vector<float>{};
      const std::vector<float> want = cpu_reference(x, hw, c.m, bias);
      DeviceTensor gx(dtype, {c.m, c.k}), gout(dtype, {c.m, c.n}), gbias(dtype, {c.n});
      gx.upload(x);
      if (with_bias) gbias.upload(bias);
      settle();
      ops::infer_linear_forward(gout, gx, dw.view, with_bias ? gbias.t() : Tensor());
      const auto got = gout.download();
      const std::string what = std::string(dtype_name(dtype)) + " " +
                               testing::format_name(c.format) + " M " + std::to_string(c.m) +
                               " N " + std::to_string(c.n) + " K " + std::to_string(c.k) +
                               " group " + std::to_string(c.group);
      EXPECT_LE(testing::rel_l2(got, want), tolerance(dtype)) << what;
      testing::expect_same_nonfinite(got, want, what);
      EXPECT_TRUE(gout.guards_intact()) << what;
    }
  }
}

// Bitwise: each row of a 300-row batch equals the first M rows computed as a batch of M (M = 1
// is decode at batch 1, M <= 8 one pass, larger M several passes) and each of a few rows
// computed alone.
TEST_P(InferLinearGpu, RowsAreBatchInvariantBitwise) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(42);
  const int64_t full_m = 300;
  struct Shape3 {
    WFormat format;
    int64_t n, k, group;
  };
  for (const Shape3& s : {Shape3{WFormat::int4, 384, 2048, 32}, Shape3{WFormat::int8, 70, 200, 40},
                          Shape3{WFormat::dense, 96, 1024, 0}, Shape3{WFormat::int4, 33, 258, 2}}) {
    HostWeight hw = testing::make_weight(s.format, s.n, s.k, s.group, rng);
    DeviceWeight dw(hw, dtype);
    const auto x = testing::round_to(dtype, testing::random_vector(full_m * s.k, rng));
    DeviceTensor gx(dtype, {full_m, s.k}), full(dtype, {full_m, s.n});
    gx.upload(x);
    settle();
    ops::infer_linear_forward(full, gx, dw.view, Tensor());
    const auto want = full.download_bytes();
    const size_t row_bytes = want.size() / full_m;
    for (int64_t m : {1, 3, 8, 9, 33}) {
      DeviceTensor part(dtype, {m, s.n});
      ops::infer_linear_forward(part, gx.t().slice(0, m), dw.view, Tensor());
      const auto got = part.download_bytes();
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin()))
          << testing::format_name(s.format) << " first " << m << " rows differ from M = 300";
    }
    for (int64_t r : {1, 7, 8, 150, 299}) {
      DeviceTensor one(dtype, {1, s.n});
      ops::infer_linear_forward(one, gx.t().slice(r, r + 1), dw.view, Tensor());
      const auto got = one.download_bytes();
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin() + r * row_bytes))
          << testing::format_name(s.format) << " row " << r << " alone differs";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, InferLinearGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
