// Tests of softmax cross-entropy and its vocabulary-parallel pieces (kernels/cpu/cross_entropy.cpp,
// kernels/cuda/cross_entropy.cu): cross_entropy_forward / backward, cross_entropy_shard_max /
// sums / finish. CPU: against a log-softmax written here, finite differences including padding
// columns and an ignored row, in-place backward, NaN containment, large logits, f32 vs f64, target
// validation; the padded vocabulary split into tp = 1..4 column shards combined as the tp
// all-reduces would, against the unsharded op, finite differences of the combined loss, edge
// statistics; bf16/f16 against the f32 kernel rounded once; bounds and thread counts. GPU parity:
// f32, bf16, f16, awkward sizes, misaligned logits, in place, out-of-range targets (NaN), the
// shard pieces and the whole shard protocol against the unsharded CPU op.
// Shape letters: N rows, V padded vocabulary width (= tp * Vl), Vl one shard's width;
// vocab_size <= V real columns.
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

#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"
#include "tests/kernels/vocab_shard_cases.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

// kRows x kWidth logits, kVocabSize real columns, kIgnoredRow: tests/kernels/vocab_shard_cases.h.
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

TS_FD_TEST(CrossEntropy, BackwardMatchesFiniteDifferences, "cross_entropy_forward",
           "cross_entropy_backward") {
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
    return weighted_total(probe.losses, dloss);
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
    expect_identical_no_nan(in_place, dlogits,
                            (::testing::Message() << dtype_name(dtype)).GetString());
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
  HostTensor logits64 = to_dtype(in32.logits, DType::f64);  // identical input values
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

// The addend is added to the gradient the op gives without one, on every column of every row
// (the ignored row and the padding columns included); it must not alias dlogits.
TEST(CrossEntropy, AddendJoinsTheGradient) {
  std::mt19937_64 rng(9);
  CeInputs in(DType::f32, rng);
  CeOutputs out(DType::f32);
  out.forward(in.logits, in.targets);
  const HostTensor addend = randn(DType::f32, {kRows, kWidth}, rng, 0.1);
  HostTensor plain(DType::f32, {kRows, kWidth}), with(DType::f32, {kRows, kWidth});
  cpu::cross_entropy_backward(plain, in.logits, out.lse, in.targets, kVocabSize, 0.5f);
  cpu::cross_entropy_backward(with, in.logits, out.lse, in.targets, kVocabSize, 0.5f, 0, addend);
  for (int64_t i = 0; i < kRows * kWidth; ++i)
    ASSERT_EQ(with.get(i), double(float(plain.get(i)) + float(addend.get(i)))) << i;
  EXPECT_THROW(
      cpu::cross_entropy_backward(with, in.logits, out.lse, in.targets, kVocabSize, 0.5f, 0, with),
      Error);
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

// ---- CPU reference, vocabulary-parallel pieces -------------------------------------------------

// ShardCase, kCases, slice_columns: tests/kernels/vocab_shard_cases.h.
namespace shard_cases {
namespace {

constexpr double kPadValue = 40.0;  // would dominate the softmax if padding leaked into it

// Logits (N, V) with large padding columns; targets (N) with row 1 ignored and targets on the
// first and last real column, so the first and last shard holding real columns own one each.
struct Inputs {
  HostTensor logits, targets;
  Inputs(DType dtype, const ShardCase& c, std::mt19937_64& rng)
      : logits(randn(dtype, {c.rows, c.width()}, rng, 2.0)),
        targets(randint({c.rows}, 0, c.vocab_size, rng)) {
    for (int64_t n = 0; n < c.rows; ++n)
      for (int64_t col = c.vocab_size; col < c.width(); ++col)
        logits.set(n * c.width() + col, kPadValue);
    if (c.rows > 1) targets.set(1, -1);
    if (c.rows > 2) targets.set(2, c.vocab_size - 1);
    if (c.rows > 3) targets.set(3, 0);
  }
};

struct Stats {
  HostTensor row_max, sum_exp, target_logit, losses, lse;  // each (N)
  Stats(DType dtype, int64_t rows)
      : row_max(dtype, {rows}),
        sum_exp(dtype, {rows}),
        target_logit(dtype, {rows}),
        losses(dtype, {rows}),
        lse(dtype, {rows}) {}
};

// The tp-rank protocol run in one process: shard max on every rank, all-reduce(max), shard sums
// with the global max, all-reduce(sum) of sum_exp and target_logit (added in the statistics'
// dtype, rank order, as an all-reduce would), then finish.
Stats sharded_forward(const HostTensor& logits, const HostTensor& targets, const ShardCase& c,
                      DType stat_dtype) {
  Stats s(stat_dtype, c.rows);
  std::vector<HostTensor> shards;
  for (int r = 0; r < c.tp; ++r) shards.push_back(slice_columns(logits, c.start(r), c.shard_width));
  for (int64_t n = 0; n < c.rows; ++n) s.row_max.set(n, -kInf);
  for (int r = 0; r < c.tp; ++r) {
    HostTensor part(stat_dtype, {c.rows});
    cpu::cross_entropy_shard_max(part, shards[r], c.start(r), c.vocab_size);
    for (int64_t n = 0; n < c.rows; ++n) s.row_max.set(n, std::max(s.row_max.get(n), part.get(n)));
  }
  for (int r = 0; r < c.tp; ++r) {
    HostTensor sum(stat_dtype, {c.rows}), target(stat_dtype, {c.rows});
    cpu::cross_entropy_shard_sums(sum, target, shards[r], s.row_max, targets, c.start(r),
                                  c.vocab_size);
    for (int64_t n = 0; n < c.rows; ++n) {
      s.sum_exp.set(n, s.sum_exp.get(n) + sum.get(n));
      s.target_logit.set(n, s.target_logit.get(n) + target.get(n));
    }
  }
  cpu::cross_entropy_shard_finish(s.losses, s.lse, s.row_max, s.sum_exp, s.target_logit, targets);
  return s;
}

// f64: every step is in double and only the summation order of sum_exp differs from the
// unsharded op (~1e-16 relative). f32: sum_exp is rounded to f32 on each rank and again by the
// f32 all-reduce (2^-24 relative each), which moves log(sum_exp), hence lse and the losses, by
// ~1e-7 absolute; lse and losses are O(1..10) (floored at 1 so a loss near 0 is not judged
// relative to itself).
double forward_tolerance(DType dtype) { return dtype == DType::f64 ? 1e-12 : 1e-6; }

TEST(CrossEntropyShard, CombinedShardsMatchUnshardedForward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(61);
    for (const ShardCase& c : kCases) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + c.str());
      const Inputs in(dtype, c, rng);
      HostTensor losses(dtype, {c.rows}), lse(dtype, {c.rows});
      cpu::cross_entropy_forward(losses, lse, in.logits, in.targets, c.vocab_size);
      const Stats s = sharded_forward(in.logits, in.targets, c, dtype);
      EXPECT_LE(
          std::max(max_floored_rel_error(s.lse, lse), max_floored_rel_error(s.losses, losses)),
          forward_tolerance(dtype));
      if (c.rows > 1) {
        EXPECT_EQ(s.losses.get(1), 0.0) << "ignored row";
      }
    }
  }
}

// Each shard's backward, given the unsharded lse, performs the same arithmetic per element as
// the unsharded backward on its columns: the slices must match bit for bit, in place too.
TEST(CrossEntropyShard, BackwardSlicesMatchUnshardedBackward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(62);
    for (const ShardCase& c : kCases) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + c.str());
      const Inputs in(dtype, c, rng);
      HostTensor losses(dtype, {c.rows}), lse(dtype, {c.rows});
      cpu::cross_entropy_forward(losses, lse, in.logits, in.targets, c.vocab_size);
      HostTensor full(dtype, in.logits.t.shape);
      const float dloss = 0.3f;
      cpu::cross_entropy_backward(full, in.logits, lse, in.targets, c.vocab_size, dloss);
      for (int r = 0; r < c.tp; ++r) {
        const HostTensor shard = slice_columns(in.logits, c.start(r), c.shard_width);
        HostTensor dshard(dtype, shard.t.shape);
        for (int64_t i = 0; i < dshard.size(); ++i)  // every element must be overwritten
          dshard.set(i, std::numeric_limits<double>::quiet_NaN());
        cpu::cross_entropy_backward(dshard, shard, lse, in.targets, c.vocab_size, dloss,
                                    c.start(r));
        const HostTensor want = slice_columns(full, c.start(r), c.shard_width);
        expect_identical_no_nan(dshard, want, (::testing::Message() << "rank " << r).GetString());
        HostTensor in_place = shard;
        cpu::cross_entropy_backward(in_place, in_place, lse, in.targets, c.vocab_size, dloss,
                                    c.start(r));
        expect_identical_no_nan(in_place, want,
                                (::testing::Message() << "rank " << r << " in place").GetString());
      }
    }
  }
}

// The sharded backward (with the combined lse) against central differences of the combined
// sharded loss, every element of the full logits: padding columns and the ignored row must have
// exactly zero gradient (there the difference is exactly 0). Budget as in cross_entropy_test.cpp:
// h = 1e-5 gives ~1e-10 truncation and rounding; with a 1e-3 floor, ~1e-7 relative.
TS_FD_TEST(CrossEntropyShard, BackwardMatchesFiniteDifferencesOfCombinedLoss,
           "cross_entropy_shard_max", "cross_entropy_shard_sums", "cross_entropy_shard_finish",
           "cross_entropy_backward") {
  std::mt19937_64 rng(63);
  const float dloss = 0.7f;
  for (const ShardCase& c : {kCases[3], kCases[4], kCases[5], kCases[6]}) {
    SCOPED_TRACE(c.str());
    Inputs in(DType::f64, c, rng);
    const Stats s = sharded_forward(in.logits, in.targets, c, DType::f64);
    HostTensor analytic(DType::f64, in.logits.t.shape);
    for (int r = 0; r < c.tp; ++r) {
      const HostTensor shard = slice_columns(in.logits, c.start(r), c.shard_width);
      HostTensor dshard(DType::f64, shard.t.shape);
      cpu::cross_entropy_backward(dshard, shard, s.lse, in.targets, c.vocab_size, dloss,
                                  c.start(r));
      place_columns(analytic, dshard, c.start(r));
    }
    auto loss = [&] {
      return weighted_total(sharded_forward(in.logits, in.targets, c, DType::f64).losses, dloss);
    };
    expect_grad_matches(in.logits, analytic, loss, 1e-6, "sharded dlogits", 1e-5, 1 << 20, 1e-3);
  }
}

// The statistics of one shard on their own: a shard of padding only has max -inf and sum 0; a
// target held by another shard, or an ignored row, gives target_logit 0; finish keeps lse on an
// ignored row and zeroes its loss.
TEST(CrossEntropyShard, StatisticsOfOneShard) {
  const int64_t rows = 3, width = 4;
  const int vocab_size = 6;  // shard 0 = columns [0, 4), shard 1 = [4, 8) with 2 real
  std::vector<double> values = {0.5, -1.0, 2.0, 0.25, 1.0, 3.0, -2.0, 0.0, -0.5, 4.0, 1.5, -3.0};
  HostTensor logits(DType::f64, {rows, width});
  for (int64_t i = 0; i < logits.size(); ++i) logits.set(i, values[i]);
  HostTensor targets(DType::i32, {rows});
  targets.set(0, 5);   // shard 1, local column 1
  targets.set(1, -1);  // ignored
  targets.set(2, 2);   // shard 0
  HostTensor row_max(DType::f64, {rows}), sum_exp(DType::f64, {rows}), tl(DType::f64, {rows});

  cpu::cross_entropy_shard_max(row_max, logits, 4, vocab_size);  // as shard 1: columns 0, 1 real
  EXPECT_EQ(row_max.get(0), 0.5);
  EXPECT_EQ(row_max.get(1), 3.0);
  EXPECT_EQ(row_max.get(2), 4.0);
  cpu::cross_entropy_shard_max(row_max, logits, 8, vocab_size);  // padding only
  for (int64_t n = 0; n < rows; ++n) EXPECT_EQ(row_max.get(n), -kInf);

  HostTensor global_max(DType::f64, {rows});
  for (int64_t n = 0; n < rows; ++n) global_max.set(n, 5.0);
  cpu::cross_entropy_shard_sums(sum_exp, tl, logits, global_max, targets, 8, vocab_size);
  for (int64_t n = 0; n < rows; ++n) {
    EXPECT_EQ(sum_exp.get(n), 0.0);
    EXPECT_EQ(tl.get(n), 0.0);
  }
  cpu::cross_entropy_shard_sums(sum_exp, tl, logits, global_max, targets, 4, vocab_size);
  EXPECT_DOUBLE_EQ(sum_exp.get(0), std::exp(0.5 - 5.0) + std::exp(-1.0 - 5.0));
  EXPECT_EQ(tl.get(0), -1.0);  // target 5 = local column 1
  EXPECT_EQ(tl.get(1), 0.0);   // ignored
  EXPECT_EQ(tl.get(2), 0.0);   // target 2 lives on shard 0
  cpu::cross_entropy_shard_sums(sum_exp, tl, logits, global_max, targets, 0, vocab_size);
  EXPECT_EQ(tl.get(2), 1.5);
  EXPECT_EQ(tl.get(0), 0.0);

  HostTensor losses(DType::f64, {rows}), lse(DType::f64, {rows});
  cpu::cross_entropy_shard_finish(losses, lse, global_max, sum_exp, tl, targets);
  for (int64_t n = 0; n < rows; ++n) {
    EXPECT_DOUBLE_EQ(lse.get(n), 5.0 + std::log(sum_exp.get(n))) << n;
    EXPECT_DOUBLE_EQ(losses.get(n), n == 1 ? 0.0 : lse.get(n) - tl.get(n)) << n;
  }
}

// A NaN logit on one shard makes that row's combined loss and lse NaN and leaves the others.
TEST(CrossEntropyShard, NanStaysInItsRow) {
  std::mt19937_64 rng(64);
  const ShardCase c = kCases[4];
  const Inputs clean(DType::f64, c, rng);
  Inputs dirty = clean;
  const int64_t nan_row = 3;
  dirty.logits.set(nan_row * c.width() + c.start(1) + 2, std::numeric_limits<double>::quiet_NaN());
  const Stats a = sharded_forward(clean.logits, clean.targets, c, DType::f64);
  const Stats b = sharded_forward(dirty.logits, dirty.targets, c, DType::f64);
  for (int64_t n = 0; n < c.rows; ++n) {
    if (n == nan_row) {
      EXPECT_TRUE(std::isnan(b.losses.get(n)) && std::isnan(b.lse.get(n)));
    } else {
      EXPECT_EQ(b.losses.get(n), a.losses.get(n)) << n;
      EXPECT_EQ(b.lse.get(n), a.lse.get(n)) << n;
    }
  }
}

TEST(CrossEntropyShard, RejectsBadArguments) {
  std::mt19937_64 rng(65);
  const ShardCase c = kCases[3];
  const Inputs in(DType::f64, c, rng);
  const HostTensor shard = slice_columns(in.logits, c.start(1), c.shard_width);
  HostTensor row_max(DType::f64, {c.rows}), sum_exp(DType::f64, {c.rows});
  HostTensor tl(DType::f64, {c.rows}), losses(DType::f64, {c.rows}), lse(DType::f64, {c.rows});
  HostTensor dshard(DType::f64, shard.t.shape);
  cpu::cross_entropy_shard_max(row_max, shard, c.start(1), c.vocab_size);

  HostTensor bad_targets = in.targets;
  bad_targets.set(0, c.vocab_size);  // a padding column is not a class, on any shard
  EXPECT_THROW(cpu::cross_entropy_shard_sums(sum_exp, tl, shard, row_max, bad_targets, c.start(1),
                                             c.vocab_size),
               Error);
  EXPECT_THROW(
      cpu::cross_entropy_backward(dshard, shard, lse, bad_targets, c.vocab_size, 1.0f, c.start(1)),
      Error);
  EXPECT_THROW(cpu::cross_entropy_shard_max(row_max, shard, -1, c.vocab_size), Error);
  EXPECT_THROW(cpu::cross_entropy_shard_max(row_max, shard, 0, 0), Error);
  EXPECT_THROW(cpu::cross_entropy_backward(dshard, shard, lse, in.targets, c.vocab_size, 1.0f, -7),
               Error);
  // f64 statistics are for f64 logits only; all statistics of finish share one dtype.
  const HostTensor shard32 = to_dtype(shard, DType::f32);
  EXPECT_THROW(cpu::cross_entropy_shard_max(row_max, shard32, 0, c.vocab_size), Error);
  HostTensor sum32(DType::f32, {c.rows});
  EXPECT_THROW(cpu::cross_entropy_shard_finish(losses, lse, row_max, sum32, tl, in.targets), Error);
  HostTensor short_stat(DType::f64, {c.rows - 1});
  EXPECT_THROW(cpu::cross_entropy_shard_sums(short_stat, tl, shard, row_max, in.targets, c.start(1),
                                             c.vocab_size),
               Error);
  EXPECT_THROW(cpu::cross_entropy_shard_finish(losses, losses, row_max, sum_exp, tl, in.targets),
               Error);
}

}  // namespace
}  // namespace shard_cases

namespace {

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, CrossEntropy) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_v = 1025;
    const int vocab = 1000;
    // targets in [-1, vocab): a row with -1 is ignored (loss 0, lse still set)
    expect_contract(
        "cross_entropy_forward", dt,
        {f32({num_n}), f32({num_n}), narrow({num_n, num_v}, 3.0), ints({num_n}, -1, vocab)},
        [=](const auto& t) { ops::cross_entropy_forward(t[0], t[1], t[2], t[3], vocab); }, 110);
    const std::vector<Operand> bwd{narrow({num_n, num_v}), narrow({num_n, num_v}, 3.0),
                                   f32({num_n}), ints({num_n}, -1, vocab)};
    expect_contract(
        "cross_entropy forward + backward", dt, bwd,
        [=](const auto& t) {
          HostTensor losses(DType::f32, {num_n});
          ops::cross_entropy_forward(losses, t[2], t[1], t[3], vocab);
          ops::cross_entropy_backward(t[0], t[1], t[2], t[3], vocab, 0.25f);
        },
        111);
    expect_contract(
        "cross_entropy_backward in place", dt,
        {narrow({num_n, num_v}, 3.0), f32({num_n}), ints({num_n}, -1, vocab)},
        [=](const auto& t) {
          HostTensor losses(DType::f32, {num_n});
          ops::cross_entropy_forward(losses, t[1], t[0], t[2], vocab);
          ops::cross_entropy_backward(t[0], t[0], t[1], t[2], vocab, 1.0f / 3);
        },
        112);
    // vocabulary-parallel: this shard holds columns [600, 1113) of a padded 1113-column vocab
    const int64_t width = 513, start = 600;
    expect_contract(
        "cross_entropy shard pipeline", dt,
        {narrow({num_n, width}, 3.0), ints({num_n}, -1, vocab), f32({num_n}), f32({num_n}),
         f32({num_n}), f32({num_n}), f32({num_n}), narrow({num_n, width})},
        [=](const auto& t) {
          ops::cross_entropy_shard_max(t[2], t[0], start, vocab);
          ops::cross_entropy_shard_sums(t[3], t[4], t[0], t[2], t[1], start, vocab);
          ops::cross_entropy_shard_finish(t[5], t[6], t[2], t[3], t[4], t[1]);
          ops::cross_entropy_backward(t[7], t[0], t[6], t[1], vocab, 0.5f, start);
        },
        113);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(CrossEntropy, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(70);
  const int64_t n = 5, width = 19;
  const int vocab = 17;  // columns 17, 18 are padding
  const HostTensor logits = randn(DType::f32, {n, width}, rng, 2.0);
  const HostTensor targets = randint({n}, -1, vocab, rng);
  Guarded losses({n}), lse({n}), dlogits({n, width});
  cpu::cross_entropy_forward(losses, lse, logits, targets, vocab);
  cpu::cross_entropy_backward(dlogits, logits, lse, targets, vocab, 0.5f);
  expect_guards_intact({&losses, &lse, &dlogits}, "cross_entropy");
  // Vocabulary-parallel pieces of a shard holding columns [10, 29) of the padded vocabulary.
  Guarded row_max({n}), sum_exp({n}), target_logit({n}), s_losses({n}), s_lse({n});
  Guarded s_dlogits({n, width});
  cpu::cross_entropy_shard_max(row_max, logits, 10, vocab);
  cpu::cross_entropy_shard_sums(sum_exp, target_logit, logits, row_max, targets, 10, vocab);
  cpu::cross_entropy_shard_finish(s_losses, s_lse, row_max, sum_exp, target_logit, targets);
  cpu::cross_entropy_backward(s_dlogits, logits, s_lse, targets, vocab, 0.5f, 10);
  expect_guards_intact({&row_max, &sum_exp, &target_logit, &s_losses, &s_lse, &s_dlogits},
                       "cross_entropy shard ops");
}

TEST(CrossEntropy, IsThreadCountIndependent) {
  std::mt19937_64 rng(71);
  const int64_t n = 300, width = 257;
  const int vocab = 250;
  const HostTensor logits = randn(DType::f32, {n, width}, rng, 3.0);
  const HostTensor targets = randint({n}, -1, vocab, rng);
  HostTensor losses(DType::f32, {n}), lse(DType::f32, {n}), dlogits(DType::f32, {n, width});
  expect_thread_independent("cross_entropy_forward", {&losses, &lse}, [&] {
    cpu::cross_entropy_forward(losses, lse, logits, targets, vocab);
  });
  expect_thread_independent("cross_entropy_backward", {&dlogits}, [&] {
    cpu::cross_entropy_backward(dlogits, logits, lse, targets, vocab, 0.25f, 0);
  });
  HostTensor row_max(DType::f32, {n}), sum_exp(DType::f32, {n}), target_logit(DType::f32, {n});
  expect_thread_independent("cross_entropy_shard_max", {&row_max},
                            [&] { cpu::cross_entropy_shard_max(row_max, logits, 100, vocab); });
  expect_thread_independent("cross_entropy_shard_sums", {&sum_exp, &target_logit}, [&] {
    cpu::cross_entropy_shard_sums(sum_exp, target_logit, logits, row_max, targets, 100, vocab);
  });
  expect_thread_independent("cross_entropy_shard_finish", {&losses, &lse}, [&] {
    cpu::cross_entropy_shard_finish(losses, lse, row_max, sum_exp, target_logit, targets);
  });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/cross_entropy.cu) ------------------------------------------------

namespace tessera::gpu_plain {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// Losses and lse: f32 sums of up to 150k exponentials (fast exp, ~2 ulp) against double: under
// 1e-6 relative. dlogits: f32 exp(x - lse) per element, 1e-5 relative; bf16 rounds the output
// (2^-9 per element, ~1.1e-3 in L2); f16 rounds it to 2^-11 (~2.8e-4 in L2). Probabilities
// under f16's smallest subnormal (6e-8) flush to 0, an absolute error under 3e-8 per element
// that is invisible in the L2 norm (at most sqrt(150k) * 3e-8 ~ 1e-5 against a norm >= ~0.5).
// Logits up to ~30 * 5 = 150 are far inside f16's range (65504).
constexpr double kLossTolerance = 1e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct CeCase {
  int64_t rows, width;
  int vocab_size;
  float scale;  // logit standard deviation
};
const CeCase kCases[] = {{1, 1, 1, 1.0f},           {3, 7, 5, 2.0f},
                         {8, 50304, 50257, 2.0f},   {5, 50257, 50257, 1.0f},
                         {2, 151936, 151665, 3.0f}, {64, 1030, 1000, 30.0f}};

class CrossEntropyGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(CrossEntropyGpu, ForwardAndBackwardMatchCpu, "cross_entropy_forward",
                     "cross_entropy_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(41);
  for (const CeCase& c : kCases) {
    const int64_t n = c.rows, v = c.width;
    auto logits = testing::random_vector(n * v, rng, c.scale);
    if (n > 3) logits[3 * v + v / 3] = std::numeric_limits<float>::quiet_NaN();  // row 3 NaN
    logits = testing::round_to(dtype, logits);
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> pick(0, c.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) targets[i] = i % 4 == 2 ? -1 : pick(rng);  // some ignored
    std::vector<float> targets_f(targets.begin(), targets.end());

    std::vector<float> losses(n), lse(n), dlogits(n * v);
    Tensor tgt_host(targets.data(), DType::i32, Device::cpu, Shape{n});
    cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits, {n, v}), tgt_host,
                               c.vocab_size);
    const float dloss = 1.0f / float(n);
    cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}),
                                tgt_host, c.vocab_size, dloss);

    DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
    DeviceTensor glse(DType::f32, {n}), gdlogits(dtype, {n, v});
    glogits.upload(logits);
    gtargets.upload_i32(targets);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " N=" + std::to_string(n) +
                             " V=" + std::to_string(v) + " vocab=" + std::to_string(c.vocab_size);
    ops::cross_entropy_forward(glosses, glse, glogits, gtargets, c.vocab_size);
    auto got_losses = glosses.download(), got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
    EXPECT_LE(testing::rel_l2(got_lse, lse), kLossTolerance) << "lse " << what;
    testing::expect_same_nonfinite(got_losses, losses, "losses");
    testing::expect_same_nonfinite(got_lse, lse, "lse");
    testing::expect_ignored_rows_zero(got_losses, targets, what);
    EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact()) << what;

    // The backward uses the CPU's lse, so the comparison isolates the gradient kernel.
    glse.upload(lse);
    settle();
    ops::cross_entropy_backward(gdlogits, glogits, glse, gtargets, c.vocab_size, dloss);
    auto got = gdlogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "dlogits " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits");
    EXPECT_TRUE(gdlogits.guards_intact()) << what;
    testing::expect_zero_outside_real(got, targets, v, c.vocab_size, "dlogits", what);

    // In place: the gradient overwrites the logits.
    ops::cross_entropy_backward(glogits, glogits, glse, gtargets, c.vocab_size, dloss);
    got = glogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "in place " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits in place");
    EXPECT_TRUE(glogits.guards_intact()) << what;

    // In place with an addend (the distillation term's gradient), against the CPU's.
    const auto addend = testing::round_to(dtype, testing::random_vector(n * v, rng, 1e-3f));
    std::vector<float> dsum(n * v);
    cpu::cross_entropy_backward(host(dsum, {n, v}), host(logits, {n, v}), host(lse, {n}), tgt_host,
                                c.vocab_size, dloss, 0,
                                host(const_cast<std::vector<float>&>(addend), {n, v}));
    DeviceTensor gaddend(dtype, {n, v});
    gaddend.upload(addend);
    glogits.upload(logits);
    settle();
    ops::cross_entropy_backward(glogits, glogits, glse, gtargets, c.vocab_size, dloss, 0, gaddend);
    got = glogits.download();
    EXPECT_LE(testing::rel_l2(got, dsum), grad_tolerance(dtype)) << "with addend " << what;
    testing::expect_same_nonfinite(got, dsum, "dlogits with addend");
    EXPECT_TRUE(glogits.guards_intact() && gaddend.guards_intact()) << what;
  }
}

// A logits view one element into its buffer: every row starts off the 16-byte grid.
TEST_P(CrossEntropyGpu, MisalignedLogitsMatchCpu) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(42);
  const int64_t n = 6, v = 4096;
  const int vocab = 4000;
  auto all = testing::round_to(dtype, testing::random_vector(n * v + 1, rng, 2.0f));
  std::vector<float> logits(all.begin() + 1, all.end());
  std::vector<int32_t> targets = {0, 3999, -1, 17, 2048, 5};
  std::vector<float> losses(n), lse(n), dlogits(n * v);
  Tensor tgt_host(targets.data(), DType::i32, Device::cpu, Shape{n});
  cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits, {n, v}), tgt_host,
                             vocab);
  cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}), tgt_host,
                              vocab, 0.5f);
  DeviceTensor buf(dtype, {n * v + 1}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
  DeviceTensor glse(DType::f32, {n});
  buf.upload(all);
  gtargets.upload_i32(targets);
  settle();
  const Tensor view(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                    Shape{n, v});
  ops::cross_entropy_forward(glosses, glse, view, gtargets, vocab);
  EXPECT_LE(testing::rel_l2(glosses.download(), losses), kLossTolerance);
  EXPECT_LE(testing::rel_l2(glse.download(), lse), kLossTolerance);
  ops::cross_entropy_backward(view, view, glse, gtargets, vocab, 0.5f);
  const auto got = buf.download();
  EXPECT_EQ(std::bit_cast<uint32_t>(got[0]), std::bit_cast<uint32_t>(all[0]));
  EXPECT_LE(testing::rel_l2(std::vector<float>(got.begin() + 1, got.end()), dlogits),
            grad_tolerance(dtype));
  EXPECT_TRUE(buf.guards_intact());
}

// A target past the real vocabulary cannot be checked on the host without a synchronization:
// it must show up as a NaN loss and a NaN gradient row, never as a plausible number.
TEST_P(CrossEntropyGpu, OutOfRangeTargetGivesNaN) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(43);
  const int64_t n = 2, v = 64;
  auto logits = testing::round_to(dtype, testing::random_vector(n * v, rng));
  DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
  DeviceTensor glse(DType::f32, {n});
  glogits.upload(logits);
  gtargets.upload_i32({3, 60});  // vocab_size 50: 60 is padding, not a class
  settle();
  ops::cross_entropy_forward(glosses, glse, glogits, gtargets, 50);
  const auto losses = glosses.download();
  EXPECT_TRUE(std::isfinite(losses[0]));
  EXPECT_TRUE(std::isnan(losses[1]));
  ops::cross_entropy_backward(glogits, glogits, glse, gtargets, 50, 1.0f);
  const auto grad = glogits.download();
  for (int64_t col = 0; col < v; ++col) EXPECT_TRUE(std::isnan(grad[v + col])) << col;
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CrossEntropyGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::gpu_plain

// ---- GPU parity, vocabulary-parallel pieces ----------------------------------------------------

namespace tessera::gpu_shard {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::host_i32;
using testing::settle;

// row_max and target_logit copy an input value: exact. sum_exp: f32 sums of up to 38k fast
// exponentials (~2 ulp each) against double, under 1e-6 relative; finish: logf in f32 against
// double. dlogits: as the unsharded test (f32 exp per element 1e-5; bf16 output rounding 2^-9,
// f16 2^-11 with subnormal flushes far below the L2 resolution).
constexpr double kSumTolerance = 1e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Equal element for element, NaN matching NaN.
void expect_same_values(const std::vector<float>& got, const std::vector<float>& want,
                        const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i] || (std::isnan(got[i]) && std::isnan(want[i])))) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i];
      return;
    }
  }
}

struct ShardCase {
  int64_t rows, width;  // N, Vl
  int64_t vocab_start;
  int vocab_size;
  float scale;  // logit standard deviation
};
const ShardCase kCases[] = {
    {1, 1, 0, 1, 1.0f},                // N = 1, Vl = 1
    {3, 1, 5, 7, 1.0f},                // Vl = 1 inside a larger vocabulary
    {3, 7, 7, 13, 2.0f},               // odd Vl, vocab_start > 0, 6 of 7 columns real
    {5, 9, 27, 20, 2.0f},              // padding only
    {8, 12576, 37728, 50257, 2.0f},    // GPT-2's 50304 over tp = 4, last shard
    {4, 12565, 12565, 50257, 2.0f},    // odd width: rows off the 16-byte grid
    {2, 37984, 113952, 151665, 3.0f},  // Qwen3's 151936 over tp = 4, last shard
    {64, 1031, 1031, 2000, 30.0f},     // large logits
};

class CrossEntropyShardGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(CrossEntropyShardGpu, PiecesMatchCpu, "cross_entropy_shard_max",
                     "cross_entropy_shard_sums", "cross_entropy_shard_finish",
                     "cross_entropy_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(71);
  for (const ShardCase& c : kCases) {
    const int64_t n = c.rows, v = c.width;
    const std::string what =
        std::string(dtype_name(dtype)) + " N=" + std::to_string(n) + " Vl=" + std::to_string(v) +
        " start=" + std::to_string(c.vocab_start) + " vocab=" + std::to_string(c.vocab_size);
    auto logits = testing::random_vector(n * v, rng, c.scale);
    if (n > 3) logits[3 * v + v / 3] = kNaN;  // row 3 NaN (if that column is real)
    logits = testing::round_to(dtype, logits);
    // Targets: in this shard's real columns where it has any, elsewhere in the vocabulary, or
    // ignored.
    const int64_t num_real = std::clamp<int64_t>(int64_t(c.vocab_size) - c.vocab_start, 0, v);
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> anywhere(0, c.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) {
      if (i % 4 == 2)
        targets[i] = -1;
      else if (i % 2 == 0 && num_real > 0)
        targets[i] =
            int32_t(c.vocab_start + std::uniform_int_distribution<int64_t>(0, num_real - 1)(rng));
      else
        targets[i] = anywhere(rng);
    }

    // The global max is at least this shard's: other shards may hold larger logits.
    std::vector<float> shard_max(n), global_max(n), sum_exp(n), target_logit(n);
    cpu::cross_entropy_shard_max(host(shard_max, {n}), host(logits, {n, v}), c.vocab_start,
                                 c.vocab_size);
    std::normal_distribution<float> other(0.0f, c.scale);
    for (int64_t i = 0; i < n; ++i) global_max[i] = std::max(shard_max[i], 2.0f * other(rng));
    cpu::cross_entropy_shard_sums(host(sum_exp, {n}), host(target_logit, {n}), host(logits, {n, v}),
                                  host(global_max, {n}), host_i32(targets, {n}), c.vocab_start,
                                  c.vocab_size);
    // The other shards' share of the softmax denominator: lse is then a valid global lse.
    std::vector<float> total_sum(n), losses(n), lse(n);
    std::uniform_real_distribution<float> rest(0.0f, 3.0f);
    for (int64_t i = 0; i < n; ++i) total_sum[i] = sum_exp[i] + rest(rng) + (num_real ? 0 : 1);
    cpu::cross_entropy_shard_finish(host(losses, {n}), host(lse, {n}), host(global_max, {n}),
                                    host(total_sum, {n}), host(target_logit, {n}),
                                    host_i32(targets, {n}));
    const float dloss = 1.0f / float(n);
    std::vector<float> dlogits(n * v);
    cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}),
                                host_i32(targets, {n}), c.vocab_size, dloss, c.vocab_start);

    DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), gmax(DType::f32, {n});
    DeviceTensor gglobal(DType::f32, {n}), gsum(DType::f32, {n}), gtl(DType::f32, {n});
    DeviceTensor gtotal(DType::f32, {n}), glosses(DType::f32, {n}), glse(DType::f32, {n});
    DeviceTensor gdlogits(dtype, {n, v});
    glogits.upload(logits);
    gtargets.upload_i32(targets);
    gglobal.upload(global_max);
    settle();

    ops::cross_entropy_shard_max(gmax, glogits, c.vocab_start, c.vocab_size);
    expect_same_values(gmax.download(), shard_max, "row_max " + what);
    ops::cross_entropy_shard_sums(gsum, gtl, glogits, gglobal, gtargets, c.vocab_start,
                                  c.vocab_size);
    const auto got_sum = gsum.download();
    EXPECT_LE(testing::rel_l2(got_sum, sum_exp), kSumTolerance) << "sum_exp " << what;
    testing::expect_same_nonfinite(got_sum, sum_exp, "sum_exp");
    expect_same_values(gtl.download(), target_logit, "target_logit " + what);
    if (num_real == 0) {
      for (float s : got_sum) EXPECT_EQ(s, 0.0f) << "padding-only shard: " << what;
    }
    EXPECT_TRUE(gmax.guards_intact() && gsum.guards_intact() && gtl.guards_intact()) << what;

    // finish and backward from the CPU's statistics, so each comparison isolates one kernel.
    gsum.upload(total_sum);
    gtl.upload(target_logit);
    settle();
    ops::cross_entropy_shard_finish(glosses, glse, gglobal, gsum, gtl, gtargets);
    const auto got_losses = glosses.download(), got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(got_lse, lse), 1e-6) << "lse " << what;
    EXPECT_LE(testing::rel_l2(got_losses, losses), 1e-6) << "losses " << what;
    testing::expect_same_nonfinite(got_losses, losses, "losses");
    testing::expect_ignored_rows_zero(got_losses, targets, what);
    EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact()) << what;

    glse.upload(lse);
    settle();
    ops::cross_entropy_backward(gdlogits, glogits, glse, gtargets, c.vocab_size, dloss,
                                c.vocab_start);
    auto got = gdlogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "dlogits " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits");
    EXPECT_TRUE(gdlogits.guards_intact()) << what;
    testing::expect_zero_outside_real(got, targets, v, num_real, "dlogits", what);
    ops::cross_entropy_backward(glogits, glogits, glse, gtargets, c.vocab_size, dloss,
                                c.vocab_start);
    got = glogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "in place " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits in place");
    EXPECT_TRUE(glogits.guards_intact()) << what;
  }
}

// The whole protocol on the GPU (max, all-reduce on the host, sums, all-reduce, finish) over tp
// column shards of one (N, V) logits tensor, against the unsharded CPU forward; then every
// shard's backward against the columns of the unsharded CPU backward.
TEST_P(CrossEntropyShardGpu, ProtocolMatchesUnshardedCpu) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(72);
  struct Split {
    int64_t rows, width;  // N, Vl
    int tp, vocab_size;
  };
  for (const Split& s : {Split{5, 1031, 3, 3000}, Split{6, 12576, 4, 50257}, Split{3, 5, 4, 11}}) {
    const int64_t n = s.rows, v = s.width, full_v = s.tp * s.width;
    const std::string what =
        std::string(dtype_name(dtype)) + " tp=" + std::to_string(s.tp) + " Vl=" + std::to_string(v);
    const auto logits = testing::round_to(dtype, testing::random_vector(n * full_v, rng, 2.0f));
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> pick(0, s.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) targets[i] = i == 1 ? -1 : pick(rng);
    targets[0] = s.vocab_size - 1;  // the last real column
    std::vector<float> losses(n), lse(n), dlogits(n * full_v);
    std::vector<float> logits_copy = logits;
    cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits_copy, {n, full_v}),
                               host_i32(targets, {n}), s.vocab_size);
    cpu::cross_entropy_backward(host(dlogits, {n, full_v}), host(logits_copy, {n, full_v}),
                                host(lse, {n}), host_i32(targets, {n}), s.vocab_size, 0.5f);

    std::vector<std::unique_ptr<DeviceTensor>> shards;
    for (int r = 0; r < s.tp; ++r) {
      shards.push_back(std::make_unique<DeviceTensor>(dtype, Shape{n, v}));
      shards.back()->upload(testing::columns_of(logits, n, full_v, r * v, v));
    }
    DeviceTensor gtargets(DType::i32, {n}), gmax(DType::f32, {n}), gsum(DType::f32, {n});
    DeviceTensor gtl(DType::f32, {n}), glosses(DType::f32, {n}), glse(DType::f32, {n});
    gtargets.upload_i32(targets);
    settle();
    std::vector<float> row_max(n, -INFINITY), sum_exp(n, 0.0f), target_logit(n, 0.0f);
    for (int r = 0; r < s.tp; ++r) {
      ops::cross_entropy_shard_max(gmax, *shards[r], r * v, s.vocab_size);
      const auto part = gmax.download();
      for (int64_t i = 0; i < n; ++i) row_max[i] = std::max(row_max[i], part[i]);
    }
    gmax.upload(row_max);
    for (int r = 0; r < s.tp; ++r) {
      ops::cross_entropy_shard_sums(gsum, gtl, *shards[r], gmax, gtargets, r * v, s.vocab_size);
      const auto part_sum = gsum.download(), part_tl = gtl.download();
      for (int64_t i = 0; i < n; ++i) {
        sum_exp[i] += part_sum[i];
        target_logit[i] += part_tl[i];
      }
    }
    gsum.upload(sum_exp);
    gtl.upload(target_logit);
    settle();
    ops::cross_entropy_shard_finish(glosses, glse, gmax, gsum, gtl, gtargets);
    const auto got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(glosses.download(), losses), kSumTolerance) << "losses " << what;
    EXPECT_LE(testing::rel_l2(got_lse, lse), kSumTolerance) << "lse " << what;

    for (int r = 0; r < s.tp; ++r) {
      ops::cross_entropy_backward(*shards[r], *shards[r], glse, gtargets, s.vocab_size, 0.5f,
                                  r * v);
      const auto got = shards[r]->download();
      const std::vector<float> want = testing::columns_of(dlogits, n, full_v, r * v, v);
      EXPECT_LE(testing::rel_l2(got, want), grad_tolerance(dtype)) << "rank " << r << " " << what;
      EXPECT_TRUE(shards[r]->guards_intact()) << what;
    }
  }
}

// Targets cannot be checked on the host without a synchronization: one past the real vocabulary
// must give a NaN target_logit (so a NaN loss) and a NaN gradient row on every shard.
TEST_P(CrossEntropyShardGpu, OutOfRangeTargetGivesNaN) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(73);
  const int64_t n = 2, v = 32;
  const int vocab = 50;  // shards [0, 32) and [32, 64); 60 is padding, not a class
  auto logits = testing::round_to(dtype, testing::random_vector(n * v, rng));
  DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), gmax(DType::f32, {n});
  DeviceTensor gsum(DType::f32, {n}), gtl(DType::f32, {n}), glse(DType::f32, {n});
  gtargets.upload_i32({3, 60});
  glse.upload({5.0f, 5.0f});
  for (int64_t start : {0, 32}) {
    glogits.upload(logits);
    settle();
    ops::cross_entropy_shard_max(gmax, glogits, start, vocab);
    ops::cross_entropy_shard_sums(gsum, gtl, glogits, gmax, gtargets, start, vocab);
    const auto tl = gtl.download();
    EXPECT_TRUE(std::isfinite(tl[0])) << start;
    EXPECT_TRUE(std::isnan(tl[1])) << start;
    ops::cross_entropy_backward(glogits, glogits, glse, gtargets, vocab, 1.0f, start);
    const auto grad = glogits.download();
    for (int64_t col = 0; col < v; ++col) EXPECT_TRUE(std::isnan(grad[v + col])) << col;
    EXPECT_TRUE(std::isfinite(grad[0])) << start;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CrossEntropyShardGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::gpu_shard
