// Tests of the CPU rotary embedding (kernels/cpu/rope.cpp): against a complex-number rotation and
// against Hugging Face's rotate_half formula written out here, orthogonality (backward undoes
// forward), pos_offset, in-place use, finite differences, and f32 vs f64.
// Shape letters: B batch, T time, H heads, D head dim.
#include <complex>
#include <random>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_b/kernels_b_util.h"

namespace tessera::testing {
namespace {

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
    EXPECT_TRUE(exactly_equal(in_place, out)) << dtype_name(dtype) << " forward";

    HostTensor dx(dtype, x.t.shape);
    cpu::rope_backward(dx, x, 500000.0f, 7);
    in_place = x;
    cpu::rope_backward(in_place, in_place, 500000.0f, 7);
    EXPECT_TRUE(exactly_equal(in_place, dx)) << dtype_name(dtype) << " backward";
  }
}

TEST(Rope, BackwardMatchesFiniteDifferences) {
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
  HostTensor x64 = cast_copy(randn(DType::f32, {2, 5, 3, 12}, rng), DType::f64);
  HostTensor x32 = cast_copy(x64, DType::f32);  // identical values in both dtypes
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

}  // namespace
}  // namespace tessera::testing
