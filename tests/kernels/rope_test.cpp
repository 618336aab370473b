// Tests of rope_forward / rope_backward (rotate-half pairing; kernels/cpu/rope.cpp,
// kernels/cuda/rope.cu). CPU: against a complex-number rotation and against Hugging Face's
// rotate_half formula written out here, orthogonality (backward undoes forward), pos_offset,
// in-place use, finite differences, f32 vs f64, rejected arguments; bf16/f16 against the f32
// kernel rounded once; bounds and thread counts. GPU parity: f32, bf16, f16, in place, a cos/sin
// table larger than the workspace (chunked), rejected shapes.
// rope_rows_forward (kernels/ops_infer.h): CPU bit for bit equal to rope_forward at each row's
// position, padding rows copied, in place, bf16/f16 rounded once; GPU against the CPU and bit for
// bit against CUDA's rope_forward.
// Shape letters: B batch, T time, H heads, D head dim, M rows.
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

#include <complex>
#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/infer.h"
#include "kernels/ops.h"
#include "kernels/ops_infer.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

// x (B,T,H,D) rotated as complex numbers z_i = x[i] + i x[i + D/2], z_i *= e^{i angle}.
HostTensor complex_rotation_reference(const HostTensor& x, double theta, int pos_offset) {
  HostTensor out(DType::f64, x.t.shape);
  const int64_t num_b = x.t.dim(0), num_t = x.t.dim(1), num_h = x.t.dim(2), dim = x.t.dim(3);
  for (int64_t b = 0; b < num_b; ++b)
    for (int64_t t = 0; t < num_t; ++t)
      for (int64_t h = 0; h < num_h; ++h) {
        const int64_t base = ((b * num_t + t) * num_h + h) * dim;
        for (int64_t i = 0; i < dim / 2; ++i) {
          const double angle = double(t + pos_offset) * std::pow(theta, -2.0 * i / dim);
          const std::complex<double> z(x.get(base + i), x.get(base + i + dim / 2));
          const std::complex<double> r = z * std::polar(1.0, angle);
          out.set(base + i, r.real());
          out.set(base + i + dim / 2, r.imag());
        }
      }
  return out;
}

// Hugging Face Llama/Qwen3 apply_rotary_pos_emb, transcribed step by step:
//   inv_freq = 1 / theta^(arange(0, D, 2) / D); freqs = pos * inv_freq; emb = cat(freqs, freqs);
//   out = x * cos(emb) + rotate_half(x) * sin(emb), rotate_half(x) = cat(-x[D/2:], x[:D/2]).
HostTensor hugging_face_reference(const HostTensor& x, double theta, int pos_offset) {
  HostTensor out(DType::f64, x.t.shape);
  const int64_t num_b = x.t.dim(0), num_t = x.t.dim(1), num_h = x.t.dim(2), dim = x.t.dim(3);
  std::vector<double> inv_freq;
  for (int64_t j = 0; j < dim; j += 2) inv_freq.push_back(1.0 / std::pow(theta, double(j) / dim));
  for (int64_t b = 0; b < num_b; ++b)
    for (int64_t t = 0; t < num_t; ++t) {
      std::vector<double> emb;  // (D)
      for (double f : inv_freq) emb.push_back(double(t + pos_offset) * f);
      for (double f : inv_freq) emb.push_back(double(t + pos_offset) * f);
      for (int64_t h = 0; h < num_h; ++h) {
        const int64_t base = ((b * num_t + t) * num_h + h) * dim;
        for (int64_t i = 0; i < dim; ++i) {
          const double rotated_half =
              i < dim / 2 ? -x.get(base + i + dim / 2) : x.get(base + i - dim / 2);
          out.set(base + i, x.get(base + i) * std::cos(emb[i]) + rotated_half * std::sin(emb[i]));
        }
      }
    }
  return out;
}

TEST(Rope, MatchesComplexRotation) {
  std::mt19937_64 rng(1);
  HostTensor x = randn(DType::f64, {2, 5, 3, 8}, rng);
  HostTensor out(DType::f64, x.t.shape);
  cpu::rope_forward(out, x, 10000.0f, 3);
  // Both sides compute the same angles in double; differences are a few ulps of O(1) values.
  EXPECT_LE(max_abs_diff(out, complex_rotation_reference(x, 10000.0, 3)), 1e-13);
}

TEST(Rope, MatchesHuggingFaceRotateHalf) {
  std::mt19937_64 rng(2);
  HostTensor x = randn(DType::f64, {1, 6, 2, 6}, rng);
  HostTensor out(DType::f64, x.t.shape);
  cpu::rope_forward(out, x, 1000000.0f, 0);  // Qwen3's rope_theta
  EXPECT_LE(max_abs_diff(out, hugging_face_reference(x, 1000000.0, 0)), 1e-13);
}

TEST(Rope, BackwardUndoesForward) {
  std::mt19937_64 rng(3);
  HostTensor x = randn(DType::f64, {1, 9, 2, 6}, rng);
  HostTensor rotated(DType::f64, x.t.shape), back(DType::f64, x.t.shape);
  cpu::rope_forward(rotated, x, 10000.0f, 5);
  EXPECT_GT(max_abs_diff(rotated, x), 0.1);  // the rotation did something
  cpu::rope_backward(back, rotated, 10000.0f, 5);
  EXPECT_LE(max_abs_diff(back, x), 1e-13);
}

TEST(Rope, PositionOffsetShiftsTime) {
  // Rotating rows t >= 3 of a sequence equals rotating them alone with pos_offset = 3 (the KV-cache
  // decoding case); the angles are the same doubles, so results match exactly.
  std::mt19937_64 rng(4);
  const int64_t num_t = 8, num_h = 2, dim = 4, skip = 3;
  HostTensor x = randn(DType::f64, {1, num_t, num_h, dim}, rng);
  HostTensor full(DType::f64, x.t.shape);
  cpu::rope_forward(full, x, 10000.0f, 0);
  HostTensor tail(DType::f64, {1, num_t - skip, num_h, dim});
  HostTensor tail_out(DType::f64, tail.t.shape);
  for (int64_t i = 0; i < tail.size(); ++i) tail.set(i, x.get(skip * num_h * dim + i));
  cpu::rope_forward(tail_out, tail, 10000.0f, int(skip));
  for (int64_t i = 0; i < tail.size(); ++i)
    EXPECT_EQ(tail_out.get(i), full.get(skip * num_h * dim + i)) << "element " << i;
}

TEST(Rope, InPlaceMatchesOutOfPlace) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(5);
    HostTensor x = randn(dtype, {2, 4, 3, 10}, rng);
    HostTensor out(dtype, x.t.shape);
    cpu::rope_forward(out, x, 500000.0f, 7);
    HostTensor in_place = x;
    cpu::rope_forward(in_place, in_place, 500000.0f, 7);
    expect_identical_no_nan(in_place, out,
                            (::testing::Message() << dtype_name(dtype) << " forward").GetString());

    HostTensor dx(dtype, x.t.shape);
    cpu::rope_backward(dx, x, 500000.0f, 7);
    in_place = x;
    cpu::rope_backward(in_place, in_place, 500000.0f, 7);
    expect_identical_no_nan(in_place, dx,
                            (::testing::Message() << dtype_name(dtype) << " backward").GetString());
  }
}

TS_FD_TEST(Rope, BackwardMatchesFiniteDifferences, "rope_forward", "rope_backward") {
  std::mt19937_64 rng(6);
  HostTensor x = randn(DType::f64, {2, 4, 2, 8}, rng);
  HostTensor dout = randn(DType::f64, x.t.shape, rng);
  HostTensor dx(DType::f64, x.t.shape);
  cpu::rope_backward(dx, dout, 10000.0f, 2);
  HostTensor out(DType::f64, x.t.shape);
  auto loss = [&] {
    cpu::rope_forward(out, x, 10000.0f, 2);
    return dot(dout, out);
  };
  // L is linear in x, so the central difference has no truncation error; what remains is rounding,
  // about 1e-16 * |terms of L| (~10) / h (1e-6) ~ 1e-9 absolute. Against gradients floored at 1e-2
  // that is <= 1e-7 relative; a wrong pairing or sign gives O(1).
  expect_grad_matches(x, dx, loss, 1e-6, "rope dinp", 1e-6, 1024, 1e-2);
}

TEST(Rope, F32MatchesF64) {
  std::mt19937_64 rng(7);
  HostTensor x64 = to_dtype(randn(DType::f32, {2, 5, 3, 12}, rng), DType::f64);
  HostTensor x32 = to_dtype(x64, DType::f32);  // identical values in both dtypes
  HostTensor out64(DType::f64, x64.t.shape), out32(DType::f32, x64.t.shape);
  cpu::rope_forward(out64, x64, 10000.0f, 11);
  cpu::rope_forward(out32, x32, 10000.0f, 11);
  // Both compute in double; f32 adds one rounding of the O(1) output (6e-8 relative).
  EXPECT_LE(max_abs_diff(out32, out64), 1e-6);
  cpu::rope_backward(out64, x64, 10000.0f, 11);
  cpu::rope_backward(out32, x32, 10000.0f, 11);
  EXPECT_LE(max_abs_diff(out32, out64), 1e-6);
}

TEST(Rope, RejectsBadArguments) {
  HostTensor odd(DType::f64, {1, 2, 1, 5});
  EXPECT_THROW(cpu::rope_forward(odd, odd, 10000.0f, 0), Error);
  HostTensor a(DType::f64, {1, 2, 1, 4}), b(DType::f64, {1, 3, 1, 4}), c(DType::f32, {1, 2, 1, 4});
  EXPECT_THROW(cpu::rope_forward(b, a, 10000.0f, 0), Error);
  EXPECT_THROW(cpu::rope_backward(c, a, 10000.0f, 0), Error);
  HostTensor flat(DType::f64, {2, 4});
  EXPECT_THROW(cpu::rope_forward(flat, flat, 10000.0f, 0), Error);
  // In place means the same buffer; a shifted, overlapping output would read rotated values.
  std::vector<double> buf(2 * 8 + 2);
  Tensor x(buf.data(), DType::f64, Device::cpu, {1, 2, 1, 8});
  Tensor shifted(buf.data() + 2, DType::f64, Device::cpu, {1, 2, 1, 8});
  EXPECT_THROW(cpu::rope_forward(shifted, x, 10000.0f, 0), Error);
}

// ---- rope_rows_forward (per-row positions) ---------------------------------------------------

TS_CPU_VALUE_TEST(RopeRows, EqualsRopeForwardAtEachRowsPosition, "rope_rows_forward") {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(8);
    const int64_t m = 6, h = 3, d = 10;
    const std::vector<int> positions = {0, 7, -1, 100000, 3, 7};
    HostTensor x = randn(dtype, {m, h, d}, rng), out(dtype, {m, h, d});
    HostTensor pos(DType::i32, {m});
    for (int64_t i = 0; i < m; ++i) pos.set(i, positions[i]);
    cpu::rope_rows_forward(out, x, pos, 500000.0f);
    for (int64_t i = 0; i < m; ++i) {
      HostTensor row(dtype, {1, 1, h, d}), want(dtype, {1, 1, h, d}), got(dtype, {1, 1, h, d});
      for (int64_t j = 0; j < h * d; ++j) {
        row.set(j, x.get(i * h * d + j));
        got.set(j, out.get(i * h * d + j));
      }
      if (positions[i] >= 0)
        cpu::rope_forward(want, row, 500000.0f, positions[i]);
      else
        want = row;  // padding: copied
      expect_identical_no_nan(got, want,
                              std::string(dtype_name(dtype)) + " row " + std::to_string(i));
    }
    HostTensor in_place = x;
    cpu::rope_rows_forward(in_place, in_place, pos, 500000.0f);
    expect_identical_no_nan(in_place, out, "in place");
  }
}

TEST(RopeRows, RejectsBadArguments) {
  HostTensor x(DType::f32, {2, 1, 4}), odd(DType::f32, {2, 1, 5}), pos(DType::i32, {2});
  HostTensor short_pos(DType::i32, {1}), f_pos(DType::f32, {2}), out4(DType::f32, {1, 2, 1, 4});
  EXPECT_THROW(cpu::rope_rows_forward(odd, odd, pos, 10000.0f), Error);
  EXPECT_THROW(cpu::rope_rows_forward(x, x, short_pos, 10000.0f), Error);
  EXPECT_THROW(cpu::rope_rows_forward(x, x, f_pos, 10000.0f), Error);
  EXPECT_THROW(cpu::rope_rows_forward(out4, out4, pos, 10000.0f), Error);
  EXPECT_THROW(cpu::rope_rows_forward(x, x, pos, 0.0f), Error);
}

TEST(RopeRows, IsThreadCountIndependent) {
  std::mt19937_64 rng(99);
  const HostTensor x = randn(DType::f32, {300, 8, 64}, rng);
  const HostTensor pos = randint({300}, -1, 5000, rng);
  HostTensor out(DType::f32, {300, 8, 64});
  expect_thread_independent("rope_rows_forward", {&out},
                            [&] { cpu::rope_rows_forward(out, x, pos, 10000.0f); });
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Rope) {
  for (DType dt : kNarrowTypes) {
    const Shape s{2, 5, 3, 8};  // (B, T, H, D)
    expect_contract(
        "rope_forward", dt, {narrow(s), narrow(s, 4.0)},
        [](const auto& t) { ops::rope_forward(t[0], t[1], 10000.0f, 2); }, 50);
    expect_contract(
        "rope_forward in place", dt, {narrow(s, 4.0)},
        [](const auto& t) { ops::rope_forward(t[0], t[0], 10000.0f, 2); }, 51);
    expect_contract(
        "rope_backward", dt, {narrow(s), narrow(s)},
        [](const auto& t) { ops::rope_backward(t[0], t[1], 500000.0f, 0); }, 52);
    expect_contract(
        "rope_backward in place", dt, {narrow(s)},
        [](const auto& t) { ops::rope_backward(t[0], t[0], 500000.0f, 0); }, 53);
    expect_contract(
        "rope_rows_forward", dt, {narrow({7, 3, 8}), narrow({7, 3, 8}, 4.0), ints({7}, -1, 9000)},
        [](const auto& t) { ops::rope_rows_forward(t[0], t[1], t[2], 10000.0f); }, 54);
    expect_contract(
        "rope_rows_forward in place", dt, {narrow({7, 3, 8}), ints({7}, -1, 9000)},
        [](const auto& t) { ops::rope_rows_forward(t[0], t[0], t[1], 10000.0f); }, 55);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Rope, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(97);
  const HostTensor x = randn(DType::f32, {2, 5, 3, 8}, rng);
  Guarded out({2, 5, 3, 8}), dinp({2, 5, 3, 8});
  cpu::rope_forward(out, x, 10000.0f, 3);
  cpu::rope_backward(dinp, x, 10000.0f, 3);
  expect_guards_intact({&out, &dinp}, "rope");
}

TEST(Rope, IsThreadCountIndependent) {
  std::mt19937_64 rng(98);
  const HostTensor x = randn(DType::f32, {4, 128, 6, 64}, rng);
  HostTensor out(DType::f32, {4, 128, 6, 64});
  expect_thread_independent("rope_forward", {&out},
                            [&] { cpu::rope_forward(out, x, 10000.0f, 5); });
  expect_thread_independent("rope_backward", {&out},
                            [&] { cpu::rope_backward(out, x, 500000.0f, 0); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/rope.cu)
// ----------------------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// Angles are formed in double on both sides and cos/sin rounded to f32 on the GPU; the rotation
// itself is two f32 products and a sum: a few 1e-7 relative. bf16: output rounding, 2^-9
// (~1.1e-3 in L2); f16: 2^-11 (~2.8e-4 in L2; a rotation keeps unit-normal values in range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct RopeCase {
  int64_t b, t, h, d;
  float theta;
  int pos_offset;
};
const RopeCase kCases[] = {
    {1, 1, 1, 2, 10000.0f, 0},      {2, 5, 3, 6, 10000.0f, 3},
    {2, 17, 4, 64, 10000.0f, 0},    {1, 3, 2, 130, 500000.0f, 7},
    {3, 9, 5, 128, 1000000.0f, 11}, {1, 4096, 2, 128, 10000.0f, 100000},
    {2, 33, 7, 16, 10000.0f, 0},
};

class RopeGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(RopeGpu, ForwardAndBackwardMatchCpu, "rope_forward", "rope_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(31);
  for (const RopeCase& c : kCases) {
    const Shape shape{c.b, c.t, c.h, c.d};
    const int64_t n = shape.numel();
    auto x = testing::random_vector(n, rng);
    x[n / 2] = std::numeric_limits<float>::quiet_NaN();
    x = testing::round_to(dtype, x);
    std::vector<float> fwd(n), bwd(n);
    cpu::rope_forward(host(fwd, shape), host(x, shape), c.theta, c.pos_offset);
    cpu::rope_backward(host(bwd, shape), host(x, shape), c.theta, c.pos_offset);
    DeviceTensor gx(dtype, shape), gout(dtype, shape);
    gx.upload(x);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " " + shape.str() + " offset " +
                             std::to_string(c.pos_offset);
    ops::rope_forward(gout, gx, c.theta, c.pos_offset);
    auto got = gout.download();
    EXPECT_LE(testing::rel_l2(got, fwd), tolerance(dtype)) << "forward " << what;
    testing::expect_same_nonfinite(got, fwd, "rope_forward");
    EXPECT_TRUE(gout.guards_intact()) << what;
    ops::rope_backward(gout, gx, c.theta, c.pos_offset);
    got = gout.download();
    EXPECT_LE(testing::rel_l2(got, bwd), tolerance(dtype)) << "backward " << what;
    testing::expect_same_nonfinite(got, bwd, "rope_backward");
    // In place (out is inp).
    ops::rope_forward(gx, gx, c.theta, c.pos_offset);
    got = gx.download();
    EXPECT_LE(testing::rel_l2(got, fwd), tolerance(dtype)) << "in place " << what;
    EXPECT_TRUE(gx.guards_intact()) << what;
  }
}

// D = 16384: the (T, D/2) table of 8-byte (cos, sin) pairs fills the 64 MiB workspace at
// T = 1024, so T = 1030 takes two chunks.
TEST_P(RopeGpu, TableLargerThanWorkspaceIsChunked) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(32);
  const Shape shape{1, 1030, 1, 16384};
  const int64_t n = shape.numel();
  auto x = testing::round_to(dtype, testing::random_vector(n, rng));
  std::vector<float> fwd(n);
  cpu::rope_forward(host(fwd, shape), host(x, shape), 10000.0f, 5);
  DeviceTensor gx(dtype, shape);
  gx.upload(x);
  settle();
  ops::rope_forward(gx, gx, 10000.0f, 5);
  EXPECT_LE(testing::rel_l2(gx.download(), fwd), tolerance(dtype));
  EXPECT_TRUE(gx.guards_intact());
}

TEST_P(RopeGpu, RejectsOddHeadDimAndPartialOverlap) {
  const DType dtype = GetParam();
  DeviceTensor odd(dtype, {1, 2, 1, 5}), buf(dtype, {1, 2, 1, 9});
  settle();
  EXPECT_THROW(ops::rope_forward(odd, odd, 10000.0f, 0), Error);
  const Tensor a(buf.t().data, dtype, Device::cuda, Shape{1, 2, 1, 4});
  const Tensor b(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{1, 2, 1, 4});
  EXPECT_THROW(ops::rope_forward(b, a, 10000.0f, 0), Error);
}

// rope_rows: the CPU within tolerance(dtype), and bit for bit CUDA's rope_forward on (1,1,H,D)
// at the row's position (both kernels form angles and rotations with the same functions).
class RopeRowsGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(RopeRowsGpu, MatchesCpuAndRopeForward, "rope_rows_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(33);
  struct RowsCase {
    int64_t m, h, d;
  };
  for (const RowsCase& c :
       {RowsCase{1, 32, 128}, RowsCase{9, 5, 6}, RowsCase{300, 8, 64}, RowsCase{3, 2, 4100}}) {
    const Shape shape{c.m, c.h, c.d};
    const int64_t n = shape.numel();
    const auto x = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<int32_t> pos(c.m);
    for (auto& p : pos) p = std::uniform_int_distribution<int32_t>(-1, 200000)(rng);
    pos[0] = 0;
    if (c.m > 2) pos[2] = -1;
    std::vector<float> want(n);
    cpu::rope_rows_forward(host(want, shape), host(const_cast<std::vector<float>&>(x), shape),
                           Tensor(pos.data(), DType::i32, Device::cpu, {c.m}), 500000.0f);
    DeviceTensor gx(dtype, shape), gout(dtype, shape), gpos(DType::i32, {c.m});
    gx.upload(x);
    gpos.upload_i32(pos);
    settle();
    ops::rope_rows_forward(gout, gx, gpos, 500000.0f);
    const std::string what = std::string(dtype_name(dtype)) + " " + shape.str();
    EXPECT_LE(testing::rel_l2(gout.download(), want), tolerance(dtype)) << what;
    EXPECT_TRUE(gout.guards_intact()) << what;
    const auto rows = gout.download_bytes();
    const size_t row_bytes = rows.size() / c.m;
    for (int64_t r : {int64_t(0), c.m / 2, c.m - 1}) {
      if (pos[r] < 0) continue;
      DeviceTensor one(dtype, {1, 1, c.h, c.d});
      const Tensor in_row(static_cast<char*>(gx.t().data) + r * row_bytes, dtype, Device::cuda,
                          Shape{1, 1, c.h, c.d});
      ops::rope_forward(one, in_row, 500000.0f, pos[r]);
      const auto got = one.download_bytes();
      EXPECT_TRUE(std::equal(got.begin(), got.end(), rows.begin() + r * row_bytes))
          << what << " row " << r << " differs from rope_forward at " << pos[r];
    }
    ops::rope_rows_forward(gx, gx, gpos, 500000.0f);  // in place
    const auto in_place = gx.download_bytes();
    EXPECT_TRUE(std::equal(in_place.begin(), in_place.end(), rows.begin())) << what;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RopeRowsGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

INSTANTIATE_TEST_SUITE_P(Dtypes, RopeGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
