// Tests of sparse (top-K) knowledge distillation (kernels/cpu/kd_sparse.cpp,
// kernels/cuda/kd_sparse.cu). CPU: the definitions written here in double, finite differences
// (forward and reverse KL, T = 0.5, 1, 4, K = 1, small, V - 1, V, padding, ignored rows, arbitrary
// ids, N = 1 with V = 1025), K = V against the dense kd ops, the floored tail, tp = 1..4 shards,
// bf16/f16, bounds, threads, errors. GPU parity: f32, bf16, f16 against the CPU, unsharded,
// misaligned, in place, the shard protocol. Shape letters: N rows, V padded width, Vl shard width,
// K teacher entries per row; T temperature.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
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

// ---- the teacher's cache and the inputs ---------------------------------------------------------

using shard_cases::kInf;
constexpr double kStudentPad = 40.0;  // would dominate the softmax if padding leaked into it
constexpr float kTemperatures[] = {0.5f, 1.0f, 4.0f};
// log(2^-126), the floor of log qs_tail (kernels/ops.h).
constexpr double kLogTailFloor = -87.33654475055310898657;

std::string mode(bool reverse, float temperature) {
  return std::string(reverse ? "reverse" : "forward") + " T=" + std::to_string(temperature);
}

// log sum_j exp(x[n, j] / T) over the real columns j < vocab with take(j), in double.
template <class Take>
double lse_over(const HostTensor& x, int64_t n, int vocab, double temperature, Take&& take) {
  const int64_t width = x.t.dim(1);
  double m = -kInf;
  for (int j = 0; j < vocab; ++j)
    if (take(j)) m = std::max(m, x.get(n * width + j) / temperature);
  double sum = 0.0;
  for (int j = 0; j < vocab; ++j)
    if (take(j)) sum += std::exp(x.get(n * width + j) / temperature - m);
  return m + std::log(sum);
}

// The teacher cache of a (N, V) logits matrix over its first vocab columns at temperature T,
// written here: the K largest (ties to the lower id) or, with random_ids, K distinct random
// columns, their values (dtype), ids, and lse (2, N) over all real columns and over the others.
struct Cache {
  HostTensor values, ids, lse;  // (N, K), (N, K) i32, (2, N)
};
Cache make_cache(const HostTensor& teacher, int vocab, int64_t k, double temperature, DType dtype,
                 std::mt19937_64& rng, bool random_ids = false) {
  const int64_t rows = teacher.t.dim(0), width = teacher.t.dim(1);
  Cache c{HostTensor(dtype, {rows, k}), HostTensor(DType::i32, {rows, k}),
          HostTensor(dtype, {2, rows})};
  for (int64_t n = 0; n < rows; ++n) {
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    if (random_ids) {
      std::shuffle(order.begin(), order.end(), rng);
    } else {
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return teacher.get(n * width + a) > teacher.get(n * width + b);
      });
    }
    std::vector<char> chosen(vocab, 0);
    for (int64_t i = 0; i < k; ++i) {
      chosen[order[i]] = 1;
      c.ids.set(n * k + i, order[i]);
      c.values.set(n * k + i, teacher.get(n * width + order[i]));
    }
    c.lse.set(n, lse_over(teacher, n, vocab, temperature, [](int) { return true; }));
    c.lse.set(rows + n, k == vocab ? -kInf : lse_over(teacher, n, vocab, temperature, [&](int j) {
                return !chosen[j];
              }));
  }
  return c;
}

// Student (N, V) with padding set, a teacher (N, V), targets with row kIgnoredRow ignored, and
// the teacher's cache of K entries at temperature T.
struct SparseInputs {
  HostTensor student, teacher, targets;
  Cache cache;
  int vocab;
  int64_t k;
  SparseInputs(DType dtype, std::mt19937_64& rng, int64_t rows, int64_t width, int vocab_size,
               int64_t num_k, double temperature, bool random_ids = false, double stddev = 2.0)
      : student(randn(dtype, {rows, width}, rng, stddev)),
        teacher(randn(dtype, {rows, width}, rng, stddev)),
        targets(randint({rows}, 0, vocab_size, rng)),
        cache(make_cache(teacher, vocab_size, num_k, temperature, dtype, rng, random_ids)),
        vocab(vocab_size),
        k(num_k) {
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t c = vocab_size; c < width; ++c) student.set(n * width + c, kStudentPad);
    if (rows > kIgnoredRow) targets.set(kIgnoredRow, -1);
  }
  int64_t rows() const { return student.t.dim(0); }
  int64_t width() const { return student.t.dim(1); }
};

struct SparseOutputs {
  HostTensor losses, stats;  // (N), (3, N)
  SparseOutputs(DType dtype, int64_t rows) : losses(dtype, {rows}), stats(dtype, {3, rows}) {}
  void forward(const SparseInputs& in, float temperature, bool reverse) {
    cpu::kd_sparse_forward(losses, stats, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                           in.targets, in.vocab, temperature, reverse);
  }
};

HostTensor backward(const SparseInputs& in, const SparseOutputs& out, float temperature,
                    bool reverse, float dloss) {
  HostTensor d = filled(in.student.t.dtype, in.student.t.shape, kNaN);  // must be overwritten
  cpu::kd_sparse_backward(d, in.student, in.cache.values, in.cache.ids, in.cache.lse, out.stats,
                          out.losses, in.targets, in.vocab, temperature, reverse, dloss);
  return d;
}

// Loss, statistics and gradient of row n from the definitions of kernels/ops.h, written out: the
// student's log-softmax, its tail mass summed over the tail columns, the K + 1 bucket KL, and its
// gradient d/dzs (times T^2 / T). No floor: the cases here keep the tail well above it.
struct Direct {
  double loss, lse_s, log_qs_tail, kl;
  std::vector<double> grad;  // (vocab)
};
Direct direct_sparse(const SparseInputs& in, int64_t n, double temperature, bool reverse) {
  const int64_t width = in.width(), rows = in.rows(), k = in.k;
  Direct d;
  d.lse_s = lse_over(in.student, n, in.vocab, temperature, [](int) { return true; });
  std::vector<double> log_q(in.vocab);
  for (int j = 0; j < in.vocab; ++j)
    log_q[j] = in.student.get(n * width + j) / temperature - d.lse_s;
  std::vector<int64_t> bucket(in.vocab, -1);  // the id's index, -1 for the tail
  for (int64_t i = 0; i < k; ++i) bucket[int(in.cache.ids.get(n * k + i))] = i;
  const double lse_t = in.cache.lse.get(n), tail_lse_t = in.cache.lse.get(rows + n);
  const bool has_tail = k < in.vocab;
  double q_tail = 0.0;
  for (int j = 0; j < in.vocab; ++j)
    if (bucket[j] < 0) q_tail += std::exp(log_q[j]);
  d.log_qs_tail = has_tail ? std::log(q_tail) : -kInf;
  const double log_pt_tail = tail_lse_t - lse_t;
  auto log_p_of = [&](int64_t i) { return in.cache.values.get(n * k + i) / temperature - lse_t; };
  double kl = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double lq = log_q[int(in.cache.ids.get(n * k + i))], lp = log_p_of(i);
    kl += reverse ? std::exp(lq) * (lq - lp) : std::exp(lp) * (lp - lq);
  }
  if (has_tail)
    kl += reverse ? q_tail * (d.log_qs_tail - log_pt_tail)
                  : std::exp(log_pt_tail) * (log_pt_tail - d.log_qs_tail);
  d.kl = kl;
  d.loss = temperature * temperature * kl;
  d.grad.resize(in.vocab);
  for (int j = 0; j < in.vocab; ++j) {
    const double q = std::exp(log_q[j]);
    if (bucket[j] >= 0) {
      const double lp = log_p_of(bucket[j]);
      d.grad[j] = temperature * (reverse ? q * (log_q[j] - lp - kl) : q - std::exp(lp));
    } else {
      d.grad[j] = temperature * (reverse ? q * (d.log_qs_tail - log_pt_tail - kl)
                                         : q * (1.0 - std::exp(log_pt_tail) / q_tail));
    }
  }
  return d;
}

// The K of the cases for a vocabulary: 1, a few, vocab - 1 (a tail of one column), vocab (none).
std::vector<int64_t> k_cases(int vocab) {
  std::vector<int64_t> ks = {1, std::min<int64_t>(4, vocab), vocab - 1, vocab};
  ks.erase(std::remove(ks.begin(), ks.end(), 0), ks.end());
  std::sort(ks.begin(), ks.end());
  ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
  return ks;
}

// ---- CPU reference ----------------------------------------------------------------------------

TEST(KdSparse, MatchesDirectFormula) {
  for (bool reverse : {false, true}) {
    for (float temperature : kTemperatures) {
      for (int64_t k : k_cases(kVocabSize)) {
        for (bool random_ids : {false, true}) {
          SCOPED_TRACE(mode(reverse, temperature) + " K=" + std::to_string(k) +
                       (random_ids ? " random ids" : " top ids"));
          std::mt19937_64 rng(131);
          const SparseInputs in(DType::f64, rng, kRows, kWidth, kVocabSize, k, temperature,
                                random_ids);
          SparseOutputs out(DType::f64, kRows);
          out.forward(in, temperature, reverse);
          const float dloss = 0.75f;
          const HostTensor dstudent = backward(in, out, temperature, reverse, dloss);
          for (int64_t n = 0; n < kRows; ++n) {
            const Direct d = direct_sparse(in, n, temperature, reverse);
            // Sums of O(10) terms in double: ~1e-14, scaled by T^2 <= 16.
            EXPECT_NEAR(out.stats.get(n), d.lse_s, 1e-13) << "row " << n;
            if (k == kVocabSize) {
              EXPECT_EQ(out.stats.get(kRows + n), -kInf) << "row " << n;
            } else {
              EXPECT_NEAR(out.stats.get(kRows + n), d.log_qs_tail, 1e-12) << "row " << n;
            }
            EXPECT_NEAR(out.stats.get(2 * kRows + n), d.kl, 1e-13) << "row " << n;
            EXPECT_NEAR(out.losses.get(n), n == kIgnoredRow ? 0.0 : d.loss, 1e-12) << "row " << n;
            for (int c = 0; c < kVocabSize; ++c) {
              const double want = n == kIgnoredRow ? 0.0 : dloss * d.grad[c];
              EXPECT_NEAR(dstudent.get(n * kWidth + c), want, 1e-13) << n << ", " << c;
            }
          }
        }
      }
    }
  }
}

// Every element, padding and the ignored row included (there the difference is exactly 0, so a
// nonzero analytic value fails with relative error 1). Budget as kd_loss_test.cpp's: h = 1e-5,
// truncation ~h^2 |L'''| ~ 1e-10 / T, rounding ~1e-16 |L| / h ~ 1e-10, floored at 1e-3.
void expect_fd_matches(SparseInputs& in, float temperature, bool reverse, const std::string& what) {
  SparseOutputs out(DType::f64, in.rows());
  const float dloss = 0.7f;
  out.forward(in, temperature, reverse);
  const HostTensor dstudent = backward(in, out, temperature, reverse, dloss);
  SparseOutputs probe(DType::f64, in.rows());
  auto loss = [&] {
    probe.forward(in, temperature, reverse);
    return weighted_total(probe.losses, dloss);
  };
  expect_grad_matches(in.student, dstudent, loss, 1e-5, what.c_str(), 1e-5, 1 << 20, 1e-3);
  for (int64_t n = 0; n < in.rows(); ++n)
    for (int64_t c = 0; c < in.width(); ++c)
      if (in.targets.get(n) < 0 || c >= in.vocab) {
        EXPECT_EQ(dstudent.get(n * in.width() + c), 0.0) << what << " " << n << ", " << c;
      }
}

TS_FD_TEST(KdSparse, BackwardMatchesFiniteDifferences, "kd_sparse_forward", "kd_sparse_backward") {
  for (bool reverse : {false, true}) {
    for (float temperature : kTemperatures) {
      for (int64_t k : k_cases(kVocabSize)) {
        for (bool random_ids : {false, true}) {
          const std::string what = mode(reverse, temperature) + " K=" + std::to_string(k) +
                                   (random_ids ? " random ids" : " top ids");
          SCOPED_TRACE(what);
          std::mt19937_64 rng(132);
          SparseInputs in(DType::f64, rng, kRows, kWidth, kVocabSize, k, temperature, random_ids);
          expect_fd_matches(in, temperature, reverse, what);
        }
      }
    }
  }
  // Awkward: one row of V = 1025 (1000 real), K = 7.
  for (bool reverse : {false, true}) {
    std::mt19937_64 rng(133);
    SparseInputs in(DType::f64, rng, 1, 1025, 1000, 7, 1.5, false, 3.0);
    expect_fd_matches(in, 1.5f, reverse, std::string("N=1 V=1025 K=7 ") + mode(reverse, 1.5f));
  }
}

// With K = vocab_size the tail is empty and the K buckets are the whole vocabulary: the dense op
// on the full teacher logits. f64: only the summation order differs (~1e-15 of O(10) terms).
// f32: the dense op keeps lse_t in double, while teacher_lse arrives rounded to f32 (2^-24 |lse_t|
// <= 6e-7 at |lse_t| <= 10), which shifts the loss by ~T^2 delta (KL + 1) <= 2e-6 for T <= 2
// (relative, floored at 1) and the gradient T (ps - pt) by T pt delta.
TEST(KdSparse, FullTopKEqualsDenseKd) {
  for (DType dtype : {DType::f32, DType::f64}) {
    const double tol = dtype == DType::f64 ? 1e-12 : 2e-6;
    for (bool reverse : {false, true}) {
      for (float temperature : {0.5f, 1.0f, 2.0f}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + mode(reverse, temperature));
        std::mt19937_64 rng(134);
        const SparseInputs in(dtype, rng, kRows, kWidth, kVocabSize, kVocabSize, temperature);
        SparseOutputs out(dtype, kRows);
        out.forward(in, temperature, reverse);
        HostTensor losses(dtype, {kRows}), lse(dtype, {2, kRows});
        cpu::kd_loss_forward(losses, lse, in.student, in.teacher, in.targets, kVocabSize,
                             temperature, reverse);
        EXPECT_LE(shard_cases::max_floored_rel_error(out.losses, losses), tol);
        for (int64_t n = 0; n < kRows; ++n) {
          EXPECT_NEAR(out.stats.get(n), lse.get(n), tol * std::max(1.0, std::fabs(lse.get(n))));
          EXPECT_EQ(out.stats.get(kRows + n), -kInf);
        }
        const float dloss = 0.6f;
        const HostTensor got = backward(in, out, temperature, reverse, dloss);
        HostTensor want(dtype, in.student.t.shape);
        cpu::kd_loss_backward(want, in.student, in.teacher, lse, losses, in.targets, kVocabSize,
                              temperature, reverse, dloss);
        EXPECT_LE(max_abs_diff(got, want), dtype == DType::f64 ? 1e-13 : 2e-6);
      }
    }
  }
}

// The cache as topk_logits builds it (kernels/cpu/topk_logits.cpp) gives the same loss as the
// cache written here.
TEST(KdSparse, CacheFromTopkLogitsGivesTheSameLoss) {
  for (bool reverse : {false, true}) {
    for (int64_t k : k_cases(kVocabSize)) {
      std::mt19937_64 rng(135);
      const float temperature = 1.7f;
      const SparseInputs in(DType::f64, rng, kRows, kWidth, kVocabSize, k, temperature);
      SparseInputs from_op = in;
      const float temps[] = {2.0f, temperature};
      HostTensor lse2(DType::f64, {2, 2, kRows});
      cpu::topk_logits(from_op.cache.values, from_op.cache.ids, lse2, in.teacher, kVocabSize,
                       temps);
      for (int64_t i = 0; i < 2 * kRows; ++i) from_op.cache.lse.set(i, lse2.get(2 * kRows + i));
      expect_identical(from_op.cache.ids, in.cache.ids, "ids");
      SparseOutputs want(DType::f64, kRows), got(DType::f64, kRows);
      want.forward(in, temperature, reverse);
      got.forward(from_op, temperature, reverse);
      EXPECT_LE(max_abs_diff(got.losses, want.losses), 1e-12) << mode(reverse, temperature);
    }
  }
}

// A student whose tail lies 200 / T below its ids: its tail mass (e^-200) is below the floor, so
// log qs_tail reads as log(2^-126), and loss and gradient stay finite (f64 and f32 alike).
TEST(KdSparse, UnderflowingTailIsFlooredWithoutNaN) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + (reverse ? " reverse" : " forward"));
      std::mt19937_64 rng(136);
      SparseInputs in(dtype, rng, kRows, kWidth, kVocabSize, 3, 1.0);
      for (int64_t n = 0; n < kRows; ++n) {
        for (int c = 0; c < kVocabSize; ++c) in.student.set(n * kWidth + c, -200.0);
        for (int64_t i = 0; i < 3; ++i)
          in.student.set(n * kWidth + int64_t(in.cache.ids.get(n * 3 + i)), double(i));
      }
      SparseOutputs out(dtype, kRows);
      out.forward(in, 1.0f, reverse);
      const HostTensor d = backward(in, out, 1.0f, reverse, 1.0f);
      for (int64_t n = 0; n < kRows; ++n) {
        EXPECT_NEAR(out.stats.get(kRows + n), kLogTailFloor, 1e-5) << n;
        EXPECT_TRUE(std::isfinite(out.losses.get(n))) << n;
        if (n != kIgnoredRow) {
          EXPECT_GT(out.losses.get(n), 0.0) << n;
        }
      }
      for (int64_t i = 0; i < d.size(); ++i) ASSERT_TRUE(std::isfinite(d.get(i))) << i;
    }
  }
}

TEST(KdSparse, InPlaceBackwardMatchesOutOfPlace) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      std::mt19937_64 rng(137);
      const SparseInputs in(dtype, rng, kRows, kWidth, kVocabSize, 4, 2.0);
      SparseOutputs out(dtype, kRows);
      out.forward(in, 2.0f, reverse);
      const HostTensor d = backward(in, out, 2.0f, reverse, 1.5f);
      HostTensor in_place = in.student;
      cpu::kd_sparse_backward(in_place, in_place, in.cache.values, in.cache.ids, in.cache.lse,
                              out.stats, out.losses, in.targets, kVocabSize, 2.0f, reverse, 1.5f);
      expect_identical_no_nan(in_place, d, std::string(dtype_name(dtype)));
    }
  }
}

TEST(KdSparse, F32MatchesF64) {
  for (bool reverse : {false, true}) {
    std::mt19937_64 rng(138);
    const SparseInputs in32(DType::f32, rng, kRows, kWidth, kVocabSize, 4, 1.5);
    SparseInputs in64 = in32;  // identical input values
    in64.student = to_dtype(in32.student, DType::f64);
    in64.cache.values = to_dtype(in32.cache.values, DType::f64);
    in64.cache.lse = to_dtype(in32.cache.lse, DType::f64);
    SparseOutputs out32(DType::f32, kRows), out64(DType::f64, kRows);
    out32.forward(in32, 1.5f, reverse);
    out64.forward(in64, 1.5f, reverse);
    // Double arithmetic in both; f32 adds one rounding of values up to ~20 (2e-6 absolute).
    EXPECT_LE(max_abs_diff(out32.losses, out64.losses), 4e-6);
    EXPECT_LE(max_abs_diff(out32.stats, out64.stats), 4e-6);
    const HostTensor d32 = backward(in32, out32, 1.5f, reverse, 1.0f);
    const HostTensor d64 = backward(in64, out64, 1.5f, reverse, 1.0f);
    EXPECT_LE(max_abs_diff(d32, d64), 4e-6);
  }
}

TEST(KdSparse, RejectsBadArguments) {
  std::mt19937_64 rng(139);
  const SparseInputs in(DType::f64, rng, kRows, kWidth, kVocabSize, 4, 1.0);
  SparseOutputs out(DType::f64, kRows);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float bad_t : {0.0f, -1.0f, nan, std::numeric_limits<float>::infinity()})
    EXPECT_THROW(out.forward(in, bad_t, false), Error) << bad_t;
  auto forward_with = [&](const SparseInputs& x, int vocab) {
    cpu::kd_sparse_forward(out.losses, out.stats, x.student, x.cache.values, x.cache.ids,
                           x.cache.lse, x.targets, vocab, 1.0f, false);
  };
  EXPECT_THROW(forward_with(in, kWidth + 1), Error);  // vocab_size > V
  EXPECT_THROW(forward_with(in, 0), Error);
  EXPECT_THROW(forward_with(in, 3), Error);  // K = 4 > vocab_size; ids beyond it
  SparseInputs dup = in;                     // an id twice in row 2
  dup.cache.ids.set(2 * 4 + 1, dup.cache.ids.get(2 * 4));
  EXPECT_THROW(forward_with(dup, kVocabSize), Error);
  SparseInputs outside = in;  // an id in the padding
  outside.cache.ids.set(5, kVocabSize);
  EXPECT_THROW(forward_with(outside, kVocabSize), Error);
  SparseInputs negative = in;
  negative.cache.ids.set(0, -1);
  EXPECT_THROW(forward_with(negative, kVocabSize), Error);
  SparseInputs short_ids = in;  // ids (N, K - 1) beside values (N, K)
  short_ids.cache.ids = HostTensor(DType::i32, {kRows, 3});
  EXPECT_THROW(forward_with(short_ids, kVocabSize), Error);
  SparseInputs flat_lse = in;  // teacher_lse (2N)
  flat_lse.cache.lse = HostTensor(DType::f64, {2 * kRows});
  EXPECT_THROW(forward_with(flat_lse, kVocabSize), Error);
  const SparseInputs in32(DType::f32, rng, kRows, kWidth, kVocabSize, 4, 1.0);
  EXPECT_THROW(out.forward(in32, 1.0f, false), Error);  // f64 statistics beside f32 logits
  SparseInputs f64_values = in32;                       // f64 teacher values beside f32 logits
  f64_values.cache.values = to_dtype(in32.cache.values, DType::f64);
  SparseOutputs out32(DType::f32, kRows);
  EXPECT_THROW(out32.forward(f64_values, 1.0f, false), Error);
  // Aliasing: losses and stats views into one buffer; dstudent overlapping stats.
  HostTensor buffer(DType::f64, {kRows * kWidth + 4 * kRows});
  const Tensor losses_view(buffer.f64.data(), DType::f64, Device::cpu, Shape{kRows});
  const Tensor stats_view(buffer.f64.data() + 1, DType::f64, Device::cpu, Shape{3, kRows});
  EXPECT_THROW(
      cpu::kd_sparse_forward(losses_view, stats_view, in.student, in.cache.values, in.cache.ids,
                             in.cache.lse, in.targets, kVocabSize, 1.0f, false),
      Error);
  out.forward(in, 1.0f, false);
  const Tensor d_view(buffer.f64.data(), DType::f64, Device::cpu, Shape{kRows, kWidth});
  const Tensor stats_after(buffer.f64.data() + kRows * kWidth - 1, DType::f64, Device::cpu,
                           Shape{3, kRows});
  EXPECT_THROW(
      cpu::kd_sparse_backward(d_view, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                              stats_after, out.losses, in.targets, kVocabSize, 1.0f, false, 1.0f),
      Error);
  HostTensor d(DType::f64, in.student.t.shape);
  EXPECT_THROW(
      cpu::kd_sparse_backward(d, in.student, in.cache.values, in.cache.ids, in.cache.lse, out.stats,
                              out.losses, in.targets, kVocabSize, 1.0f, false, 1.0f, -2),
      Error);  // negative vocab_start
}

}  // namespace

// ---- CPU reference, vocabulary-parallel pieces -------------------------------------------------

// ShardCase, kCases, slice_columns: tests/kernels/vocab_shard_cases.h.
namespace shard_cases {
namespace {

SparseInputs make_inputs(DType dtype, const ShardCase& c, int64_t k, double temperature,
                         std::mt19937_64& rng) {
  SparseInputs in(dtype, rng, c.rows, c.width(), c.vocab_size, k, temperature);
  if (c.rows > 1) in.targets.set(1, -1);
  return in;
}

struct Stats {
  HostTensor row_max, sums, losses, stats;  // (N), (2 + K, N), (N), (3, N)
  Stats(DType dtype, int64_t rows, int64_t k)
      : row_max(dtype, {rows}),
        sums(dtype, {2 + k, rows}),
        losses(dtype, {rows}),
        stats(dtype, {3, rows}) {}
};

// The tp-rank protocol in one process: shard max on every rank, all-reduce(max), shard sums with
// the global max, all-reduce(sum) (in the statistics' dtype, rank order), then finish.
Stats sharded_forward(const SparseInputs& in, const ShardCase& c, DType stat_dtype,
                      float temperature, bool reverse) {
  Stats s(stat_dtype, c.rows, in.k);
  std::vector<HostTensor> students;
  for (int r = 0; r < c.tp; ++r)
    students.push_back(slice_columns(in.student, c.start(r), c.shard_width));
  for (int64_t i = 0; i < c.rows; ++i) s.row_max.set(i, -kInf);
  for (int r = 0; r < c.tp; ++r) {
    HostTensor part(stat_dtype, {c.rows});
    cpu::kd_sparse_shard_max(part, students[r], c.start(r), c.vocab_size, temperature);
    for (int64_t i = 0; i < c.rows; ++i) s.row_max.set(i, std::max(s.row_max.get(i), part.get(i)));
  }
  for (int r = 0; r < c.tp; ++r) {
    HostTensor part(stat_dtype, {2 + in.k, c.rows});
    cpu::kd_sparse_shard_sums(part, students[r], in.cache.ids, s.row_max, c.start(r), c.vocab_size,
                              temperature);
    for (int64_t i = 0; i < part.size(); ++i) s.sums.set(i, s.sums.get(i) + part.get(i));
  }
  cpu::kd_sparse_shard_finish(s.losses, s.stats, s.row_max, s.sums, in.cache.values, in.cache.lse,
                              in.targets, temperature, reverse);
  return s;
}

// The largest |got - want| / max(1, |want|), equal infinities (an empty tail's -inf) agreeing.
double max_error(const HostTensor& got, const HostTensor& want) {
  double worst = 0.0;
  for (int64_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want.get(i)) && got.get(i) == want.get(i)) continue;
    const double err = std::fabs(got.get(i) - want.get(i)) / std::max(1.0, std::fabs(want.get(i)));
    worst = std::max(worst, std::isnan(err) ? kInf : err);
  }
  return worst;
}

// f64: only the summation order of the sums differs (~1e-16 relative, ~1e-14 after the KL's
// subtraction of O(10) terms and T^2 <= 4). f32: the sums are rounded to f32 on each rank and
// again by the all-reduce (2^-24 relative each), moving lse_s, log qs_tail and the KL's terms by
// ~1e-7 of their O(10) size, times T^2 = 4: ~1e-5, floored at 1 (as kd_loss_test.cpp).
double forward_tolerance(DType dtype) { return dtype == DType::f64 ? 1e-12 : 2e-5; }

TEST(KdSparseShard, CombinedShardsMatchUnshardedForward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      for (float temperature : {0.5f, 2.0f}) {
        std::mt19937_64 rng(161);
        for (const ShardCase& c : kCases) {
          for (int64_t k : k_cases(c.vocab_size)) {
            SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + mode(reverse, temperature) + " " +
                         c.str() + " K=" + std::to_string(k));
            const SparseInputs in = make_inputs(dtype, c, k, temperature, rng);
            SparseOutputs want(dtype, c.rows);
            want.forward(in, temperature, reverse);
            const Stats s = sharded_forward(in, c, dtype, temperature, reverse);
            EXPECT_LE(max_error(s.losses, want.losses), forward_tolerance(dtype));
            EXPECT_LE(max_error(s.stats, want.stats), forward_tolerance(dtype));
            if (c.rows > 1) {
              EXPECT_EQ(s.losses.get(1), 0.0) << "ignored row";
            }
          }
        }
      }
    }
  }
}

// Each shard's backward, given the unsharded stats and losses, performs the same arithmetic per
// element as the unsharded backward on its columns: the slices match bit for bit, in place too.
TEST(KdSparseShard, BackwardSlicesMatchUnshardedBackward) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool reverse : {false, true}) {
      std::mt19937_64 rng(162);
      for (const ShardCase& c : kCases) {
        for (int64_t k : k_cases(c.vocab_size)) {
          SCOPED_TRACE(std::string(dtype_name(dtype)) + (reverse ? " reverse " : " forward ") +
                       c.str() + " K=" + std::to_string(k));
          const SparseInputs in = make_inputs(dtype, c, k, 1.5, rng);
          SparseOutputs out(dtype, c.rows);
          out.forward(in, 1.5f, reverse);
          const float dloss = 0.3f;
          const HostTensor full = backward(in, out, 1.5f, reverse, dloss);
          for (int r = 0; r < c.tp; ++r) {
            const HostTensor student = slice_columns(in.student, c.start(r), c.shard_width);
            HostTensor dshard = filled(dtype, student.t.shape, kNaN);  // must be overwritten
            cpu::kd_sparse_backward(dshard, student, in.cache.values, in.cache.ids, in.cache.lse,
                                    out.stats, out.losses, in.targets, c.vocab_size, 1.5f, reverse,
                                    dloss, c.start(r));
            const HostTensor want = slice_columns(full, c.start(r), c.shard_width);
            expect_identical_no_nan(dshard, want, "rank " + std::to_string(r));
            HostTensor in_place = student;
            cpu::kd_sparse_backward(in_place, in_place, in.cache.values, in.cache.ids, in.cache.lse,
                                    out.stats, out.losses, in.targets, c.vocab_size, 1.5f, reverse,
                                    dloss, c.start(r));
            expect_identical_no_nan(in_place, want, "rank " + std::to_string(r) + " in place");
          }
        }
      }
    }
  }
}

// The sharded backward (with the combined stats and losses) against central differences of the
// combined sharded loss, every element of the full student logits. Budget as above.
TS_FD_TEST(KdSparseShard, BackwardMatchesFiniteDifferencesOfCombinedLoss, "kd_sparse_shard_max",
           "kd_sparse_shard_sums", "kd_sparse_shard_finish", "kd_sparse_backward") {
  std::mt19937_64 rng(163);
  const float dloss = 0.7f;
  for (bool reverse : {false, true}) {
    for (float temperature : {0.5f, 1.0f, 4.0f}) {
      for (const ShardCase& c : {kCases[3], kCases[4], kCases[5], kCases[6]}) {
        for (int64_t k : k_cases(c.vocab_size)) {
          SCOPED_TRACE(mode(reverse, temperature) + " " + c.str() + " K=" + std::to_string(k));
          SparseInputs in = make_inputs(DType::f64, c, k, temperature, rng);
          const Stats s = sharded_forward(in, c, DType::f64, temperature, reverse);
          HostTensor analytic(DType::f64, in.student.t.shape);
          for (int r = 0; r < c.tp; ++r) {
            const HostTensor student = slice_columns(in.student, c.start(r), c.shard_width);
            HostTensor dshard(DType::f64, student.t.shape);
            cpu::kd_sparse_backward(dshard, student, in.cache.values, in.cache.ids, in.cache.lse,
                                    s.stats, s.losses, in.targets, c.vocab_size, temperature,
                                    reverse, dloss, c.start(r));
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
}

// A shard of padding only: max -inf, zero sums, no ids. A shard with real columns: by hand.
TEST(KdSparseShard, StatisticsOfOneShard) {
  std::mt19937_64 rng(164);
  const ShardCase c = kCases[5];  // rank 3 holds padding only
  const int64_t k = 3;
  const SparseInputs in = make_inputs(DType::f64, c, k, 1.0, rng);
  const HostTensor pad = slice_columns(in.student, c.start(3), c.shard_width);
  HostTensor row_max(DType::f64, {c.rows}), sums(DType::f64, {2 + k, c.rows});
  cpu::kd_sparse_shard_max(row_max, pad, c.start(3), c.vocab_size, 1.0f);
  for (int64_t i = 0; i < row_max.size(); ++i) EXPECT_EQ(row_max.get(i), -kInf);
  HostTensor global_max = filled(DType::f64, {c.rows}, 5.0);
  cpu::kd_sparse_shard_sums(sums, pad, in.cache.ids, global_max, c.start(3), c.vocab_size, 1.0f);
  for (int64_t i = 0; i < sums.size(); ++i) EXPECT_EQ(sums.get(i), 0.0);
  // Rank 1 (columns 3..5) of row 0 at T = 2.
  const HostTensor s1 = slice_columns(in.student, c.start(1), c.shard_width);
  cpu::kd_sparse_shard_max(row_max, s1, c.start(1), c.vocab_size, 2.0f);
  cpu::kd_sparse_shard_sums(sums, s1, in.cache.ids, row_max, c.start(1), c.vocab_size, 2.0f);
  double m = -kInf, all = 0.0, tail = 0.0;
  for (int64_t j = 0; j < c.shard_width; ++j) m = std::max(m, s1.get(j) / 2.0);
  for (int64_t j = 0; j < c.shard_width; ++j) {
    const double e = std::exp(s1.get(j) / 2.0 - m);
    bool is_id = false;
    for (int64_t i = 0; i < k; ++i) is_id = is_id || in.cache.ids.get(i) == c.start(1) + j;
    all += e;
    tail += is_id ? 0.0 : e;
  }
  EXPECT_EQ(row_max.get(0), m);
  EXPECT_DOUBLE_EQ(sums.get(0), all);
  EXPECT_DOUBLE_EQ(sums.get(c.rows), tail);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t col = int64_t(in.cache.ids.get(i)) - c.start(1);
    const double want = col >= 0 && col < c.shard_width ? s1.get(col) / 2.0 : 0.0;
    EXPECT_EQ(sums.get((2 + i) * c.rows), want) << i;
  }
}

TEST(KdSparseShard, RejectsBadArguments) {
  std::mt19937_64 rng(165);
  const ShardCase c = kCases[3];
  const SparseInputs in = make_inputs(DType::f64, c, 4, 1.0, rng);
  const HostTensor student = slice_columns(in.student, c.start(1), c.shard_width);
  HostTensor row_max(DType::f64, {c.rows}), sums(DType::f64, {6, c.rows});
  HostTensor losses(DType::f64, {c.rows}), stats(DType::f64, {3, c.rows});
  EXPECT_THROW(cpu::kd_sparse_shard_max(row_max, student, -1, c.vocab_size, 1.0f), Error);
  EXPECT_THROW(cpu::kd_sparse_shard_max(row_max, student, 0, 0, 1.0f), Error);
  EXPECT_THROW(cpu::kd_sparse_shard_max(row_max, student, 0, c.vocab_size, 0.0f), Error);
  HostTensor two_rows(DType::f64, {2, c.rows});  // the dense kd's (2, N)
  EXPECT_THROW(cpu::kd_sparse_shard_max(two_rows, student, 0, c.vocab_size, 1.0f), Error);
  cpu::kd_sparse_shard_max(row_max, student, c.start(1), c.vocab_size, 1.0f);
  HostTensor short_sums(DType::f64, {5, c.rows});  // 2 + K - 1 rows
  EXPECT_THROW(cpu::kd_sparse_shard_sums(short_sums, student, in.cache.ids, row_max, c.start(1),
                                         c.vocab_size, 1.0f),
               Error);
  EXPECT_THROW(cpu::kd_sparse_shard_sums(sums, student, in.cache.ids, row_max, c.start(1), 3, 1.0f),
               Error);  // ids beyond vocab_size
  cpu::kd_sparse_shard_sums(sums, student, in.cache.ids, row_max, c.start(1), c.vocab_size, 1.0f);
  HostTensor sums32(DType::f32, {6, c.rows});  // the statistics of finish share one dtype
  EXPECT_THROW(cpu::kd_sparse_shard_finish(losses, stats, row_max, sums32, in.cache.values,
                                           in.cache.lse, in.targets, 1.0f, false),
               Error);
  EXPECT_THROW(cpu::kd_sparse_shard_finish(losses, stats, row_max, sums, in.cache.values,
                                           in.cache.lse, in.targets, -2.0f, false),
               Error);
  EXPECT_THROW(cpu::kd_sparse_shard_finish(row_max, stats, row_max, sums, in.cache.values,
                                           in.cache.lse, in.targets, 1.0f, false),
               Error);  // losses aliases row_max
}

}  // namespace
}  // namespace shard_cases

namespace {

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

// Distinct ids in [0, vocab) for every row (random ones might repeat): id_i = (37 n + 131 i) mod
// vocab, distinct for i < K because 131 is prime to vocab = 1000.
std::vector<int32_t> spread_ids(int64_t rows, int64_t k, int vocab) {
  std::vector<int32_t> ids(rows * k);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t i = 0; i < k; ++i) ids[n * k + i] = int32_t((37 * n + 131 * i) % vocab);
  return ids;
}

TEST(NarrowDtype, KdSparse) {
  const int64_t num_n = 3, num_v = 1025, num_k = 7;
  const int vocab = 1000;
  const float temperature = 2.0f;
  std::vector<int32_t> id_values = spread_ids(num_n, num_k, vocab);
  const Tensor ids(id_values.data(), DType::i32, Device::cpu, Shape{num_n, num_k});
  for (DType dt : kNarrowTypes) {
    for (bool reverse : {false, true}) {
      expect_contract(
          "kd_sparse_forward", dt,
          {f32({num_n}), f32({3, num_n}), narrow({num_n, num_v}, 3.0), f32({num_n, num_k}),
           f32({2, num_n}), ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_sparse_forward(t[0], t[1], t[2], t[3], ids, t[4], t[5], vocab, temperature,
                                   reverse);
          },
          220);
      expect_contract(
          "kd_sparse forward + backward", dt,
          {narrow({num_n, num_v}), narrow({num_n, num_v}, 3.0), f32({num_n, num_k}),
           f32({2, num_n}), f32({3, num_n}), f32({num_n}), ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_sparse_forward(t[5], t[4], t[1], t[2], ids, t[3], t[6], vocab, temperature,
                                   reverse);
            ops::kd_sparse_backward(t[0], t[1], t[2], ids, t[3], t[4], t[5], t[6], vocab,
                                    temperature, reverse, 0.25f);
          },
          221);
      expect_contract(
          "kd_sparse_backward in place", dt,
          {narrow({num_n, num_v}, 3.0), f32({num_n, num_k}), f32({2, num_n}), f32({3, num_n}),
           f32({num_n}), ints({num_n}, -1, vocab)},
          [=](const auto& t) {
            ops::kd_sparse_forward(t[4], t[3], t[0], t[1], ids, t[2], t[5], vocab, temperature,
                                   reverse);
            ops::kd_sparse_backward(t[0], t[0], t[1], ids, t[2], t[3], t[4], t[5], vocab,
                                    temperature, reverse, 1.0f / 3);
          },
          222);
      // vocabulary-parallel: this shard holds columns [600, 1113) of a padded 1113-column vocab
      const int64_t width = 513, start = 600;
      expect_contract(
          "kd_sparse shard pipeline", dt,
          {narrow({num_n, width}, 3.0), f32({num_n, num_k}), f32({2, num_n}),
           ints({num_n}, -1, vocab), f32({num_n}), f32({2 + num_k, num_n}), f32({num_n}),
           f32({3, num_n}), narrow({num_n, width})},
          [=](const auto& t) {
            ops::kd_sparse_shard_max(t[4], t[0], start, vocab, temperature);
            ops::kd_sparse_shard_sums(t[5], t[0], ids, t[4], start, vocab, temperature);
            ops::kd_sparse_shard_finish(t[6], t[7], t[4], t[5], t[1], t[2], t[3], temperature,
                                        reverse);
            ops::kd_sparse_backward(t[8], t[0], t[1], ids, t[2], t[7], t[6], t[3], vocab,
                                    temperature, reverse, 0.5f, start);
          },
          223);
    }
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(KdSparse, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(170);
  const int64_t n = 5, width = 19, k = 4;
  const int vocab = 17;  // columns 17, 18 are padding
  const SparseInputs in(DType::f32, rng, n, width, vocab, k, 1.5);
  for (bool reverse : {false, true}) {
    Guarded losses({n}), stats({3, n}), dstudent({n, width});
    cpu::kd_sparse_forward(losses, stats, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                           in.targets, vocab, 1.5f, reverse);
    cpu::kd_sparse_backward(dstudent, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                            stats, losses, in.targets, vocab, 1.5f, reverse, 0.5f);
    expect_guards_intact({&losses, &stats, &dstudent}, "kd_sparse");
    // Vocabulary-parallel pieces of a shard holding columns [10, 29) of the padded vocabulary.
    Guarded row_max({n}), sums({2 + k, n}), s_losses({n}), s_stats({3, n}), s_dstudent({n, width});
    cpu::kd_sparse_shard_max(row_max, in.student, 10, vocab, 1.5f);
    cpu::kd_sparse_shard_sums(sums, in.student, in.cache.ids, row_max, 10, vocab, 1.5f);
    cpu::kd_sparse_shard_finish(s_losses, s_stats, row_max, sums, in.cache.values, in.cache.lse,
                                in.targets, 1.5f, reverse);
    cpu::kd_sparse_backward(s_dstudent, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                            s_stats, s_losses, in.targets, vocab, 1.5f, reverse, 0.5f, 10);
    expect_guards_intact({&row_max, &sums, &s_losses, &s_stats, &s_dstudent}, "kd_sparse shard");
  }
}

TEST(KdSparse, IsThreadCountIndependent) {
  std::mt19937_64 rng(171);
  const int64_t n = 300, width = 257, k = 16;
  const int vocab = 250;
  const SparseInputs in(DType::f32, rng, n, width, vocab, k, 2.0, false, 3.0);
  for (bool reverse : {false, true}) {
    HostTensor losses(DType::f32, {n}), stats(DType::f32, {3, n}), d(DType::f32, {n, width});
    expect_thread_independent("kd_sparse_forward", {&losses, &stats}, [&] {
      cpu::kd_sparse_forward(losses, stats, in.student, in.cache.values, in.cache.ids, in.cache.lse,
                             in.targets, vocab, 2.0f, reverse);
    });
    expect_thread_independent("kd_sparse_backward", {&d}, [&] {
      cpu::kd_sparse_backward(d, in.student, in.cache.values, in.cache.ids, in.cache.lse, stats,
                              losses, in.targets, vocab, 2.0f, reverse, 0.25f);
    });
    HostTensor row_max(DType::f32, {n}), sums(DType::f32, {2 + k, n});
    expect_thread_independent("kd_sparse_shard_max", {&row_max}, [&] {
      cpu::kd_sparse_shard_max(row_max, in.student, 100, vocab, 2.0f);
    });
    expect_thread_independent("kd_sparse_shard_sums", {&sums}, [&] {
      cpu::kd_sparse_shard_sums(sums, in.student, in.cache.ids, row_max, 100, vocab, 2.0f);
    });
    expect_thread_independent("kd_sparse_shard_finish", {&losses, &stats}, [&] {
      cpu::kd_sparse_shard_finish(losses, stats, row_max, sums, in.cache.values, in.cache.lse,
                                  in.targets, 2.0f, reverse);
    });
  }
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/kd_sparse.cu) ----------------------------------------------------

namespace tessera::gpu_kd_sparse {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::host_i32;
using testing::settle;

// Losses and stats: f32 online sums of up to 50k fast exponentials (~2 ulp each) against double,
// then K + 1 terms of O(1..10) with ~1e-6 relative error, times T^2 <= 16: under 2e-5 in L2
// relative to losses of O(1) (as the dense kd ops). dstudent: f32 exp((u - lse) log2 e) per
// element (~2e-6 relative), a difference of two such for the forward KL; bf16 rounds the output
// (2^-9: 4e-3), f16 to 2^-11 (1e-3), the dense op's bounds.
//
// The gradient is written in the student's dtype, rounded once from the kernel's f32 value, so it
// is compared with the CPU's f32 gradient rounded once to that dtype (grad_error): what remains is
// the f32 arithmetic above, where it moves a value across a rounding boundary (one ulp of the
// dtype on a small fraction of the elements), far inside the bounds. Against the unrounded CPU
// values, f16's rounding alone exceeds 1e-3 here, however exact the kernel: the norm of a sparse
// gradient sits on the K ids, while the tail's ~V elements, T dloss qs (1 - pt_tail / qs_tail)
// (forward) or T dloss qs (g_tail - KL) (reverse), of ~1e-8 .. 1e-5, lie below f16's smallest
// normal 2^-14 = 6.1e-5, where the spacing is 2^-24 = 6e-8 absolute: each rounds with up to 3e-8
// absolute error, ~50k of them add ~2^-24 sqrt(V / 12) = 4e-6 in L2, against gradient norms of
// only ~3e-3 (the dense op's gradient, nonzero in every column, has a larger norm). The exact
// gradient of the V = 50304 cases, rounded correctly to f16, is off by 1.0e-3 .. 2.0e-3 (forward)
// and 7e-3 .. 1.5e-2 (reverse) in L2, which is what the H100 measured against the unrounded
// values (1.4e-3 .. 1.35e-2). bf16 keeps f32's exponent range and has no such subnormals.
constexpr double kLossTolerance = 2e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

// rel L2 of a GPU gradient in `dtype` against the CPU's f32 gradient rounded once to dtype.
double grad_error(DType dtype, const std::vector<float>& got, const std::vector<float>& cpu) {
  return testing::rel_l2(got, testing::round_to(dtype, cpu));
}

// A host teacher cache in f32 for the GPU cases: the top K of random logits (ties to the lower
// id), their ids and lse, built by the CPU topk_logits.
struct HostCache {
  std::vector<float> values, lse;
  std::vector<int32_t> ids;
};
HostCache make_cache(int64_t n, int64_t v, int vocab, int64_t k, float temperature,
                     std::mt19937_64& rng, float scale) {
  std::vector<float> teacher = testing::random_vector(n * v, rng, scale);
  HostCache c{std::vector<float>(n * k), std::vector<float>(2 * n), std::vector<int32_t>(n * k)};
  const float temps[] = {temperature};
  cpu::topk_logits(host(c.values, {n, k}), host_i32(c.ids, {n, k}), host(c.lse, {1, 2, n}),
                   host(teacher, {n, v}), vocab, temps);
  return c;
}

struct SparseCase {
  int64_t rows, width;
  int vocab_size;
  int64_t k;
  float scale;  // logit standard deviation
  float temperature;
};
const SparseCase kCases[] = {
    {1, 1, 1, 1, 1.0f, 1.0f},           {3, 7, 5, 2, 2.0f, 2.0f},
    {8, 50304, 50257, 64, 2.0f, 1.0f},  {4, 50304, 50257, 256, 3.0f, 4.0f},
    {5, 1031, 1000, 7, 20.0f, 0.5f},    {1, 4099, 4099, 4099, 2.0f, 1.5f},
    {64, 1030, 1001, 1000, 2.0f, 2.0f}, {2, 40000, 40000, 8192, 2.0f, 1.0f}};

std::string what_of(DType dtype, bool reverse, const SparseCase& c) {
  return std::string(dtype_name(dtype)) + (reverse ? " reverse" : " forward") +
         " N=" + std::to_string(c.rows) + " V=" + std::to_string(c.width) +
         " vocab=" + std::to_string(c.vocab_size) + " K=" + std::to_string(c.k) +
         " T=" + std::to_string(c.temperature);
}

class KdSparseGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(KdSparseGpu, ForwardAndBackwardMatchCpu, "kd_sparse_forward",
                     "kd_sparse_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(141);
  for (bool reverse : {false, true}) {
    for (const SparseCase& c : kCases) {
      const int64_t n = c.rows, v = c.width, k = c.k;
      const std::string what = what_of(dtype, reverse, c);
      auto student = testing::round_to(dtype, testing::random_vector(n * v, rng, c.scale));
      HostCache cache = make_cache(n, v, c.vocab_size, k, c.temperature, rng, c.scale);
      std::vector<int32_t> targets(n);
      for (int64_t i = 0; i < n; ++i) targets[i] = i % 4 == 2 ? -1 : int32_t(i);  // some ignored
      std::vector<float> losses(n), stats(3 * n), dstudent(n * v);
      cpu::kd_sparse_forward(host(losses, {n}), host(stats, {3, n}), host(student, {n, v}),
                             host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                             host(cache.lse, {2, n}), host_i32(targets, {n}), c.vocab_size,
                             c.temperature, reverse);
      const float dloss = 1.0f / float(n);
      cpu::kd_sparse_backward(host(dstudent, {n, v}), host(student, {n, v}),
                              host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                              host(cache.lse, {2, n}), host(stats, {3, n}), host(losses, {n}),
                              host_i32(targets, {n}), c.vocab_size, c.temperature, reverse, dloss);

      DeviceTensor gstudent(dtype, {n, v}), gvalues(DType::f32, {n, k}), gids(DType::i32, {n, k});
      DeviceTensor glse(DType::f32, {2, n}), gtargets(DType::i32, {n});
      DeviceTensor glosses(DType::f32, {n}), gstats(DType::f32, {3, n}), gd(dtype, {n, v});
      gstudent.upload(student);
      gvalues.upload(cache.values);
      gids.upload_i32(cache.ids);
      glse.upload(cache.lse);
      gtargets.upload_i32(targets);
      settle();
      ops::kd_sparse_forward(glosses, gstats, gstudent, gvalues, gids, glse, gtargets, c.vocab_size,
                             c.temperature, reverse);
      const auto got_losses = glosses.download(), got_stats = gstats.download();
      EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
      EXPECT_LE(testing::rel_l2(got_stats, stats), kLossTolerance) << "stats " << what;
      testing::expect_same_nonfinite(got_losses, losses, "losses");
      testing::expect_same_nonfinite(got_stats, stats, "stats");
      testing::expect_ignored_rows_zero(got_losses, targets, what);
      EXPECT_TRUE(glosses.guards_intact() && gstats.guards_intact()) << what;

      // The backward uses the CPU's statistics, so the comparison isolates the gradient kernel.
      gstats.upload(stats);
      glosses.upload(losses);
      settle();
      ops::kd_sparse_backward(gd, gstudent, gvalues, gids, glse, gstats, glosses, gtargets,
                              c.vocab_size, c.temperature, reverse, dloss);
      auto got = gd.download();
      EXPECT_LE(grad_error(dtype, got, dstudent), grad_tolerance(dtype)) << "dstudent " << what;
      testing::expect_same_nonfinite(got, dstudent, "dstudent");
      EXPECT_TRUE(gd.guards_intact()) << what;
      testing::expect_zero_outside_real(got, targets, v, c.vocab_size, "dstudent", what);
      // In place: the gradient overwrites the student logits (the id columns are read first).
      ops::kd_sparse_backward(gstudent, gstudent, gvalues, gids, glse, gstats, glosses, gtargets,
                              c.vocab_size, c.temperature, reverse, dloss);
      got = gstudent.download();
      EXPECT_LE(grad_error(dtype, got, dstudent), grad_tolerance(dtype)) << "in place " << what;
      EXPECT_TRUE(gstudent.guards_intact()) << what;
    }
  }
}

// Views one element into their buffers: every row starts off the 16-byte grid (the scalar head).
TEST_P(KdSparseGpu, MisalignedViewsMatchCpu) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(142);
  const int64_t n = 6, v = 20000, k = 33;
  const int vocab = 19990;
  for (bool reverse : {false, true}) {
    const std::string what = std::string(dtype_name(dtype)) + (reverse ? " reverse" : "");
    auto all_s = testing::round_to(dtype, testing::random_vector(n * v + 1, rng, 2.0f));
    std::vector<float> student(all_s.begin() + 1, all_s.end());
    HostCache cache = make_cache(n, v, vocab, k, 1.5f, rng, 2.0f);
    std::vector<int32_t> targets = {0, 3999, -1, 17, 2048, 5};
    std::vector<float> losses(n), stats(3 * n), dstudent(n * v);
    cpu::kd_sparse_forward(host(losses, {n}), host(stats, {3, n}), host(student, {n, v}),
                           host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                           host(cache.lse, {2, n}), host_i32(targets, {n}), vocab, 1.5f, reverse);
    cpu::kd_sparse_backward(host(dstudent, {n, v}), host(student, {n, v}),
                            host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                            host(cache.lse, {2, n}), host(stats, {3, n}), host(losses, {n}),
                            host_i32(targets, {n}), vocab, 1.5f, reverse, 0.5f);
    DeviceTensor bs(dtype, {n * v + 1}), gvalues(DType::f32, {n, k}), gids(DType::i32, {n, k});
    DeviceTensor glse(DType::f32, {2, n}), gtargets(DType::i32, {n});
    DeviceTensor glosses(DType::f32, {n}), gstats(DType::f32, {3, n});
    bs.upload(all_s);
    gvalues.upload(cache.values);
    gids.upload_i32(cache.ids);
    glse.upload(cache.lse);
    gtargets.upload_i32(targets);
    settle();
    const Tensor vs(static_cast<char*>(bs.t().data) + dtype_size(dtype), dtype, Device::cuda,
                    Shape{n, v});
    ops::kd_sparse_forward(glosses, gstats, vs, gvalues, gids, glse, gtargets, vocab, 1.5f,
                           reverse);
    EXPECT_LE(testing::rel_l2(glosses.download(), losses), kLossTolerance) << what;
    EXPECT_LE(testing::rel_l2(gstats.download(), stats), kLossTolerance) << what;
    ops::kd_sparse_backward(vs, vs, gvalues, gids, glse, gstats, glosses, gtargets, vocab, 1.5f,
                            reverse, 0.5f);
    const auto got = bs.download();
    EXPECT_EQ(got[0], all_s[0]) << what;
    EXPECT_LE(grad_error(dtype, std::vector<float>(got.begin() + 1, got.end()), dstudent),
              grad_tolerance(dtype))
        << what;
    EXPECT_TRUE(bs.guards_intact()) << what;
  }
}

// The shard pieces one by one against the CPU's, from the same inputs; then the whole protocol
// (max, all-reduce on the host, sums, all-reduce, finish, backward per shard) over tp column
// shards against the unsharded CPU op. The last split's last shard holds padding only.
TS_GPU_PARITY_TEST_P(KdSparseGpu, ShardProtocolMatchesUnshardedCpu, "kd_sparse_shard_max",
                     "kd_sparse_shard_sums", "kd_sparse_shard_finish", "kd_sparse_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(172);
  struct Split {
    int64_t rows, width;  // N, Vl
    int tp, vocab_size;
    int64_t k;
    float temperature;
  };
  for (bool reverse : {false, true}) {
    for (const Split& s : {Split{5, 1031, 3, 3000, 20, 1.0f}, Split{6, 12576, 4, 50257, 256, 2.0f},
                           Split{3, 5, 4, 11, 11, 0.5f}, Split{1, 7, 3, 13, 5, 1.0f}}) {
      const int64_t n = s.rows, v = s.width, full_v = s.tp * s.width, k = s.k;
      const float temp = s.temperature;
      const std::string what = std::string(dtype_name(dtype)) + (reverse ? " reverse" : "") +
                               " tp=" + std::to_string(s.tp) + " Vl=" + std::to_string(v) +
                               " K=" + std::to_string(k);
      const auto student = testing::round_to(dtype, testing::random_vector(n * full_v, rng, 2.0f));
      HostCache cache = make_cache(n, full_v, s.vocab_size, k, temp, rng, 2.0f);
      std::vector<int32_t> targets(n);
      for (int64_t i = 0; i < n; ++i) targets[i] = i == 1 ? -1 : 0;
      std::vector<float> losses(n), stats(3 * n), dstudent(n * full_v);
      std::vector<float> s_copy = student;
      cpu::kd_sparse_forward(host(losses, {n}), host(stats, {3, n}), host(s_copy, {n, full_v}),
                             host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                             host(cache.lse, {2, n}), host_i32(targets, {n}), s.vocab_size, temp,
                             reverse);
      cpu::kd_sparse_backward(host(dstudent, {n, full_v}), host(s_copy, {n, full_v}),
                              host(cache.values, {n, k}), host_i32(cache.ids, {n, k}),
                              host(cache.lse, {2, n}), host(stats, {3, n}), host(losses, {n}),
                              host_i32(targets, {n}), s.vocab_size, temp, reverse, 0.5f);

      std::vector<std::unique_ptr<DeviceTensor>> gs;
      std::vector<std::vector<float>> hs;
      for (int r = 0; r < s.tp; ++r) {
        std::vector<float> part = testing::columns_of(student, n, full_v, r * v, v);
        gs.push_back(std::make_unique<DeviceTensor>(dtype, Shape{n, v}));
        gs.back()->upload(part);
        hs.push_back(std::move(part));
      }
      DeviceTensor gvalues(DType::f32, {n, k}), gids(DType::i32, {n, k}), glse(DType::f32, {2, n});
      DeviceTensor gtargets(DType::i32, {n}), gmax(DType::f32, {n}), gsums(DType::f32, {2 + k, n});
      DeviceTensor glosses(DType::f32, {n}), gstats(DType::f32, {3, n});
      gvalues.upload(cache.values);
      gids.upload_i32(cache.ids);
      glse.upload(cache.lse);
      gtargets.upload_i32(targets);
      settle();
      std::vector<float> row_max(n, -INFINITY), sums((2 + k) * n, 0.0f);
      for (int r = 0; r < s.tp; ++r) {
        ops::kd_sparse_shard_max(gmax, *gs[r], r * v, s.vocab_size, temp);
        const auto part = gmax.download();
        std::vector<float> want(n);
        cpu::kd_sparse_shard_max(host(want, {n}), host(hs[r], {n, v}), r * v, s.vocab_size, temp);
        EXPECT_LE(testing::rel_l2(part, want), 1e-6) << "row_max rank " << r << " " << what;
        testing::expect_same_nonfinite(part, want, "row_max");
        for (int64_t i = 0; i < n; ++i) row_max[i] = std::max(row_max[i], part[i]);
      }
      gmax.upload(row_max);
      settle();
      for (int r = 0; r < s.tp; ++r) {
        ops::kd_sparse_shard_sums(gsums, *gs[r], gids, gmax, r * v, s.vocab_size, temp);
        const auto part = gsums.download();
        std::vector<float> want((2 + k) * n);
        cpu::kd_sparse_shard_sums(host(want, {2 + k, n}), host(hs[r], {n, v}),
                                  host_i32(cache.ids, {n, k}), host(row_max, {n}), r * v,
                                  s.vocab_size, temp);
        // Sums of exponentials (rows 0, 1) to ~1e-6; the tempered logits (rows 2..) to an ulp.
        double err = 0.0, norm = 0.0;
        for (int64_t i = 0; i < (2 + k) * n; ++i) {
          err = std::max(err, std::fabs(double(part[i]) - want[i]));
          norm = std::max(norm, std::fabs(double(want[i])));
        }
        EXPECT_LE(err, 1e-5 * std::max(norm, 1.0)) << "sums rank " << r << " " << what;
        for (int64_t i = 0; i < (2 + k) * n; ++i) sums[i] += part[i];
      }
      gsums.upload(sums);
      settle();
      ops::kd_sparse_shard_finish(glosses, gstats, gmax, gsums, gvalues, glse, gtargets, temp,
                                  reverse);
      const auto got_losses = glosses.download(), got_stats = gstats.download();
      EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
      EXPECT_LE(testing::rel_l2(got_stats, stats), kLossTolerance) << "stats " << what;
      testing::expect_same_nonfinite(got_stats, stats, "stats");
      testing::expect_ignored_rows_zero(got_losses, targets, what);
      EXPECT_TRUE(glosses.guards_intact() && gstats.guards_intact() && gmax.guards_intact() &&
                  gsums.guards_intact())
          << what;

      for (int r = 0; r < s.tp; ++r) {
        ops::kd_sparse_backward(*gs[r], *gs[r], gvalues, gids, glse, gstats, glosses, gtargets,
                                s.vocab_size, temp, reverse, 0.5f, r * v);
        const auto got = gs[r]->download();
        const std::vector<float> want = testing::columns_of(dstudent, n, full_v, r * v, v);
        if (r * v >= s.vocab_size) {  // padding only: exact zeros
          for (float g : got) EXPECT_EQ(g, 0.0f) << "rank " << r << " " << what;
        } else {
          EXPECT_LE(grad_error(dtype, got, want), grad_tolerance(dtype))
              << "rank " << r << " " << what;
        }
        EXPECT_TRUE(gs[r]->guards_intact()) << what;
      }
    }
  }
}

// A K above the CUDA limit is refused with a message that names the limit.
TEST_P(KdSparseGpu, RejectsKAboveTheLimit) {
  const DType dtype = GetParam();
  const int64_t n = 1, v = 9000, k = 8193;
  DeviceTensor gs(dtype, {n, v}), gvalues(DType::f32, {n, k}), gids(DType::i32, {n, k});
  DeviceTensor glse(DType::f32, {2, n}), gtargets(DType::i32, {n});
  DeviceTensor glosses(DType::f32, {n}), gstats(DType::f32, {3, n});
  try {
    ops::kd_sparse_forward(glosses, gstats, gs, gvalues, gids, glse, gtargets, int(v), 1.0f, false);
    ADD_FAILURE() << "K = 8193 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("8192"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KdSparseGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::gpu_kd_sparse
