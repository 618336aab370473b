// Vocabulary-parallel cross-entropy on the CPU (shard max, shard sums, finish, sharded backward in
// kernels/cpu/cross_entropy.cpp) against the unsharded op: the padded vocabulary split into
// tp = 1..4 column shards (the last one with few or no real columns), combined as the tp
// all-reduces would; finite differences of the combined loss; edge statistics; argument checks.
// Shape letters: N rows, V padded vocabulary width (= tp * Vl), Vl one shard's width.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_b/kernels_b_util.h"

namespace tessera::testing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kPadValue = 40.0;  // would dominate the softmax if padding leaked into it

struct ShardCase {
  int64_t rows, shard_width;  // N, Vl
  int tp;
  int vocab_size;  // real columns of the whole V = tp * Vl
  int64_t width() const { return tp * shard_width; }
  int64_t start(int rank) const { return rank * shard_width; }
  std::string str() const {
    return "N=" + std::to_string(rows) + " Vl=" + std::to_string(shard_width) +
           " tp=" + std::to_string(tp) + " vocab=" + std::to_string(vocab_size);
  }
};
const ShardCase kCases[] = {
    {5, 7, 1, 7},     // tp = 1, no padding
    {6, 7, 1, 5},     // tp = 1, padded
    {6, 8, 2, 16},    // even split, no padding
    {7, 7, 2, 13},    // last shard: 6 of 7 columns real
    {5, 5, 3, 11},    // last shard: 1 real column
    {6, 3, 4, 9},     // last shard: no real column
    {4, 1, 4, 2},     // Vl = 1, two shards of padding only
    {9, 33, 4, 129},  // Vl = 33 is no multiple of a vector width; last shard 30 real
    {1, 13, 3, 30},   // N = 1
};

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

// Columns [begin, begin + width) of a (N, V) tensor, as a (N, width) tensor.
HostTensor slice_columns(const HostTensor& full, int64_t begin, int64_t width) {
  const int64_t rows = full.t.dim(0), full_width = full.t.dim(1);
  HostTensor out(full.t.dtype, {rows, width});
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j)
      out.set(n * width + j, full.get(n * full_width + begin + j));
  return out;
}

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
      const double tol = forward_tolerance(dtype);
      double worst = 0.0;
      for (int64_t n = 0; n < c.rows; ++n) {
        for (const auto& [got, want] : {std::pair{&s.lse, &lse}, std::pair{&s.losses, &losses}}) {
          const double err =
              std::fabs(got->get(n) - want->get(n)) / std::max(1.0, std::fabs(want->get(n)));
          worst = std::max(worst, std::isnan(err) ? kInf : err);
        }
      }
      EXPECT_LE(worst, tol);
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
        EXPECT_TRUE(exactly_equal(dshard, want)) << "rank " << r;
        HostTensor in_place = shard;
        cpu::cross_entropy_backward(in_place, in_place, lse, in.targets, c.vocab_size, dloss,
                                    c.start(r));
        EXPECT_TRUE(exactly_equal(in_place, want)) << "rank " << r << " in place";
      }
    }
  }
}

// The sharded backward (with the combined lse) against central differences of the combined
// sharded loss, every element of the full logits: padding columns and the ignored row must have
// exactly zero gradient (there the difference is exactly 0). Budget as in cross_entropy_test.cpp:
// h = 1e-5 gives ~1e-10 truncation and rounding; with a 1e-3 floor, ~1e-7 relative.
TEST(CrossEntropyShard, BackwardMatchesFiniteDifferencesOfCombinedLoss) {
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
      for (int64_t n = 0; n < c.rows; ++n)
        for (int64_t j = 0; j < c.shard_width; ++j)
          analytic.set(n * c.width() + c.start(r) + j, dshard.get(n * c.shard_width + j));
    }
    auto loss = [&] {
      const Stats probe = sharded_forward(in.logits, in.targets, c, DType::f64);
      double total = 0.0;
      for (int64_t n = 0; n < c.rows; ++n) total += double(dloss) * probe.losses.get(n);
      return total;
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
  const HostTensor shard32 = cast_copy(shard, DType::f32);
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
}  // namespace tessera::testing
