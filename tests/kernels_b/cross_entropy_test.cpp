// Tests of the CPU softmax cross-entropy (kernels/cpu/cross_entropy.cpp): against a log-softmax
// written here, finite differences including padding columns and an ignored row, in-place
// backward, NaN containment, large logits, f32 vs f64 and target validation.
// Shape letters: N rows, V padded vocabulary width; vocab_size <= V real columns.
#include <cmath>
#include <limits>
#include <random>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_b/kernels_b_util.h"

namespace tessera::testing {
namespace {

constexpr int64_t kRows = 7;        // N
constexpr int64_t kWidth = 13;      // V
constexpr int kVocabSize = 11;      // columns 11 and 12 are padding
constexpr int64_t kIgnoredRow = 3;  // its target is -1
constexpr double kPadValue = 40.0;  // would dominate the softmax if padding leaked into it

// Random logits (N, V) with large padding columns, and targets (N) with one ignored row.
struct CeInputs {
  HostTensor logits, targets;
  CeInputs(DType dtype, std::mt19937_64& rng)
      : logits(randn(dtype, {kRows, kWidth}, rng, 2.0)),
        targets(randint({kRows}, 0, kVocabSize, rng)) {
    for (int64_t n = 0; n < kRows; ++n)
      for (int64_t c = kVocabSize; c < kWidth; ++c) logits.set(n * kWidth + c, kPadValue);
    targets.set(kIgnoredRow, -1);
  }
};

struct CeOutputs {
  HostTensor losses, lse;  // (N), (N)
  explicit CeOutputs(DType dtype) : losses(dtype, {kRows}), lse(dtype, {kRows}) {}
  void forward(const HostTensor& logits, const HostTensor& targets) {
    cpu::cross_entropy_forward(losses, lse, logits, targets, kVocabSize);
  }
};

TEST(CrossEntropy, MatchesLogSoftmax) {
  std::mt19937_64 rng(31);
  CeInputs in(DType::f64, rng);
  CeOutputs out(DType::f64);
  out.forward(in.logits, in.targets);
  for (int64_t n = 0; n < kRows; ++n) {
    // log_softmax(x)_c = x_c - log(sum_c' exp(x_c')) over the real columns only.
    double denom = 0.0;
    for (int c = 0; c < kVocabSize; ++c) denom += std::exp(in.logits.get(n * kWidth + c));
    const int y = int(in.targets.get(n));
    EXPECT_NEAR(out.lse.get(n), std::log(denom), 1e-13) << "row " << n;
    if (y < 0) {
      EXPECT_EQ(out.losses.get(n), 0.0) << "ignored row " << n;
    } else {
      const double log_prob = in.logits.get(n * kWidth + y) - std::log(denom);
      EXPECT_NEAR(out.losses.get(n), -log_prob, 1e-13) << "row " << n;
    }
  }
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(32);
  CeInputs in(DType::f64, rng);
  CeOutputs out(DType::f64);
  const float dloss = 0.7f;
  out.forward(in.logits, in.targets);
  HostTensor dlogits(DType::f64, in.logits.t.shape);
  for (int64_t i = 0; i < dlogits.size(); ++i)  // backward must overwrite every element
    dlogits.set(i, std::numeric_limits<double>::quiet_NaN());
  cpu::cross_entropy_backward(dlogits, in.logits, out.lse, in.targets, kVocabSize, dloss);
  CeOutputs probe(DType::f64);
  auto loss = [&] {
    probe.forward(in.logits, in.targets);
    double total = 0.0;
    for (int64_t n = 0; n < kRows; ++n) total += double(dloss) * probe.losses.get(n);
    return total;
  };
  // Every element, padding and the ignored row included (there the difference is exactly 0, so a
  // nonzero analytic value fails with relative error 1). Elsewhere: h = 1e-5 gives truncation
  // ~h^2 |L'''| ~ 1e-10 and rounding ~1e-16 |L| / h ~ 1e-10; floored at 1e-3 that is ~1e-7.
  expect_grad_matches(in.logits, dlogits, loss, 1e-6, "cross-entropy dlogits", 1e-5, 1 << 20, 1e-3);
  for (int64_t n = 0; n < kRows; ++n) {
    for (int64_t c = 0; c < kWidth; ++c) {
      if (n == kIgnoredRow || c >= kVocabSize) {
        EXPECT_EQ(dlogits.get(n * kWidth + c), 0.0) << "row " << n << " column " << c;
      }
    }
  }
}

TEST(CrossEntropy, InPlaceBackwardMatchesOutOfPlace) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(33);
    CeInputs in(dtype, rng);
    CeOutputs out(dtype);
    out.forward(in.logits, in.targets);
    HostTensor dlogits(dtype, in.logits.t.shape);
    cpu::cross_entropy_backward(dlogits, in.logits, out.lse, in.targets, kVocabSize, 1.5f);
    HostTensor in_place = in.logits;
    cpu::cross_entropy_backward(in_place, in_place, out.lse, in.targets, kVocabSize, 1.5f);
    EXPECT_TRUE(exactly_equal(in_place, dlogits)) << dtype_name(dtype);
  }
}

TEST(CrossEntropy, NanStaysInItsRow) {
  std::mt19937_64 rng(34);
  CeInputs clean(DType::f64, rng);
  CeInputs dirty = clean;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t nan_row = 2, pad_nan_row = 5;
  dirty.logits.set(nan_row * kWidth + 4, nan);
  dirty.logits.set(pad_nan_row * kWidth + kVocabSize, nan);  // padding: must not matter
  CeOutputs clean_out(DType::f64), dirty_out(DType::f64);
  clean_out.forward(clean.logits, clean.targets);
  dirty_out.forward(dirty.logits, dirty.targets);
  HostTensor clean_d(DType::f64, clean.logits.t.shape), dirty_d(DType::f64, clean.logits.t.shape);
  cpu::cross_entropy_backward(clean_d, clean.logits, clean_out.lse, clean.targets, kVocabSize, 1);
  cpu::cross_entropy_backward(dirty_d, dirty.logits, dirty_out.lse, dirty.targets, kVocabSize, 1);
  for (int64_t n = 0; n < kRows; ++n) {
    if (n == nan_row) {
      EXPECT_TRUE(std::isnan(dirty_out.losses.get(n)));
      EXPECT_TRUE(std::isnan(dirty_out.lse.get(n)));
      for (int c = 0; c < kVocabSize; ++c) EXPECT_TRUE(std::isnan(dirty_d.get(n * kWidth + c)));
      for (int64_t c = kVocabSize; c < kWidth; ++c) EXPECT_EQ(dirty_d.get(n * kWidth + c), 0.0);
      continue;
    }
    EXPECT_EQ(dirty_out.losses.get(n), clean_out.losses.get(n)) << "row " << n;
    EXPECT_EQ(dirty_out.lse.get(n), clean_out.lse.get(n)) << "row " << n;
    for (int64_t c = 0; c < kWidth; ++c)
      EXPECT_EQ(dirty_d.get(n * kWidth + c), clean_d.get(n * kWidth + c)) << n << ", " << c;
  }
}

TEST(CrossEntropy, LargeLogitsAreStable) {
  // Logits near 1000 overflow exp() unless the row max is subtracted; the loss is shift-invariant.
  // Row 0 also gets one spike of 800 above its first column, so only the true row max works.
  std::mt19937_64 rng(35);
  CeInputs in(DType::f64, rng);
  const int spike_col = 5;
  in.logits.set(spike_col, 800.0);
  CeInputs shifted = in;
  for (int64_t i = 0; i < in.logits.size(); ++i) shifted.logits.set(i, in.logits.get(i) + 1000.0);
  CeOutputs out(DType::f64), shifted_out(DType::f64);
  out.forward(in.logits, in.targets);
  shifted_out.forward(shifted.logits, shifted.targets);
  // The other columns of row 0 add about exp(-790) to the spike's share: lse is the spike.
  EXPECT_NEAR(out.lse.get(0), 800.0, 1e-12);
  const int64_t y0 = int64_t(in.targets.get(0));  // row 0 is not the ignored row
  EXPECT_NEAR(out.losses.get(0), 800.0 - in.logits.get(y0), 1e-12);
  for (int64_t n = 0; n < kRows; ++n) {
    // Adding 1000 loses ~1e-13 of each logit's precision.
    EXPECT_NEAR(shifted_out.losses.get(n), out.losses.get(n), 1e-10) << "row " << n;
    EXPECT_NEAR(shifted_out.lse.get(n), out.lse.get(n) + 1000.0, 1e-10) << "row " << n;
  }
}

TEST(CrossEntropy, F32MatchesF64) {
  std::mt19937_64 rng(36);
  CeInputs in32(DType::f32, rng);
  HostTensor logits64 = cast_copy(in32.logits, DType::f64);  // identical input values
  CeOutputs out32(DType::f32), out64(DType::f64);
  out32.forward(in32.logits, in32.targets);
  out64.forward(logits64, in32.targets);
  // Double accumulation in both; f32 adds one rounding of values up to ~10 (1e-6 absolute).
  EXPECT_LE(max_abs_diff(out32.losses, out64.losses), 2e-6);
  EXPECT_LE(max_abs_diff(out32.lse, out64.lse), 2e-6);
  HostTensor d32(DType::f32, in32.logits.t.shape), d64(DType::f64, in32.logits.t.shape);
  cpu::cross_entropy_backward(d32, in32.logits, out32.lse, in32.targets, kVocabSize, 1.0f);
  cpu::cross_entropy_backward(d64, logits64, out64.lse, in32.targets, kVocabSize, 1.0f);
  // Probabilities in [0, 1]; the f32 lse moves them by ~1e-6 relative at most.
  EXPECT_LE(max_abs_diff(d32, d64), 2e-6);
}

TEST(CrossEntropy, F64LogitsAcceptF32Statistics) {
  std::mt19937_64 rng(37);
  CeInputs in(DType::f64, rng);
  CeOutputs exact(DType::f64), mixed(DType::f32);
  exact.forward(in.logits, in.targets);
  mixed.forward(in.logits, in.targets);
  EXPECT_LE(max_abs_diff(mixed.losses, exact.losses), 2e-6);
  EXPECT_LE(max_abs_diff(mixed.lse, exact.lse), 2e-6);
}

TEST(CrossEntropy, RejectsBadArguments) {
  std::mt19937_64 rng(38);
  CeInputs in(DType::f64, rng);
  CeOutputs out(DType::f64);
  CeInputs too_big = in;
  too_big.targets.set(0, kVocabSize);  // a padding column is not a valid class
  EXPECT_THROW(out.forward(too_big.logits, too_big.targets), Error);
  HostTensor dlogits(DType::f64, in.logits.t.shape);
  EXPECT_THROW(cpu::cross_entropy_backward(dlogits, too_big.logits, out.lse, too_big.targets,
                                           kVocabSize, 1.0f),
               Error);
  EXPECT_THROW(cpu::cross_entropy_forward(out.losses, out.lse, in.logits, in.targets, kWidth + 1),
               Error);
  CeInputs in32(DType::f32, rng);
  CeOutputs f64_stats(DType::f64);  // f64 statistics are for f64 logits only
  EXPECT_THROW(f64_stats.forward(in32.logits, in32.targets), Error);
  HostTensor short_targets = randint({kRows - 1}, 0, kVocabSize, rng);
  EXPECT_THROW(out.forward(in.logits, short_targets), Error);
}

}  // namespace
}  // namespace tessera::testing
