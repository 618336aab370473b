// Tests of QAT's fake quantization (kernels/cpu/fake_quant.cpp, kernels/cuda/fake_quant.cu):
// the CPU op equals quant::quantize_rows + dequantize_rows (the exporters' functions) bit for bit,
// f64 and bf16/f16 inputs, in place, row_absmax and a row split over two "tp ranks" whose max-
// reduced amax reproduces the whole row, errors; GPU parity bit for bit (f32, bf16, f16; awkward
// shapes, int4 ties, zero groups, per-row and per-group, in place, the row_amax path). The
// straight-through backward has no op: its contract is tested in tests/optim/qat_linear_test.cpp.
// Shape letters: R rows, K columns.
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "kernels/quantize.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

using quant::IntBits;

struct Shape2 {
  int64_t rows, cols, group;
  IntBits bits;
};

const Shape2 kCases[] = {
    {1, 32, 32, IntBits::int4},     {3, 96, 32, IntBits::int8},     {7, 1088, 64, IntBits::int4},
    {5, 384, 128, IntBits::int8},   {2, 1025, 1025, IntBits::int8}, {17, 50, 50, IntBits::int8},
    {4, 8192, 8192, IntBits::int8}, {33, 160, 32, IntBits::int4},   {1, 7, 7, IntBits::int4},
    {9, 256, 128, IntBits::int4},
};

std::string describe(const Shape2& c) {
  return "(" + std::to_string(c.rows) + "," + std::to_string(c.cols) + ") group " +
         std::to_string(c.group) + (c.bits == IntBits::int8 ? " int8" : " int4");
}

// Normal values with the hard cases planted: in every fourth group two elements tie for the
// largest |x| with opposite signs, every fifth group is all zeros (some -0), and some elements
// sit on half-steps of their group's int8 grid.
std::vector<float> hard_inputs(const Shape2& c, std::mt19937_64& rng) {
  std::vector<float> v = testing::random_vector(c.rows * c.cols, rng, 0.05f);
  const int64_t groups = c.rows * (c.cols / c.group);
  for (int64_t g = 0; g < groups; ++g) {
    float* x = v.data() + g * c.group;
    if (g % 5 == 4) {
      for (int64_t j = 0; j < c.group; ++j) x[j] = j % 3 == 0 ? -0.0f : 0.0f;
    } else if (g % 4 == 1 && c.group >= 4) {
      x[1] = 0.5f;
      x[c.group - 2] = -0.5f;
      for (int64_t j = 0; j < c.group; ++j)
        if (j != 1 && j != c.group - 2) x[j] = std::fmod(x[j], 0.4f);
    } else if (g % 4 == 2 && c.group >= 4) {
      x[0] = 1.27f;  // d = 0.01: x = 0.005 is half a step
      x[2] = 0.005f;
      x[3] = -0.015f;
    }
  }
  return v;
}

// The exporters' functions on the same f32 values.
std::vector<float> via_quantize_rows(const std::vector<float>& w, const Shape2& c) {
  std::vector<int8_t> codes(w.size());
  std::vector<uint16_t> scales(c.rows * (c.cols / c.group));
  std::vector<float> out(w.size());
  quant::quantize_rows(w.data(), c.rows, c.cols, c.bits, c.group, codes.data(), scales.data());
  quant::dequantize_rows(codes.data(), scales.data(), c.rows, c.cols, c.group, out.data());
  return out;
}

void expect_bits(const std::vector<float>& got, const std::vector<float>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
        << what << " element " << i << ": " << got[i] << " vs " << want[i];
}

// ---- CPU reference -----------------------------------------------------------------------------

TEST(FakeQuantize, EqualsTheExportersQuantizeRows) {
  std::mt19937_64 rng(81);
  for (const Shape2& c : kCases) {
    std::vector<float> w = hard_inputs(c, rng), out(w.size());
    cpu::fake_quantize(host(out, {c.rows, c.cols}), host(w, {c.rows, c.cols}), c.bits, c.group);
    expect_bits(out, via_quantize_rows(w, c), describe(c));
  }
}

TEST(FakeQuantize, HandComputedInt4Group) {
  // Signed max -8: d = 1; codes min(15, trunc(x + 8.5)) - 8 (see quantize_test.cpp).
  std::vector<float> w = {1.0f, -8.0f, 2.5f, -2.5f, 0.49f, 7.6f, 7.4f, -7.5f}, out(8);
  ops::fake_quantize(host(out, {1, 8}), host(w, {1, 8}), IntBits::int4, 8);
  expect_bits(out, {1, -8, 3, -2, 0, 7, 7, -7}, "int4");
}

TEST(FakeQuantize, F64InputIsQuantizedAsItsF32Value) {
  std::mt19937_64 rng(82);
  const Shape2 c{6, 64, 32, IntBits::int4};
  std::vector<float> w = hard_inputs(c, rng), want(w.size());
  HostTensor in64(DType::f64, {c.rows, c.cols}), out64(DType::f64, {c.rows, c.cols});
  // Doubles just off the f32 values: their f32 rounding is w again.
  for (size_t i = 0; i < w.size(); ++i) in64.set(int64_t(i), double(w[i]) * (1.0 + 1e-12));
  cpu::fake_quantize(out64, in64, c.bits, c.group);
  cpu::fake_quantize(host(want, {c.rows, c.cols}), host(w, {c.rows, c.cols}), c.bits, c.group);
  for (size_t i = 0; i < w.size(); ++i) ASSERT_EQ(out64.get(int64_t(i)), double(want[i])) << i;
}

TEST(FakeQuantize, InPlaceMatchesOutOfPlace) {
  std::mt19937_64 rng(83);
  const Shape2 c{5, 384, 128, IntBits::int8};
  std::vector<float> w = hard_inputs(c, rng), out(w.size()), in_place = w;
  cpu::fake_quantize(host(out, {c.rows, c.cols}), host(w, {c.rows, c.cols}), c.bits, c.group);
  cpu::fake_quantize(host(in_place, {c.rows, c.cols}), host(in_place, {c.rows, c.cols}), c.bits,
                     c.group);
  expect_bits(in_place, out, "in place");
}

TEST(FakeQuantize, RowAbsmaxIgnoresNaNAndSign) {
  std::vector<float> x = {1.0f, -3.0f, 2.0f, std::nanf(""), 0.0f, -0.0f, 0.0f, 0.0f}, amax(2);
  ops::row_absmax(host(amax, {2}), host(x, {2, 4}));
  EXPECT_EQ(amax[0], 3.0f);
  EXPECT_EQ(std::bit_cast<uint32_t>(amax[1]), 0u);  // +0 for a row of zeros
  x[4] = 0.75f;
  ops::row_absmax(host(amax, {2}), host(x, {2, 4}));
  EXPECT_EQ(amax[1], 0.75f);
}

// A row-parallel layer under tp 2: each rank holds half of every row; the max of the two ranks'
// row_absmax is the whole row's amax, and each half quantized with it equals the corresponding
// half of the whole row quantized per output channel, bit for bit.
TEST(FakeQuantize, RowAmaxOverTwoShardsEqualsTheWholeRow) {
  std::mt19937_64 rng(84);
  const int64_t R = 9, K = 96, Kl = K / 2;
  std::vector<float> w = testing::random_vector(R * K, rng, 0.05f), whole(R * K);
  w[5] = 0.9f;         // row 0's max in the first half
  w[K + Kl + 3] = -1;  // row 1's max in the second half
  cpu::fake_quantize(host(whole, {R, K}), host(w, {R, K}), IntBits::int8, K);
  std::vector<float> half[2], amax[2], out[2];
  for (int r = 0; r < 2; ++r) {
    half[r].resize(R * Kl);
    for (int64_t i = 0; i < R; ++i)
      std::memcpy(&half[r][i * Kl], &w[i * K + r * Kl], Kl * sizeof(float));
    amax[r].resize(R);
    ops::row_absmax(host(amax[r], {R}), host(half[r], {R, Kl}));
  }
  std::vector<float> reduced(R);
  for (int64_t i = 0; i < R; ++i) reduced[i] = std::max(amax[0][i], amax[1][i]);
  for (int r = 0; r < 2; ++r) {
    out[r].resize(R * Kl);
    ops::fake_quantize(host(out[r], {R, Kl}), host(half[r], {R, Kl}), IntBits::int8, Kl,
                       host(reduced, {R}));
    for (int64_t i = 0; i < R; ++i)
      for (int64_t k = 0; k < Kl; ++k)
        ASSERT_EQ(std::bit_cast<uint32_t>(out[r][i * Kl + k]),
                  std::bit_cast<uint32_t>(whole[i * K + r * Kl + k]))
            << "rank " << r << " row " << i << " col " << k;
  }
}

TEST(FakeQuantize, RejectsBadArguments) {
  std::vector<float> w(64), out(64), amax(2);
  EXPECT_THROW(ops::fake_quantize(host(out, {2, 32}), host(w, {2, 32}), IntBits::int4, 24), Error);
  EXPECT_THROW(ops::fake_quantize(host(out, {2, 32}), host(w, {2, 32}), IntBits::int4, 0), Error);
  // row_amax only with int8 per row.
  EXPECT_THROW(
      ops::fake_quantize(host(out, {2, 32}), host(w, {2, 32}), IntBits::int4, 32, host(amax, {2})),
      Error);
  EXPECT_THROW(
      ops::fake_quantize(host(out, {2, 32}), host(w, {2, 32}), IntBits::int8, 16, host(amax, {2})),
      Error);
  // Partial overlap.
  EXPECT_THROW(
      ops::fake_quantize(Tensor(out.data() + 1, DType::f32, Device::cpu, {1, 32}),
                         Tensor(out.data(), DType::f32, Device::cpu, {1, 32}), IntBits::int8, 32),
      Error);
}

// bf16/f16 through ops: the f32 kernel on the exactly widened input, each value rounded once.
TEST(NarrowDtype, FakeQuantize) {
  using namespace n16;
  for (DType dt : kNarrowTypes) {
    const Shape s{6, 128};
    expect_contract(
        "fake_quantize int4 g32", dt, {narrow(s), narrow(s, 0.05)},
        [](const auto& t) { ops::fake_quantize(t[0], t[1], IntBits::int4, 32); }, 90);
    expect_contract(
        "fake_quantize int8 per row in place", dt, {narrow(s, 0.05)},
        [](const auto& t) { ops::fake_quantize(t[0], t[0], IntBits::int8, 128); }, 91);
    expect_contract(
        "row_absmax", dt, {f32(Shape{6}), narrow(s)},
        [](const auto& t) { ops::row_absmax(t[0], t[1]); }, 92);
  }
}

// ---- GPU parity (kernels/cuda/fake_quant.cu): bit for bit
// ----------------------------------------

using testing::DeviceTensor;
using testing::host;
using testing::settle;

class FakeQuantizeGpu : public testing::GpuCaseP<DType> {};

// The CPU reference on the values the GPU sees (rounded to the dtype), its f32 results rounded
// once to the dtype: what the contract says both backends write.
std::vector<float> cpu_reference(std::vector<float> w, const Shape2& c, DType dtype,
                                 std::vector<float>* row_amax = nullptr) {
  std::vector<float> out(w.size());
  cpu::fake_quantize(host(out, {c.rows, c.cols}), host(w, {c.rows, c.cols}), c.bits, c.group,
                     row_amax ? host(*row_amax, {c.rows}) : Tensor());
  return testing::round_to(dtype, out);
}

TS_GPU_PARITY_TEST_P(FakeQuantizeGpu, ValuesMatchCpuBitForBit, "fake_quantize", "row_absmax") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(85);
  for (const Shape2& c : kCases) {
    const std::string what = describe(c) + " " + std::string(dtype_name(dtype));
    const std::vector<float> w = testing::round_to(dtype, hard_inputs(c, rng));
    const std::vector<float> want = cpu_reference(w, c, dtype);
    DeviceTensor gw(dtype, {c.rows, c.cols}), gout(dtype, {c.rows, c.cols});
    DeviceTensor gamax(DType::f32, {c.rows});
    gw.upload(w);
    settle();
    ops::fake_quantize(gout, gw, c.bits, c.group);
    expect_bits(gout.download(), want, what);
    EXPECT_TRUE(gout.guards_intact()) << what;
    // row_absmax exactly, and the row_amax path (int8 per row) with it.
    ops::row_absmax(gamax, gw);
    std::vector<float> amax(c.rows), wc = w;
    cpu::row_absmax(host(amax, {c.rows}), host(wc, {c.rows, c.cols}));
    expect_bits(gamax.download(), amax, what + " row_absmax");
    EXPECT_TRUE(gamax.guards_intact()) << what;
    if (c.bits == IntBits::int8 && c.group == c.cols) {
      std::vector<float> doubled(c.rows);
      for (int64_t i = 0; i < c.rows; ++i) doubled[i] = 2.0f * amax[i];  // another rank's max
      gamax.upload(doubled);
      ops::fake_quantize(gout, gw, c.bits, c.group, gamax);
      expect_bits(gout.download(), cpu_reference(w, c, dtype, &doubled), what + " row_amax");
    }
    // In place.
    ops::fake_quantize(gw, gw, c.bits, c.group);
    expect_bits(gw.download(), want, what + " in place");
    EXPECT_TRUE(gw.guards_intact()) << what;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FakeQuantizeGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::testing
