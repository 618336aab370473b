// Tests of the knowledge-distillation loss and its vocabulary-parallel pieces
// (kernels/cpu/kd_loss.cpp, kernels/cuda/kd_loss.cu): kd_loss_forward / backward, kd_shard_max /
// sums / finish, forward and reverse KL. CPU: against softmaxes and KL written here in double,
// finite differences at T = 0.5, 1, 4 including padding columns and an ignored row, the
// large-temperature limit, KL = 0 and zero gradient when student == teacher, KL >= 0, in-place
// backward, f32 vs f64, argument errors; the padded vocabulary split into tp = 1..4 column shards
// combined as the tp all-reduces would (a shard of padding only included), against the unsharded
// op, and finite differences of the combined loss; bf16/f16 against the f32 kernel rounded once;
// bounds and thread counts. GPU parity: f32, bf16, f16, awkward sizes (V = 50304 with vocab_size
// 50257, V not a multiple of 8, N = 1), misaligned views, in place, the shard pieces and the whole
// shard protocol against the unsharded CPU op.
// Shape letters: N rows, V padded vocabulary width (= tp * Vl), Vl one shard's width;
// vocab_size <= V real columns; T the temperature.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
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
// Padding values that would dominate either softmax if padding leaked into it.
constexpr double kStudentPad = 40.0, kTeacherPad = -35.0;
constexpr float kTemperatures[] = {0.5f, 1.0f, 4.0f};

std::string mode(bool reverse, float temperature) {
  return std::string(reverse ? "reverse" : "forward") + " T=" + std::to_string(temperature);
}

// Student and teacher logits (N, V) with padding columns set, targets (N) with one ignored row.
struct KdInputs {
  HostTensor student, teacher, targets;
  KdInputs(DType dtype, std::mt19937_64& rng, int64_t rows = kRows, int64_t width = kWidth,
           int vocab_size = kVocabSize, double stddev = 2.0)
      : student(randn(dtype, {rows, width}, rng, stddev)),
        teacher(randn(dtype, {rows, width}, rng, stddev)),
        targets(randint({rows}, 0, vocab_size, rng)) {
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t c = vocab_size; c < width; ++c) {
        student.set(n * width + c, kStudentPad);
        teacher.set(n * width + c, kTeacherPad);
      }
    }
    if (rows > kIgnoredRow) targets.set(kIgnoredRow, -1);
  }
};

struct KdOutputs {
  HostTensor losses, lse;  // (N), (2, N)
  KdOutputs(DType dtype, int64_t rows = kRows) : losses(dtype, {rows}), lse(dtype, {2, rows}) {}
  void forward(const KdInputs& in, float temperature, bool reverse, int vocab = kVocabSize) {
    cpu::kd_loss_forward(losses, lse, in.student, in.teacher, in.targets, vocab, temperature,
                         reverse);
  }
};

// log_softmax of row n's first `vocab` columns of x / T, written out directly.
std::vector<double> log_softmax(const HostTensor& x, int64_t n, int64_t width, int vocab,
                                double temperature, double* lse) {
  double m = -std::numeric_limits<double>::infinity();
  for (int c = 0; c < vocab; ++c) m = std::max(m, x.get(n * width + c) / temperature);
  double sum = 0.0;
  for (int c = 0; c < vocab; ++c) sum += std::exp(x.get(n * width + c) / temperature - m);
  *lse = m + std::log(sum);
  std::vector<double> out(vocab);
  for (int c = 0; c < vocab; ++c) out[c] = x.get(n * width + c) / temperature - *lse;
  return out;
}

// The loss of row n and its gradient with respect to the student's first `vocab` columns, from
// the definitions: KL(p || q) = sum p (log p - log q), and for the reverse KL the gradient of
// sum ps (log ps - log pt) through log ps, times T^2 / T.
struct Direct {
  double loss, lse_s, lse_t;
  std::vector<double> grad;
};
Direct direct_kd(const KdInputs& in, int64_t n, int64_t width, int vocab, double temperature,
                 bool reverse) {
  Direct d;
  const auto ls = log_softmax(in.student, n, width, vocab, temperature, &d.lse_s);
  const auto lt = log_softmax(in.teacher, n, width, vocab, temperature, &d.lse_t);
  double kl = 0.0;
  for (int c = 0; c < vocab; ++c)
    kl += reverse ? std::exp(ls[c]) * (ls[c] - lt[c]) : std::exp(lt[c]) * (lt[c] - ls[c]);
  d.loss = temperature * temperature * kl;
  d.grad.resize(vocab);
  for (int c = 0; c < vocab; ++c) {
    const double ps = std::exp(ls[c]), pt = std::exp(lt[c]);
    d.grad[c] = reverse ? temperature * ps * (ls[c] - lt[c] - kl) : temperature * (ps - pt);
  }
  return d;
}

TEST(KdLoss, MatchesDirectFormula) {
  for (bool reverse : {false, true}) {
    for (float temperature : kTemperatures) {
      SCOPED_TRACE(mode(reverse, temperature));
      std::mt19937_64 rng(31);
      const KdInputs in(DType::f64, rng);
      KdOutputs out(DType::f64);
      out.forward(in, temperature, reverse);
      HostTensor dstudent(DType::f64, in.student.t.shape);
      const float dloss = 0.75f;
      cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses, in.targets,
                            kVocabSize, temperature, reverse, dloss);
      for (int64_t n = 0; n < kRows; ++n) {
        const Direct d = direct_kd(in, n, kWidth, kVocabSize, temperature, reverse);
        EXPECT_NEAR(out.lse.get(n), d.lse_s, 1e-13) << "row " << n;
        EXPECT_NEAR(out.lse.get(kRows + n), d.lse_t, 1e-13) << "row " << n;
        if (n == kIgnoredRow) {
          EXPECT_EQ(out.losses.get(n), 0.0);
        } else {
          // Sums of O(10) terms in double: ~1e-14 absolute, scaled by T^2 <= 16.
          EXPECT_NEAR(out.losses.get(n), d.loss, 1e-12) << "row " << n;
          EXPECT_GT(out.losses.get(n), 0.0) << "row " << n;
        }
        for (int c = 0; c < kVocabSize; ++c) {
          const double want = n == kIgnoredRow ? 0.0 : dloss * d.grad[c];
          EXPECT_NEAR(dstudent.get(n * kWidth + c), want, 1e-13) << n << ", " << c;
        }
      }
    }
  }
}

TS_FD_TEST(KdLoss, BackwardMatchesFiniteDifferences, "kd_loss_forward", "kd_loss_backward") {
  for (bool reverse : {false, true}) {
    for (float temperature : kTemperatures) {
      SCOPED_TRACE(mode(reverse, temperature));
      std::mt19937_64 rng(32);
      KdInputs in(DType::f64, rng);
      KdOutputs out(DType::f64);
      const float dloss = 0.7f;
      out.forward(in, temperature, reverse);
      HostTensor dstudent = filled(DType::f64, in.student.t.shape, kNaN);  // must be overwritten
      cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses, in.targets,
                            kVocabSize, temperature, reverse, dloss);
      KdOutputs probe(DType::f64);
      auto loss = [&] {
        probe.forward(in, temperature, reverse);
        return weighted_total(probe.losses, dloss);
      };
      // Every element, padding and the ignored row included (there the difference is exactly 0,
      // so a nonzero analytic value fails with relative error 1). Elsewhere: h = 1e-5 gives
      // truncation ~h^2 |L'''| ~ 1e-10 / T (u = z / T, so L''' grows like T^-3 times T^2) and
      // rounding ~1e-16 |L| / h ~ 1e-10; floored at 1e-3 that is ~1e-6 at T = 0.5.
      expect_grad_matches(in.student, dstudent, loss, 1e-5, "kd dstudent", 1e-5, 1 << 20, 1e-3);
      for (int64_t n = 0; n < kRows; ++n) {
        for (int64_t c = 0; c < kWidth; ++c) {
          if (n == kIgnoredRow || c >= kVocabSize) {
            EXPECT_EQ(dstudent.get(n * kWidth + c), 0.0) << n << ", " << c;
          }
        }
      }
    }
  }
}

// For T -> inf, u = z / T -> 0 and both softmaxes tend to uniform: with d = zs - zt over the V'
// real columns, T^2 KL -> (1 / (2 V')) sum_j (d_j - mean(d))^2 in both directions (KL is
// symmetric to second order). At T = 1000 and logits of scale 0.5 the next terms are
// O(|z| / T) ~ 5e-4 relative and of random sign over the columns, so well inside 1e-3.
TEST(KdLoss, LargeTemperatureLimitIsHalfTheVarianceOfTheDifference) {
  constexpr float kT = 1000.0f;
  for (bool reverse : {false, true}) {
    std::mt19937_64 rng(33);
    const KdInputs in(DType::f64, rng, kRows, kWidth, kVocabSize, 0.5);
    KdOutputs out(DType::f64);
    out.forward(in, kT, reverse);
    for (int64_t n = 0; n < kRows; ++n) {
      if (n == kIgnoredRow) continue;
      double mean = 0.0;
      for (int c = 0; c < kVocabSize; ++c)
        mean += in.student.get(n * kWidth + c) - in.teacher.get(n * kWidth + c);
      mean /= kVocabSize;
      double var = 0.0;
      for (int c = 0; c < kVocabSize; ++c) {
        const double d = in.student.get(n * kWidth + c) - in.teacher.get(n * kWidth + c) - mean;
        var += d * d;
      }
      const double want = var / (2.0 * kVocabSize);
      EXPECT_NEAR(out.losses.get(n), want, 1e-3 * want)
          << (reverse ? "reverse" : "forward") << " row " << n;
    }
  }
}

// Student == teacher: the cross term is a sum of exact zeros, the maxima and sums agree, so the
// loss is exactly 0 and so is every gradient element (ps - pt = 0; reverse: the bracket is 0).
TEST(KdLoss, ZeroWhenStudentEqualsTeacher) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      for (float temperature : kTemperatures) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + mode(reverse, temperature));
        std::mt19937_64 rng(34);
        KdInputs in(dtype, rng);
        in.teacher = in.student;
        KdOutputs out(dtype);
        out.forward(in, temperature, reverse);
        HostTensor dstudent(dtype, in.student.t.shape);
        cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses, in.targets,
                              kVocabSize, temperature, reverse, 1.0f);
        for (int64_t n = 0; n < kRows; ++n) {
          EXPECT_EQ(out.losses.get(n), 0.0) << n;
          EXPECT_EQ(out.lse.get(n), out.lse.get(kRows + n)) << n;
        }
        for (int64_t i = 0; i < dstudent.size(); ++i) EXPECT_EQ(dstudent.get(i), 0.0) << i;
      }
    }
  }
}

// KL >= 0 (Gibbs): over many random rows, scales and temperatures, including nearly equal
// student and teacher, where the exact value is tiny and only rounding (~1e-16 of the O(10)
// terms, times T^2) can make it negative.
TEST(KdLoss, IsNonNegative) {
  std::mt19937_64 rng(35);
  for (bool reverse : {false, true}) {
    for (float temperature : {0.25f, 1.0f, 3.0f}) {
      for (double scale : {0.1, 2.0, 8.0}) {
        KdInputs in(DType::f64, rng, 16, 33, 30, scale);
        std::normal_distribution<double> tiny(0.0, 1e-6);
        for (int64_t i = 0; i < 4 * 33; ++i)  // rows 0..3: teacher = student + 1e-6 noise
          in.teacher.set(i, in.student.get(i) + tiny(rng));
        KdOutputs out(DType::f64, 16);
        out.forward(in, temperature, reverse, 30);
        for (int64_t n = 0; n < 16; ++n)
          EXPECT_GE(out.losses.get(n), -1e-13) << mode(reverse, temperature) << " row " << n;
      }
    }
  }
}

TEST(KdLoss, InPlaceBackwardMatchesOutOfPlace) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      std::mt19937_64 rng(36);
      const KdInputs in(dtype, rng);
      KdOutputs out(dtype);
      out.forward(in, 2.0f, reverse);
      HostTensor dstudent(dtype, in.student.t.shape);
      cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses, in.targets,
                            kVocabSize, 2.0f, reverse, 1.5f);
      HostTensor in_place = in.student;
      cpu::kd_loss_backward(in_place, in_place, in.teacher, out.lse, out.losses, in.targets,
                            kVocabSize, 2.0f, reverse, 1.5f);
      expect_identical_no_nan(in_place, dstudent, std::string(dtype_name(dtype)));
    }
  }
}

TEST(KdLoss, F32MatchesF64) {
  for (bool reverse : {false, true}) {
    std::mt19937_64 rng(37);
    const KdInputs in32(DType::f32, rng);
    KdInputs in64 = in32;
    in64.student = to_dtype(in32.student, DType::f64);  // identical input values
    in64.teacher = to_dtype(in32.teacher, DType::f64);
    KdOutputs out32(DType::f32), out64(DType::f64);
    out32.forward(in32, 1.5f, reverse);
    out64.forward(in64, 1.5f, reverse);
    // Double arithmetic in both; f32 adds one rounding of values up to ~20 (2e-6 absolute).
    EXPECT_LE(max_abs_diff(out32.losses, out64.losses), 4e-6);
    EXPECT_LE(max_abs_diff(out32.lse, out64.lse), 4e-6);
    HostTensor d32(DType::f32, in32.student.t.shape), d64(DType::f64, in32.student.t.shape);
    cpu::kd_loss_backward(d32, in32.student, in32.teacher, out32.lse, out32.losses, in32.targets,
                          kVocabSize, 1.5f, reverse, 1.0f);
    cpu::kd_loss_backward(d64, in64.student, in64.teacher, out64.lse, out64.losses, in64.targets,
                          kVocabSize, 1.5f, reverse, 1.0f);
    EXPECT_LE(max_abs_diff(d32, d64), 4e-6);
    // f64 logits may keep f32 statistics (as cross-entropy allows).
    KdOutputs mixed(DType::f32);
    mixed.forward(in64, 1.5f, reverse);
    EXPECT_LE(max_abs_diff(mixed.losses, out64.losses), 4e-6);
  }
}

TEST(KdLoss, RejectsBadArguments) {
  std::mt19937_64 rng(38);
  const KdInputs in(DType::f64, rng);
  KdOutputs out(DType::f64);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float bad_t : {0.0f, -1.0f, nan, inf})
    EXPECT_THROW(out.forward(in, bad_t, false), Error) << bad_t;
  HostTensor dstudent(DType::f64, in.student.t.shape);
  out.forward(in, 1.0f, false);
  EXPECT_THROW(cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses,
                                     in.targets, kVocabSize, 0.0f, false, 1.0f),
               Error);
  EXPECT_THROW(out.forward(in, 1.0f, false, kWidth + 1), Error);  // vocab_size > V
  EXPECT_THROW(out.forward(in, 1.0f, false, 0), Error);
  KdInputs narrow_teacher = in;  // teacher (N, V - 1)
  narrow_teacher.teacher = randn(DType::f64, {kRows, kWidth - 1}, rng);
  EXPECT_THROW(out.forward(narrow_teacher, 1.0f, false), Error);
  KdInputs f32_teacher = in;  // teacher f32 beside f64 student
  f32_teacher.teacher = to_dtype(in.teacher, DType::f32);
  EXPECT_THROW(out.forward(f32_teacher, 1.0f, false), Error);
  HostTensor flat_lse(DType::f64, {2 * kRows});  // (2N) instead of (2, N)
  EXPECT_THROW(cpu::kd_loss_forward(out.losses, flat_lse, in.student, in.teacher, in.targets,
                                    kVocabSize, 1.0f, false),
               Error);
  const KdInputs in32(DType::f32, rng);  // f64 statistics are for f64 logits only
  EXPECT_THROW(out.forward(in32, 1.0f, false), Error);
  HostTensor short_targets = randint({kRows - 1}, 0, kVocabSize, rng);
  EXPECT_THROW(cpu::kd_loss_forward(out.losses, out.lse, in.student, in.teacher, short_targets,
                                    kVocabSize, 1.0f, false),
               Error);
  // Aliasing: dstudent may be student, nothing else.
  HostTensor teacher_copy = in.teacher;
  EXPECT_THROW(cpu::kd_loss_backward(teacher_copy, in.student, teacher_copy, out.lse, out.losses,
                                     in.targets, kVocabSize, 1.0f, false, 1.0f),
               Error);
  HostTensor student_copy = in.student;
  Tensor shifted = student_copy.t;  // one row further into the same buffer: partial overlap
  shifted.shape = Shape{kRows - 1, kWidth};
  Tensor head = student_copy.t;
  head.shape = Shape{kRows - 1, kWidth};
  shifted.data = student_copy.f64.data() + kWidth;
  HostTensor targets6 = randint({kRows - 1}, 0, kVocabSize, rng);
  HostTensor lse6(DType::f64, {2, kRows - 1}), losses6(DType::f64, {kRows - 1});
  EXPECT_THROW(cpu::kd_loss_backward(shifted, head, randn(DType::f64, {kRows - 1, kWidth}, rng),
                                     lse6, losses6, targets6, kVocabSize, 1.0f, false, 1.0f),
               Error);
  EXPECT_THROW(cpu::kd_loss_backward(dstudent, in.student, in.teacher, out.lse, out.losses,
                                     in.targets, kVocabSize, 1.0f, false, 1.0f, -3),
               Error);
  // Through ops: a bf16 student beside an f16 teacher must not be hidden by the widening.
  std::vector<uint16_t> bits(kRows * kWidth, 0x3f80);
  const Tensor s16(bits.data(), DType::bf16, Device::cpu, Shape{kRows, kWidth});
  std::vector<uint16_t> bits2(kRows * kWidth, 0x3c00);
  const Tensor t16(bits2.data(), DType::f16, Device::cpu, Shape{kRows, kWidth});
  HostTensor losses32(DType::f32, {kRows}), lse32(DType::f32, {2, kRows});
  EXPECT_THROW(ops::kd_loss_forward(losses32, lse32, s16, t16, in.targets, kVocabSize, 1.0f, false),
               Error);
}

}  // namespace

// ---- CPU reference, vocabulary-parallel pieces -------------------------------------------------

// ShardCase, kCases, slice_columns: tests/kernels/vocab_shard_cases.h.
namespace shard_cases {
namespace {

KdInputs make_inputs(DType dtype, const ShardCase& c, std::mt19937_64& rng) {
  KdInputs in(dtype, rng, c.rows, c.width(), c.vocab_size);
  if (c.rows > 1) in.targets.set(1, -1);
  return in;
}

struct Stats {
  HostTensor row_max, sums, losses, lse;  // (2, N), (3, N), (N), (2, N)
  Stats(DType dtype, int64_t rows)
      : row_max(dtype, {2, rows}),
        sums(dtype, {3, rows}),
        losses(dtype, {rows}),
        lse(dtype, {2, rows}) {}
};

// The tp-rank protocol run in one process: shard max on every rank, all-reduce(max), shard sums
// with the global maxima, all-reduce(sum) (added in the statistics' dtype, rank order, as an
// all-reduce would), then finish.
Stats sharded_forward(const KdInputs& in, const ShardCase& c, DType stat_dtype, float temperature,
                      bool reverse) {
  Stats s(stat_dtype, c.rows);
  std::vector<HostTensor> students, teachers;
  for (int r = 0; r < c.tp; ++r) {
    students.push_back(slice_columns(in.student, c.start(r), c.shard_width));
    teachers.push_back(slice_columns(in.teacher, c.start(r), c.shard_width));
  }
  for (int64_t i = 0; i < 2 * c.rows; ++i) s.row_max.set(i, -kInf);
  for (int r = 0; r < c.tp; ++r) {
    HostTensor part(stat_dtype, {2, c.rows});
    cpu::kd_shard_max(part, students[r], teachers[r], c.start(r), c.vocab_size, temperature);
    for (int64_t i = 0; i < 2 * c.rows; ++i)
      s.row_max.set(i, std::max(s.row_max.get(i), part.get(i)));
  }
  for (int r = 0; r < c.tp; ++r) {
    HostTensor part(stat_dtype, {3, c.rows});
    cpu::kd_shard_sums(part, students[r], teachers[r], s.row_max, c.start(r), c.vocab_size,
                       temperature, reverse);
    for (int64_t i = 0; i < 3 * c.rows; ++i) s.sums.set(i, s.sums.get(i) + part.get(i));
  }
  cpu::kd_shard_finish(s.losses, s.lse, s.row_max, s.sums, in.targets, temperature, reverse);
  return s;
}

// f64: only the summation order of the sums differs from the unsharded op (~1e-16 relative),
// which the KL's subtraction of O(10) terms and T^2 <= 4 turn into ~1e-14. f32: the sums are
// rounded to f32 on each rank and again by the all-reduce (2^-24 relative each), moving lse by
// ~1e-7 and the KL's terms by ~1e-7 of their O(10) size, times T^2 = 4: ~1e-5 absolute, floored
// at 1 so a loss near 0 is not judged relative to itself.
double forward_tolerance(DType dtype) { return dtype == DType::f64 ? 1e-12 : 2e-5; }

TEST(KdShard, CombinedShardsMatchUnshardedForward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      for (float temperature : {0.5f, 2.0f}) {
        std::mt19937_64 rng(61);
        for (const ShardCase& c : kCases) {
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + mode(reverse, temperature) + " " +
                       c.str());
          const KdInputs in = make_inputs(dtype, c, rng);
          KdOutputs want(dtype, c.rows);
          want.forward(in, temperature, reverse, c.vocab_size);
          const Stats s = sharded_forward(in, c, dtype, temperature, reverse);
          EXPECT_LE(std::max(max_floored_rel_error(s.lse, want.lse),
                             max_floored_rel_error(s.losses, want.losses)),
                    forward_tolerance(dtype));
          if (c.rows > 1) {
            EXPECT_EQ(s.losses.get(1), 0.0) << "ignored row";
          }
        }
      }
    }
  }
}

// Each shard's backward, given the unsharded lse and losses, performs the same arithmetic per
// element as the unsharded backward on its columns: the slices must match bit for bit, in place
// too.
TEST(KdShard, BackwardSlicesMatchUnshardedBackward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      std::mt19937_64 rng(62);
      for (const ShardCase& c : kCases) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + (reverse ? " reverse " : " forward ") +
                     c.str());
        const KdInputs in = make_inputs(dtype, c, rng);
        KdOutputs out(dtype, c.rows);
        out.forward(in, 1.5f, reverse, c.vocab_size);
        HostTensor full(dtype, in.student.t.shape);
        const float dloss = 0.3f;
        cpu::kd_loss_backward(full, in.student, in.teacher, out.lse, out.losses, in.targets,
                              c.vocab_size, 1.5f, reverse, dloss);
        for (int r = 0; r < c.tp; ++r) {
          const HostTensor student = slice_columns(in.student, c.start(r), c.shard_width);
          const HostTensor teacher = slice_columns(in.teacher, c.start(r), c.shard_width);
          HostTensor dshard = filled(dtype, student.t.shape, kNaN);  // must be overwritten
          cpu::kd_loss_backward(dshard, student, teacher, out.lse, out.losses, in.targets,
                                c.vocab_size, 1.5f, reverse, dloss, c.start(r));
          const HostTensor want = slice_columns(full, c.start(r), c.shard_width);
          expect_identical_no_nan(dshard, want, "rank " + std::to_string(r));
          HostTensor in_place = student;
          cpu::kd_loss_backward(in_place, in_place, teacher, out.lse, out.losses, in.targets,
                                c.vocab_size, 1.5f, reverse, dloss, c.start(r));
          expect_identical_no_nan(in_place, want, "rank " + std::to_string(r) + " in place");
        }
      }
    }
  }
}

// The sharded backward (with the combined lse and losses) against central differences of the
// combined sharded loss, every element of the full student logits: padding columns and the
// ignored row must have exactly zero gradient. Budget as in the unsharded case.
TS_FD_TEST(KdShard, BackwardMatchesFiniteDifferencesOfCombinedLoss, "kd_shard_max", "kd_shard_sums",
           "kd_shard_finish", "kd_loss_backward") {
  std::mt19937_64 rng(63);
  const float dloss = 0.7f;
  for (bool reverse : {false, true}) {
    for (float temperature : {0.5f, 1.0f, 4.0f}) {
      for (const ShardCase& c : {kCases[3], kCases[4], kCases[5], kCases[6]}) {
        SCOPED_TRACE(mode(reverse, temperature) + " " + c.str());
        KdInputs in = make_inputs(DType::f64, c, rng);
        const Stats s = sharded_forward(in, c, DType::f64, temperature, reverse);
        HostTensor analytic(DType::f64, in.student.t.shape);
        for (int r = 0; r < c.tp; ++r) {
          const HostTensor student = slice_columns(in.student, c.start(r), c.shard_width);
          const HostTensor teacher = slice_columns(in.teacher, c.start(r), c.shard_width);
          HostTensor dshard(DType::f64, student.t.shape);
          cpu::kd_loss_backward(dshard, student, teacher, s.lse, s.losses, in.targets, c.vocab_size,
                                temperature, reverse, dloss, c.start(r));
          place_columns(analytic, dshard, c.start(r));
        }
        auto loss = [&] {
          return weighted_total(sharded_forward(in, c, DType::f64, temperature, reverse).losses,
                                dloss);
        };
        expect_grad_matches(in.student, analytic, loss, 1e-5, "sharded dstudent", 1e-5, 1 << 20,
                            1e-3);
      }
    }
  }
}

// One shard on its own: padding only gives maxima -inf and zero sums; finish keeps lse on an
// ignored row and zeroes its loss.
TEST(KdShard, StatisticsOfOneShard) {
  std::mt19937_64 rng(64);
  const ShardCase c = kCases[5];  // rank 3 holds padding only
  const KdInputs in = make_inputs(DType::f64, c, rng);
  const HostTensor student = slice_columns(in.student, c.start(3), c.shard_width);
  const HostTensor teacher = slice_columns(in.teacher, c.start(3), c.shard_width);
  HostTensor row_max(DType::f64, {2, c.rows}), sums(DType::f64, {3, c.rows});
  cpu::kd_shard_max(row_max, student, teacher, c.start(3), c.vocab_size, 1.0f);
  for (int64_t i = 0; i < row_max.size(); ++i) EXPECT_EQ(row_max.get(i), -kInf);
  HostTensor global_max = filled(DType::f64, {2, c.rows}, 5.0);
  for (bool reverse : {false, true}) {
    cpu::kd_shard_sums(sums, student, teacher, global_max, c.start(3), c.vocab_size, 1.0f, reverse);
    for (int64_t i = 0; i < sums.size(); ++i) EXPECT_EQ(sums.get(i), 0.0);
  }
  // A shard with real columns: row 0 by hand at T = 2.
  const HostTensor s0 = slice_columns(in.student, c.start(0), c.shard_width);
  const HostTensor t0 = slice_columns(in.teacher, c.start(0), c.shard_width);
  cpu::kd_shard_max(row_max, s0, t0, 0, c.vocab_size, 2.0f);
  cpu::kd_shard_sums(sums, s0, t0, row_max, 0, c.vocab_size, 2.0f, false);
  double ms = -kInf, mt = -kInf, ss = 0.0, st = 0.0, cross = 0.0;
  for (int64_t j = 0; j < c.shard_width; ++j) {
    ms = std::max(ms, s0.get(j) / 2.0);
    mt = std::max(mt, t0.get(j) / 2.0);
  }
  for (int64_t j = 0; j < c.shard_width; ++j) {
    const double us = s0.get(j) / 2.0, ut = t0.get(j) / 2.0;
    ss += std::exp(us - ms);
    st += std::exp(ut - mt);
    cross += std::exp(ut - mt) * (ut - us);
  }
  EXPECT_EQ(row_max.get(0), ms);
  EXPECT_EQ(row_max.get(c.rows), mt);
  EXPECT_DOUBLE_EQ(sums.get(0), ss);
  EXPECT_DOUBLE_EQ(sums.get(c.rows), st);
  EXPECT_NEAR(sums.get(2 * c.rows), cross, 1e-14);
  HostTensor losses(DType::f64, {c.rows}), lse(DType::f64, {2, c.rows});
  cpu::kd_shard_finish(losses, lse, row_max, sums, in.targets, 2.0f, false);
  EXPECT_DOUBLE_EQ(lse.get(0), ms + std::log(ss));
  EXPECT_DOUBLE_EQ(lse.get(c.rows), mt + std::log(st));
  EXPECT_NEAR(losses.get(0), 4.0 * (cross / st - (mt + std::log(st)) + (ms + std::log(ss))), 1e-13);
  EXPECT_EQ(losses.get(1), 0.0);  // ignored
  EXPECT_DOUBLE_EQ(lse.get(1), row_max.get(1) + std::log(sums.get(1)));
}

TEST(KdShard, RejectsBadArguments) {
  std::mt19937_64 rng(65);
  const ShardCase c = kCases[3];
  const KdInputs in = make_inputs(DType::f64, c, rng);
  const HostTensor student = slice_columns(in.student, c.start(1), c.shard_width);
  const HostTensor teacher = slice_columns(in.teacher, c.start(1), c.shard_width);
  HostTensor row_max(DType::f64, {2, c.rows}), sums(DType::f64, {3, c.rows});
  HostTensor losses(DType::f64, {c.rows}), lse(DType::f64, {2, c.rows});
  EXPECT_THROW(cpu::kd_shard_max(row_max, student, teacher, -1, c.vocab_size, 1.0f), Error);
  EXPECT_THROW(cpu::kd_shard_max(row_max, student, teacher, 0, 0, 1.0f), Error);
  EXPECT_THROW(cpu::kd_shard_max(row_max, student, teacher, 0, c.vocab_size, 0.0f), Error);
  HostTensor flat_max(DType::f64, {2 * c.rows});
  EXPECT_THROW(cpu::kd_shard_max(flat_max, student, teacher, 0, c.vocab_size, 1.0f), Error);
  cpu::kd_shard_max(row_max, student, teacher, c.start(1), c.vocab_size, 1.0f);
  HostTensor short_sums(DType::f64, {2, c.rows});
  EXPECT_THROW(cpu::kd_shard_sums(short_sums, student, teacher, row_max, c.start(1), c.vocab_size,
                                  1.0f, false),
               Error);
  EXPECT_THROW(
      cpu::kd_shard_sums(row_max, student, teacher, row_max, c.start(1), c.vocab_size, 1.0f, false),
      Error);
  const HostTensor student32 = to_dtype(student, DType::f32);
  EXPECT_THROW(cpu::kd_shard_max(row_max, student32, teacher, 0, c.vocab_size, 1.0f), Error);
  cpu::kd_shard_sums(sums, student, teacher, row_max, c.start(1), c.vocab_size, 1.0f, false);
  HostTensor sums32(DType::f32, {3, c.rows});  // statistics of finish share one dtype
  EXPECT_THROW(cpu::kd_shard_finish(losses, lse, row_max, sums32, in.targets, 1.0f, false), Error);
  EXPECT_THROW(cpu::kd_shard_finish(losses, lse, row_max, sums, in.targets, -2.0f, false), Error);
  EXPECT_THROW(cpu::kd_shard_finish(losses, row_max, row_max, sums, in.targets, 1.0f, false),
               Error);  // lse aliases row_max
}

}  // namespace
}  // namespace shard_cases

namespace {

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, KdLoss) {
  for (DType dt : kNarrowTypes) {
    for (bool reverse : {false, true}) {
      const int64_t num_n = 3, num_v = 1025;
      const int vocab = 1000;
      const float temperature = 2.0f;
      expect_contract(
          "kd_loss_forward", dt,
          {f32({num_n}), f32({2, num_n}), narrow({num_n, num_v}, 3.0), narrow({num_n, num_v}, 3.0),
           ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_loss_forward(t[0], t[1], t[2], t[3], t[4], vocab, temperature, reverse);
          },
          120);
      expect_contract(
          "kd_loss forward + backward", dt,
          {narrow({num_n, num_v}), narrow({num_n, num_v}, 3.0), narrow({num_n, num_v}, 3.0),
           f32({2, num_n}), f32({num_n}), ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_loss_forward(t[4], t[3], t[1], t[2], t[5], vocab, temperature, reverse);
            ops::kd_loss_backward(t[0], t[1], t[2], t[3], t[4], t[5], vocab, temperature, reverse,
                                  0.25f);
          },
          121);
      expect_contract(
          "kd_loss_backward in place", dt,
          {narrow({num_n, num_v}, 3.0), narrow({num_n, num_v}, 3.0), f32({2, num_n}), f32({num_n}),
           ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_loss_forward(t[3], t[2], t[0], t[1], t[4], vocab, temperature, reverse);
            ops::kd_loss_backward(t[0], t[0], t[1], t[2], t[3], t[4], vocab, temperature, reverse,
                                  1.0f / 3);
          },
          122);
      // vocabulary-parallel: this shard holds columns [600, 1113) of a padded 1113-column vocab
      const int64_t width = 513, start = 600;
      expect_contract(
          "kd shard pipeline", dt,
          {narrow({num_n, width}, 3.0), narrow({num_n, width}, 3.0), ints({num_n}, -1, vocab),
           f32({2, num_n}), f32({3, num_n}), f32({num_n}), f32({2, num_n}), narrow({num_n, width})},
          [=](const auto& t) {
            ops::kd_shard_max(t[3], t[0], t[1], start, vocab, temperature);
            ops::kd_shard_sums(t[4], t[0], t[1], t[3], start, vocab, temperature, reverse);
            ops::kd_shard_finish(t[5], t[6], t[3], t[4], t[2], temperature, reverse);
            ops::kd_loss_backward(t[7], t[0], t[1], t[6], t[5], t[2], vocab, temperature, reverse,
                                  0.5f, start);
          },
          123);
    }
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(KdLoss, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(70);
  const int64_t n = 5, width = 19;
  const int vocab = 17;  // columns 17, 18 are padding
  const HostTensor student = randn(DType::f32, {n, width}, rng, 2.0);
  const HostTensor teacher = randn(DType::f32, {n, width}, rng, 2.0);
  const HostTensor targets = randint({n}, -1, vocab, rng);
  for (bool reverse : {false, true}) {
    Guarded losses({n}), lse({2, n}), dstudent({n, width});
    cpu::kd_loss_forward(losses, lse, student, teacher, targets, vocab, 1.5f, reverse);
    cpu::kd_loss_backward(dstudent, student, teacher, lse, losses, targets, vocab, 1.5f, reverse,
                          0.5f);
    expect_guards_intact({&losses, &lse, &dstudent}, "kd_loss");
    // Vocabulary-parallel pieces of a shard holding columns [10, 29) of the padded vocabulary.
    Guarded row_max({2, n}), sums({3, n}), s_losses({n}), s_lse({2, n}), s_dstudent({n, width});
    cpu::kd_shard_max(row_max, student, teacher, 10, vocab, 1.5f);
    cpu::kd_shard_sums(sums, student, teacher, row_max, 10, vocab, 1.5f, reverse);
    cpu::kd_shard_finish(s_losses, s_lse, row_max, sums, targets, 1.5f, reverse);
    cpu::kd_loss_backward(s_dstudent, student, teacher, s_lse, s_losses, targets, vocab, 1.5f,
                          reverse, 0.5f, 10);
    expect_guards_intact({&row_max, &sums, &s_losses, &s_lse, &s_dstudent}, "kd shard ops");
  }
}

TEST(KdLoss, IsThreadCountIndependent) {
  std::mt19937_64 rng(71);
  const int64_t n = 300, width = 257;
  const int vocab = 250;
  const HostTensor student = randn(DType::f32, {n, width}, rng, 3.0);
  const HostTensor teacher = randn(DType::f32, {n, width}, rng, 3.0);
  const HostTensor targets = randint({n}, -1, vocab, rng);
  for (bool reverse : {false, true}) {
    HostTensor losses(DType::f32, {n}), lse(DType::f32, {2, n}), dstudent(DType::f32, {n, width});
    expect_thread_independent("kd_loss_forward", {&losses, &lse}, [&] {
      cpu::kd_loss_forward(losses, lse, student, teacher, targets, vocab, 2.0f, reverse);
    });
    expect_thread_independent("kd_loss_backward", {&dstudent}, [&] {
      cpu::kd_loss_backward(dstudent, student, teacher, lse, losses, targets, vocab, 2.0f, reverse,
                            0.25f);
    });
    HostTensor row_max(DType::f32, {2, n}), sums(DType::f32, {3, n});
    expect_thread_independent("kd_shard_max", {&row_max}, [&] {
      cpu::kd_shard_max(row_max, student, teacher, 100, vocab, 2.0f);
    });
    expect_thread_independent("kd_shard_sums", {&sums}, [&] {
      cpu::kd_shard_sums(sums, student, teacher, row_max, 100, vocab, 2.0f, reverse);
    });
    expect_thread_independent("kd_shard_finish", {&losses, &lse}, [&] {
      cpu::kd_shard_finish(losses, lse, row_max, sums, targets, 2.0f, reverse);
    });
  }
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/kd_loss.cu) ------------------------------------------------------

namespace tessera::gpu_kd {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::host_i32;
using testing::settle;

// Losses and lse: f32 online sums of up to 50k fast exponentials (~2 ulp each) against double;
// the KL adds the cross term's mean, the maxima's difference and a log ratio, each O(1..10) with
// ~1e-6 relative error, times T^2 <= 4: under 2e-5 in L2 relative to losses of O(1). dstudent:
// f32 exp((u - lse) log2 e) per element (~2e-6 relative for |u - lse| <= 20), a difference of two
// such for the forward KL; bf16 rounds the output (2^-9, ~4e-3 bound as cross-entropy), f16 to
// 2^-11 (1e-3).
constexpr double kLossTolerance = 2e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct KdCase {
  int64_t rows, width;
  int vocab_size;
  float scale;  // logit standard deviation
  float temperature;
};
const KdCase kCases[] = {{1, 1, 1, 1.0f, 1.0f},         {3, 7, 5, 2.0f, 2.0f},
                         {8, 50304, 50257, 2.0f, 1.0f}, {4, 50304, 50257, 3.0f, 4.0f},
                         {5, 1031, 1000, 20.0f, 0.5f},  {1, 4099, 4099, 2.0f, 1.5f},
                         {64, 1030, 1001, 2.0f, 2.0f}};

std::string what_of(DType dtype, bool reverse, const KdCase& c) {
  return std::string(dtype_name(dtype)) + (reverse ? " reverse" : " forward") +
         " N=" + std::to_string(c.rows) + " V=" + std::to_string(c.width) +
         " vocab=" + std::to_string(c.vocab_size) + " T=" + std::to_string(c.temperature);
}

class KdLossGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(KdLossGpu, ForwardAndBackwardMatchCpu, "kd_loss_forward", "kd_loss_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(41);
  for (bool reverse : {false, true}) {
    for (const KdCase& c : kCases) {
      const int64_t n = c.rows, v = c.width;
      const std::string what = what_of(dtype, reverse, c);
      auto student = testing::round_to(dtype, testing::random_vector(n * v, rng, c.scale));
      auto teacher = testing::round_to(dtype, testing::random_vector(n * v, rng, c.scale));
      std::vector<int32_t> targets(n);
      for (int64_t i = 0; i < n; ++i) targets[i] = i % 4 == 2 ? -1 : int32_t(i);  // some ignored
      std::vector<float> losses(n), lse(2 * n), dstudent(n * v);
      cpu::kd_loss_forward(host(losses, {n}), host(lse, {2, n}), host(student, {n, v}),
                           host(teacher, {n, v}), host_i32(targets, {n}), c.vocab_size,
                           c.temperature, reverse);
      const float dloss = 1.0f / float(n);
      cpu::kd_loss_backward(host(dstudent, {n, v}), host(student, {n, v}), host(teacher, {n, v}),
                            host(lse, {2, n}), host(losses, {n}), host_i32(targets, {n}),
                            c.vocab_size, c.temperature, reverse, dloss);

      DeviceTensor gstudent(dtype, {n, v}), gteacher(dtype, {n, v}), gtargets(DType::i32, {n});
      DeviceTensor glosses(DType::f32, {n}), glse(DType::f32, {2, n}), gdstudent(dtype, {n, v});
      gstudent.upload(student);
      gteacher.upload(teacher);
      gtargets.upload_i32(targets);
      settle();
      ops::kd_loss_forward(glosses, glse, gstudent, gteacher, gtargets, c.vocab_size, c.temperature,
                           reverse);
      const auto got_losses = glosses.download(), got_lse = glse.download();
      EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
      EXPECT_LE(testing::rel_l2(got_lse, lse), kLossTolerance) << "lse " << what;
      testing::expect_same_nonfinite(got_losses, losses, "losses");
      testing::expect_ignored_rows_zero(got_losses, targets, what);
      EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact()) << what;

      // The backward uses the CPU's statistics, so the comparison isolates the gradient kernel.
      glse.upload(lse);
      glosses.upload(losses);
      settle();
      ops::kd_loss_backward(gdstudent, gstudent, gteacher, glse, glosses, gtargets, c.vocab_size,
                            c.temperature, reverse, dloss);
      auto got = gdstudent.download();
      EXPECT_LE(testing::rel_l2(got, dstudent), grad_tolerance(dtype)) << "dstudent " << what;
      testing::expect_same_nonfinite(got, dstudent, "dstudent");
      EXPECT_TRUE(gdstudent.guards_intact()) << what;
      testing::expect_zero_outside_real(got, targets, v, c.vocab_size, "dstudent", what);
      // In place: the gradient overwrites the student logits.
      ops::kd_loss_backward(gstudent, gstudent, gteacher, glse, glosses, gtargets, c.vocab_size,
                            c.temperature, reverse, dloss);
      got = gstudent.download();
      EXPECT_LE(testing::rel_l2(got, dstudent), grad_tolerance(dtype)) << "in place " << what;
      EXPECT_TRUE(gstudent.guards_intact()) << what;
    }
  }
}

// Student == teacher on the GPU too: exactly zero loss and gradient.
TEST_P(KdLossGpu, ZeroWhenStudentEqualsTeacher) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(44);
  const int64_t n = 4, v = 50304;
  const int vocab = 50257;
  const auto logits = testing::round_to(dtype, testing::random_vector(n * v, rng, 2.0f));
  DeviceTensor gs(dtype, {n, v}), gt(dtype, {n, v}), gtargets(DType::i32, {n});
  DeviceTensor glosses(DType::f32, {n}), glse(DType::f32, {2, n});
  gs.upload(logits);
  gt.upload(logits);
  gtargets.upload_i32({0, 1, 2, 3});
  settle();
  for (bool reverse : {false, true}) {
    ops::kd_loss_forward(glosses, glse, gs, gt, gtargets, vocab, 2.0f, reverse);
    for (float loss : glosses.download()) EXPECT_EQ(loss, 0.0f);
    DeviceTensor gd(dtype, {n, v});
    ops::kd_loss_backward(gd, gs, gt, glse, glosses, gtargets, vocab, 2.0f, reverse, 1.0f);
    const auto grad = gd.download();
    EXPECT_EQ(*std::max_element(grad.begin(), grad.end()), 0.0f);
    EXPECT_EQ(*std::min_element(grad.begin(), grad.end()), 0.0f);
  }
}

// Views one element into their buffers: every row starts off the 16-byte grid. Student and
// teacher shifted alike take the packed path; shifted differently, the scalar one.
TEST_P(KdLossGpu, MisalignedViewsMatchCpu) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(42);
  const int64_t n = 6, v = 4096;
  const int vocab = 4000;
  for (bool reverse : {false, true}) {
    for (int64_t teacher_offset : {0, 1}) {
      const std::string what = std::string(dtype_name(dtype)) + (reverse ? " reverse" : "") +
                               " teacher offset " + std::to_string(teacher_offset);
      auto all_s = testing::round_to(dtype, testing::random_vector(n * v + 1, rng, 2.0f));
      auto all_t = testing::round_to(dtype, testing::random_vector(n * v + 1, rng, 2.0f));
      std::vector<float> student(all_s.begin() + 1, all_s.end());
      std::vector<float> teacher(all_t.begin() + teacher_offset,
                                 all_t.begin() + teacher_offset + n * v);
      std::vector<int32_t> targets = {0, 3999, -1, 17, 2048, 5};
      std::vector<float> losses(n), lse(2 * n), dstudent(n * v);
      cpu::kd_loss_forward(host(losses, {n}), host(lse, {2, n}), host(student, {n, v}),
                           host(teacher, {n, v}), host_i32(targets, {n}), vocab, 1.5f, reverse);
      cpu::kd_loss_backward(host(dstudent, {n, v}), host(student, {n, v}), host(teacher, {n, v}),
                            host(lse, {2, n}), host(losses, {n}), host_i32(targets, {n}), vocab,
                            1.5f, reverse, 0.5f);
      DeviceTensor bs(dtype, {n * v + 1}), bt(dtype, {n * v + 1}), gtargets(DType::i32, {n});
      DeviceTensor glosses(DType::f32, {n}), glse(DType::f32, {2, n});
      bs.upload(all_s);
      bt.upload(all_t);
      gtargets.upload_i32(targets);
      settle();
      const size_t elem = dtype_size(dtype);
      const Tensor vs(static_cast<char*>(bs.t().data) + elem, dtype, Device::cuda, Shape{n, v});
      const Tensor vt(static_cast<char*>(bt.t().data) + teacher_offset * elem, dtype, Device::cuda,
                      Shape{n, v});
      ops::kd_loss_forward(glosses, glse, vs, vt, gtargets, vocab, 1.5f, reverse);
      EXPECT_LE(testing::rel_l2(glosses.download(), losses), kLossTolerance) << what;
      EXPECT_LE(testing::rel_l2(glse.download(), lse), kLossTolerance) << what;
      ops::kd_loss_backward(vs, vs, vt, glse, glosses, gtargets, vocab, 1.5f, reverse, 0.5f);
      const auto got = bs.download();
      EXPECT_EQ(std::bit_cast<uint32_t>(got[0]), std::bit_cast<uint32_t>(all_s[0])) << what;
      EXPECT_LE(testing::rel_l2(std::vector<float>(got.begin() + 1, got.end()), dstudent),
                grad_tolerance(dtype))
          << what;
      EXPECT_TRUE(bs.guards_intact() && bt.guards_intact()) << what;
    }
  }
}

// The shard pieces one by one against the CPU's, from the same inputs; then the whole protocol
// (max, all-reduce on the host, sums, all-reduce, finish, backward per shard) over tp column
// shards of one (N, V) tensor against the unsharded CPU op. The last split's last shard holds
// padding only.
TS_GPU_PARITY_TEST_P(KdLossGpu, ShardProtocolMatchesUnshardedCpu, "kd_shard_max", "kd_shard_sums",
                     "kd_shard_finish", "kd_loss_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(72);
  struct Split {
    int64_t rows, width;  // N, Vl
    int tp, vocab_size;
    float temperature;
  };
  for (bool reverse : {false, true}) {
    for (const Split& s : {Split{5, 1031, 3, 3000, 1.0f}, Split{6, 12576, 4, 50257, 2.0f},
                           Split{3, 5, 4, 11, 0.5f}, Split{1, 7, 3, 13, 1.0f}}) {
      const int64_t n = s.rows, v = s.width, full_v = s.tp * s.width;
      const float temp = s.temperature;
      const std::string what = std::string(dtype_name(dtype)) + (reverse ? " reverse" : "") +
                               " tp=" + std::to_string(s.tp) + " Vl=" + std::to_string(v);
      const auto student = testing::round_to(dtype, testing::random_vector(n * full_v, rng, 2.0f));
      const auto teacher = testing::round_to(dtype, testing::random_vector(n * full_v, rng, 2.0f));
      std::vector<int32_t> targets(n);
      for (int64_t i = 0; i < n; ++i) targets[i] = i == 1 ? -1 : 0;
      std::vector<float> losses(n), lse(2 * n), dstudent(n * full_v);
      std::vector<float> s_copy = student, t_copy = teacher;
      cpu::kd_loss_forward(host(losses, {n}), host(lse, {2, n}), host(s_copy, {n, full_v}),
                           host(t_copy, {n, full_v}), host_i32(targets, {n}), s.vocab_size, temp,
                           reverse);
      cpu::kd_loss_backward(host(dstudent, {n, full_v}), host(s_copy, {n, full_v}),
                            host(t_copy, {n, full_v}), host(lse, {2, n}), host(losses, {n}),
                            host_i32(targets, {n}), s.vocab_size, temp, reverse, 0.5f);

      std::vector<std::unique_ptr<DeviceTensor>> gs, gt;
      std::vector<std::vector<float>> hs, ht;
      for (int r = 0; r < s.tp; ++r) {
        std::vector<float> ps = testing::columns_of(student, n, full_v, r * v, v);
        std::vector<float> pt = testing::columns_of(teacher, n, full_v, r * v, v);
        gs.push_back(std::make_unique<DeviceTensor>(dtype, Shape{n, v}));
        gt.push_back(std::make_unique<DeviceTensor>(dtype, Shape{n, v}));
        gs.back()->upload(ps);
        gt.back()->upload(pt);
        hs.push_back(std::move(ps));
        ht.push_back(std::move(pt));
      }
      DeviceTensor gtargets(DType::i32, {n}), gmax(DType::f32, {2, n}), gsums(DType::f32, {3, n});
      DeviceTensor glosses(DType::f32, {n}), glse(DType::f32, {2, n});
      gtargets.upload_i32(targets);
      settle();
      std::vector<float> row_max(2 * n, -INFINITY), sums(3 * n, 0.0f);
      for (int r = 0; r < s.tp; ++r) {
        ops::kd_shard_max(gmax, *gs[r], *gt[r], r * v, s.vocab_size, temp);
        const auto part = gmax.download();
        std::vector<float> want(2 * n);
        cpu::kd_shard_max(host(want, {2, n}), host(hs[r], {n, v}), host(ht[r], {n, v}), r * v,
                          s.vocab_size, temp);
        EXPECT_LE(testing::rel_l2(part, want), 1e-6) << "row_max rank " << r << " " << what;
        testing::expect_same_nonfinite(part, want, "row_max");
        for (int64_t i = 0; i < 2 * n; ++i) row_max[i] = std::max(row_max[i], part[i]);
      }
      gmax.upload(row_max);
      settle();
      for (int r = 0; r < s.tp; ++r) {
        ops::kd_shard_sums(gsums, *gs[r], *gt[r], gmax, r * v, s.vocab_size, temp, reverse);
        const auto part = gsums.download();
        std::vector<float> want(3 * n);
        cpu::kd_shard_sums(host(want, {3, n}), host(hs[r], {n, v}), host(ht[r], {n, v}),
                           host(row_max, {2, n}), r * v, s.vocab_size, temp, reverse);
        // The cross term may be near 0 on a shard; judge it against the sums' scale.
        double err = 0.0, norm = 0.0;
        for (int64_t i = 0; i < 3 * n; ++i) {
          err = std::max(err, std::fabs(double(part[i]) - want[i]));
          norm = std::max(norm, std::fabs(double(want[i])));
        }
        EXPECT_LE(err, 1e-5 * std::max(norm, 1.0)) << "sums rank " << r << " " << what;
        for (int64_t i = 0; i < 3 * n; ++i) sums[i] += part[i];
      }
      gsums.upload(sums);
      settle();
      ops::kd_shard_finish(glosses, glse, gmax, gsums, gtargets, temp, reverse);
      const auto got_losses = glosses.download(), got_lse = glse.download();
      EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
      EXPECT_LE(testing::rel_l2(got_lse, lse), kLossTolerance) << "lse " << what;
      testing::expect_ignored_rows_zero(got_losses, targets, what);
      EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact() && gmax.guards_intact() &&
                  gsums.guards_intact())
          << what;

      for (int r = 0; r < s.tp; ++r) {
        ops::kd_loss_backward(*gs[r], *gs[r], *gt[r], glse, glosses, gtargets, s.vocab_size, temp,
                              reverse, 0.5f, r * v);
        const auto got = gs[r]->download();
        const std::vector<float> want = testing::columns_of(dstudent, n, full_v, r * v, v);
        if (r * v >= s.vocab_size) {  // padding only: exact zeros
          for (float g : got) EXPECT_EQ(g, 0.0f) << "rank " << r << " " << what;
        } else {
          EXPECT_LE(testing::rel_l2(got, want), grad_tolerance(dtype))
              << "rank " << r << " " << what;
        }
        EXPECT_TRUE(gs[r]->guards_intact()) << what;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KdLossGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::gpu_kd
