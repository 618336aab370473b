// Tests of the per-row top-K with tempered log-sum-exps (kernels/cpu/topk_logits.cpp,
// kernels/cuda/topk_logits.cu). CPU: against a full sort and sums written here, ties (the lower id
// first, -0 with +0, NaN first), K = V (tail -inf), -inf tails, several temperatures, bf16/f16
// through ops, bounds, threads, errors. GPU parity: ids and values exact, lse within a bound.
// Shape letters: N rows, V padded width, K entries kept per row, nT temperatures.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kTemps[] = {0.5f, 1.0f, 2.5f};

// The top K of every row by a full sort under the contract's order, written independently of the
// kernel: the sort key (NaN first, then the value descending with -0 as +0, then the id), and the
// log-sum-exps summed here in double. lse is (nT, 2, N).
struct Want {
  std::vector<int32_t> ids;
  std::vector<double> values, lse;
};
Want full_sort(const HostTensor& logits, int vocab, int64_t k, std::span<const float> temps) {
  const int64_t rows = logits.t.dim(0), width = logits.t.dim(1);
  const auto num_t = int64_t(temps.size());
  Want w{std::vector<int32_t>(rows * k), std::vector<double>(rows * k),
         std::vector<double>(num_t * 2 * rows)};
  struct Entry {
    int nan_rank;  // 0 for NaN, 1 otherwise
    double neg_value;
    int id;
    bool operator<(const Entry& o) const {
      if (nan_rank != o.nan_rank) return nan_rank < o.nan_rank;
      if (nan_rank == 1 && neg_value != o.neg_value) return neg_value < o.neg_value;
      return id < o.id;
    }
  };
  for (int64_t n = 0; n < rows; ++n) {
    std::vector<Entry> row(vocab);
    for (int j = 0; j < vocab; ++j) {
      const double v = logits.get(n * width + j);
      row[j] = {std::isnan(v) ? 0 : 1, v == 0.0 ? 0.0 : -v, j};
    }
    std::sort(row.begin(), row.end());
    std::vector<char> top(vocab, 0);
    for (int64_t i = 0; i < k; ++i) {
      w.ids[n * k + i] = row[i].id;
      w.values[n * k + i] = logits.get(n * width + row[i].id);
      top[row[i].id] = 1;
    }
    for (int64_t t = 0; t < num_t; ++t) {
      for (int part = 0; part < 2; ++part) {
        double m = -kInf, sum = 0.0;
        bool any = false, nan = false;
        for (int j = 0; j < vocab; ++j) {
          if (part == 1 && top[j]) continue;
          const double u = logits.get(n * width + j) / temps[t];
          any = true;
          nan = nan || std::isnan(u);
          m = std::max(m, u);
        }
        for (int j = 0; j < vocab; ++j)
          if (!(part == 1 && top[j])) sum += std::exp(logits.get(n * width + j) / temps[t] - m);
        w.lse[(2 * t + part) * rows + n] = nan                  ? std::nan("")
                                           : !any || m == -kInf ? -kInf
                                                                : m + std::log(sum);
      }
    }
  }
  return w;
}

struct Outputs {
  HostTensor values, ids, lse;
  Outputs(DType dtype, int64_t rows, int64_t k, int64_t num_t)
      : values(dtype, {rows, k}), ids(DType::i32, {rows, k}), lse(dtype, {num_t, 2, rows}) {}
  void run(const HostTensor& logits, int vocab, std::span<const float> temps) {
    cpu::topk_logits(values, ids, lse, logits, vocab, temps);
  }
};

// ids exactly, values exactly (copies), lse within lse_tol relative (floored at 1), NaN and
// infinities agreeing.
void expect_matches(const Outputs& got, const Want& want, double lse_tol, const std::string& what) {
  for (size_t i = 0; i < want.ids.size(); ++i) {
    ASSERT_EQ(got.ids.get(int64_t(i)), want.ids[i]) << what << " entry " << i;
    const double copy = got.values.t.dtype == DType::f32 ? float(want.values[i]) : want.values[i];
    EXPECT_EQ(got.values.get(int64_t(i)), copy) << what << " entry " << i;
  }
  for (size_t i = 0; i < want.lse.size(); ++i) {
    const double g = got.lse.get(int64_t(i)), w = want.lse[i];
    if (std::isnan(w) || std::isinf(w)) {
      EXPECT_TRUE(std::isnan(w) ? std::isnan(g) : g == w) << what << " lse " << i << ": " << g;
    } else {
      EXPECT_NEAR(g, w, lse_tol * std::max(1.0, std::fabs(w))) << what << " lse " << i;
    }
  }
}

struct Shape4 {
  int64_t rows, width;
  int vocab;
  int64_t k;
};

// f64: the same double arithmetic, only the order of the sums may differ (~1e-15). f32: lse is
// stored rounded (2^-24 relative); values are exact copies either way.
TEST(TopKLogits, MatchesFullSort) {
  for (DType dtype : {DType::f32, DType::f64}) {
    const double tol = dtype == DType::f64 ? 1e-13 : 1e-7;
    for (const Shape4& s : {Shape4{5, 37, 31, 1}, Shape4{5, 37, 31, 5}, Shape4{5, 37, 31, 30},
                            Shape4{5, 37, 31, 31}, Shape4{1, 1025, 1025, 7}, Shape4{3, 1, 1, 1}}) {
      const std::string what = std::string(dtype_name(dtype)) + " N=" + std::to_string(s.rows) +
                               " V=" + std::to_string(s.width) +
                               " vocab=" + std::to_string(s.vocab) + " K=" + std::to_string(s.k);
      std::mt19937_64 rng(301);
      const HostTensor logits = randn(dtype, {s.rows, s.width}, rng, 3.0);
      Outputs out(dtype, s.rows, s.k, 3);
      out.run(logits, s.vocab, kTemps);
      expect_matches(out, full_sort(logits, s.vocab, s.k, kTemps), tol, what);
    }
  }
}

// Logits from {-1, -0, +0, 1, 2}: ties everywhere, broken by the lower id; -0 and +0 tie.
TEST(TopKLogits, TiesGoToTheLowerId) {
  std::mt19937_64 rng(302);
  const double pool[] = {-1.0, -0.0, 0.0, 1.0, 2.0};
  std::uniform_int_distribution<int> pick(0, 4);
  HostTensor logits(DType::f32, {6, 40});
  for (int64_t i = 0; i < logits.size(); ++i) logits.set(i, pool[pick(rng)]);
  for (int64_t k : {1, 3, 17, 39}) {
    Outputs out(DType::f32, 6, k, 1);
    out.run(logits, 39, std::span<const float>(kTemps, 1));
    expect_matches(out, full_sort(logits, 39, k, std::span<const float>(kTemps, 1)), 1e-7,
                   "K=" + std::to_string(k));
  }
  // By hand: [1, 3, 3, 0, 3, -0, 0, -2] keeps 3 (ids 1, 2, 4), then the zeros 3, 5, 6 in id order.
  HostTensor row(DType::f32, {1, 8});
  const double v[] = {1.0, 3.0, 3.0, 0.0, 3.0, -0.0, 0.0, -2.0};
  for (int j = 0; j < 8; ++j) row.set(j, v[j]);
  Outputs out(DType::f32, 1, 7, 1);
  out.run(row, 8, std::span<const float>(kTemps + 1, 1));
  const int32_t want[] = {1, 2, 4, 0, 3, 5, 6};
  for (int i = 0; i < 7; ++i) EXPECT_EQ(out.ids.get(i), want[i]) << i;
  EXPECT_TRUE(std::signbit(out.values.get(5))) << "-0 is copied as -0";
}

// NaN ranks above +inf (as torch.topk); a row holding one has NaN log-sum-exps.
TEST(TopKLogits, NaNRanksFirst) {
  HostTensor row(DType::f32, {1, 6});
  const double v[] = {1.0, -kInf, kInf, 0.5, std::nan(""), 2.0};
  for (int j = 0; j < 6; ++j) row.set(j, v[j]);
  Outputs out(DType::f32, 1, 3, 1);
  out.run(row, 6, std::span<const float>(kTemps + 1, 1));
  EXPECT_EQ(out.ids.get(0), 4);
  EXPECT_EQ(out.ids.get(1), 2);
  EXPECT_EQ(out.ids.get(2), 5);
  EXPECT_TRUE(std::isnan(out.values.get(0)));
  EXPECT_TRUE(std::isnan(out.lse.get(0)));
}

// K = vocab_size: the tail is empty, lse[t][1] = -inf; an all -inf tail gives -inf, not NaN, and
// an all -inf row gives -inf twice.
TEST(TopKLogits, EmptyAndMinusInfTails) {
  std::mt19937_64 rng(303);
  const HostTensor logits = randn(DType::f64, {4, 9}, rng, 2.0);
  Outputs full(DType::f64, 4, 7, 3);
  full.run(logits, 7, kTemps);
  expect_matches(full, full_sort(logits, 7, 7, kTemps), 1e-13, "K = vocab");
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t n = 0; n < 4; ++n) EXPECT_EQ(full.lse.get((2 * t + 1) * 4 + n), -kInf);
  HostTensor masked(DType::f32, {2, 5});
  const double v[] = {3.0, -kInf, 1.0, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf};
  for (int i = 0; i < 10; ++i) masked.set(i, v[i]);
  Outputs out(DType::f32, 2, 2, 1);
  out.run(masked, 5, std::span<const float>(kTemps, 1));
  EXPECT_EQ(out.ids.get(0), 0);
  EXPECT_EQ(out.ids.get(1), 2);
  EXPECT_NEAR(out.lse.get(0), std::log(std::exp(6.0) + std::exp(2.0)), 1e-5);
  EXPECT_EQ(out.lse.get(2), -kInf);  // row 0's tail
  EXPECT_EQ(out.lse.get(1), -kInf);  // row 1, all -inf
  EXPECT_EQ(out.lse.get(3), -kInf);
  EXPECT_EQ(out.ids.get(2), 0);  // ties among -inf: the lower ids
  EXPECT_EQ(out.ids.get(3), 1);
}

// bf16/f16 logits through ops: the f32 kernel on the exactly widened values, so ids and values
// match it exactly and lse bit for bit.
TEST(TopKLogits, NarrowDtypesEqualTheWidenedF32) {
  using namespace n16;
  std::mt19937_64 rng(304);
  const int64_t rows = 4, width = 300, k = 20;
  const int vocab = 290;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (DType dtype : kNarrowTypes) {
    std::vector<uint16_t> bits(rows * width);
    HostTensor wide(DType::f32, {rows, width});
    for (int64_t i = 0; i < rows * width; ++i) {
      bits[i] = narrow_bits(dtype, normal(rng));
      wide.set(i, widen(dtype, bits[i]));
    }
    const Tensor narrow_logits(bits.data(), dtype, Device::cpu, Shape{rows, width});
    Outputs got(DType::f32, rows, k, 3), want(DType::f32, rows, k, 3);
    ops::topk_logits(got.values, got.ids, got.lse, narrow_logits, vocab, kTemps);
    want.run(wide, vocab, kTemps);
    expect_identical(got.ids, want.ids, std::string(dtype_name(dtype)) + " ids");
    expect_identical(got.values, want.values, std::string(dtype_name(dtype)) + " values");
    expect_identical(got.lse, want.lse, std::string(dtype_name(dtype)) + " lse");
  }
}

TEST(TopKLogits, RejectsBadArguments) {
  std::mt19937_64 rng(305);
  const HostTensor logits = randn(DType::f32, {3, 10}, rng);
  Outputs out(DType::f32, 3, 4, 3);
  EXPECT_NO_THROW(out.run(logits, 9, kTemps));
  EXPECT_THROW(out.run(logits, 11, kTemps), Error);  // vocab_size > V
  EXPECT_THROW(out.run(logits, 0, kTemps), Error);
  EXPECT_THROW(out.run(logits, 3, kTemps), Error);  // K = 4 > vocab_size
  EXPECT_THROW(out.run(logits, 9, std::span<const float>()), Error);
  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    const float temps[] = {1.0f, bad, 2.0f};
    EXPECT_THROW(out.run(logits, 9, temps), Error) << bad;
  }
  Outputs two_temps(DType::f32, 3, 4, 2);  // lse (2, 2, N) beside three temperatures
  EXPECT_THROW(two_temps.run(logits, 9, kTemps), Error);
  Outputs zero_k(DType::f32, 3, 0, 3);
  EXPECT_THROW(zero_k.run(logits, 9, kTemps), Error);
  Outputs f64_out(DType::f64, 3, 4, 3);  // f64 outputs beside f32 logits
  EXPECT_THROW(f64_out.run(logits, 9, kTemps), Error);
  HostTensor float_ids(DType::f32, {3, 4});
  EXPECT_THROW(cpu::topk_logits(out.values, float_ids, out.lse, logits, 9, kTemps), Error);
  HostTensor short_ids(DType::i32, {3, 3});
  EXPECT_THROW(cpu::topk_logits(out.values, short_ids, out.lse, logits, 9, kTemps), Error);
  // values and lse in one buffer: overlap
  HostTensor buffer(DType::f32, {3 * 4 + 3 * 2 * 3});
  const Tensor values_view(buffer.f32.data(), DType::f32, Device::cpu, Shape{3, 4});
  const Tensor lse_view(buffer.f32.data() + 11, DType::f32, Device::cpu, Shape{3, 2, 3});
  EXPECT_THROW(cpu::topk_logits(values_view, out.ids, lse_view, logits, 9, kTemps), Error);
}

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(TopKLogits, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(306);
  const HostTensor logits = randn(DType::f32, {5, 19}, rng, 2.0);
  for (int64_t k : {1, 6, 17}) {
    Guarded values({5, k}), ids({5, k}, DType::i32), lse({3, 2, 5});
    cpu::topk_logits(values, ids, lse, logits, 17, kTemps);
    expect_guards_intact({&values, &ids, &lse}, "topk_logits K=" + std::to_string(k));
  }
}

TEST(TopKLogits, IsThreadCountIndependent) {
  std::mt19937_64 rng(307);
  const HostTensor logits = randn(DType::f32, {300, 257}, rng, 3.0);
  Outputs out(DType::f32, 300, 12, 3);
  expect_thread_independent("topk_logits", {&out.values, &out.ids, &out.lse},
                            [&] { out.run(logits, 250, kTemps); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/topk_logits.cu) --------------------------------------------------

namespace tessera::gpu_topk {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// lse on the GPU: f32 sums of fast exp2 terms (~2^-22 relative each) over up to 50k columns in a
// fixed tree (~1e-6 relative for the sum, so ~1e-6 absolute in its log), the exponent's
// difference v - max rounded in f32 (its error weighted by the term: at most 2^-24 / e of the
// sum), and max * (1 / t) with two roundings (2^-23 of |max / t|, up to ~160 here). Bound:
// 1e-5 + 2.5e-7 |lse|. ids and values must agree exactly (a total order on the same f32 values).
double lse_bound(double want) { return 1e-5 + 2.5e-7 * std::fabs(want); }

struct TopKCase {
  int64_t rows, width;
  int vocab_size;
  int64_t k;
  float scale;       // logit standard deviation
  bool integer_ish;  // logits rounded to integers in [-3, 3]: ties everywhere
};
const TopKCase kCases[] = {
    {1, 1, 1, 1, 1.0f, false},          {3, 7, 5, 5, 2.0f, false},
    {8, 50304, 50257, 64, 2.0f, false}, {4, 50304, 50257, 1024, 3.0f, false},
    {5, 1031, 1000, 7, 20.0f, false},   {64, 1030, 1001, 1000, 2.0f, false},
    {2, 4099, 4099, 256, 2.0f, false},  {3, 300, 300, 255, 2.0f, false},
    {6, 5000, 4999, 100, 1.0f, true},   {4, 2048, 2048, 2048 / 2, 1.0f, true},
    {2, 1025, 1025, 1024, 2.0f, false}};
const float kGpuTemps[] = {1.0f, 0.5f, 2.0f, 4.0f};

class TopKLogitsGpu : public testing::GpuCaseP<DType> {};

// With specials, a few rows hold NaN, +-inf and -0 (ids still exact; lse NaN/inf agreeing).
void run_case(DType dtype, const TopKCase& c, std::mt19937_64& rng, bool specials) {
  const int64_t n = c.rows, v = c.width, k = c.k, num_t = std::size(kGpuTemps);
  const std::string what = std::string(dtype_name(dtype)) + " N=" + std::to_string(n) +
                           " V=" + std::to_string(v) + " vocab=" + std::to_string(c.vocab_size) +
                           " K=" + std::to_string(k) + (specials ? " specials" : "");
  auto logits = testing::random_vector(n * v, rng, c.scale);
  if (c.integer_ish)
    for (float& x : logits) x = std::clamp(std::round(x), -3.0f, 3.0f);
  if (specials) {
    logits[0] = NAN;
    logits[std::min<int64_t>(v - 1, 3)] = INFINITY;
    if (n > 1) {
      logits[v + 1] = -INFINITY;
      logits[v + 2] = -0.0f;
    }
  }
  logits = testing::round_to(dtype, logits);
  std::vector<float> values(n * k), lse(num_t * 2 * n);
  std::vector<int32_t> ids(n * k);
  cpu::topk_logits(host(values, {n, k}), Tensor(ids.data(), DType::i32, Device::cpu, Shape{n, k}),
                   host(lse, {num_t, 2, n}), host(logits, {n, v}), c.vocab_size, kGpuTemps);
  DeviceTensor glogits(dtype, {n, v}), gvalues(DType::f32, {n, k}), gids(DType::i32, {n, k});
  DeviceTensor glse(DType::f32, {num_t, 2, n});
  glogits.upload(logits);
  settle();
  ops::topk_logits(gvalues, gids, glse, glogits, c.vocab_size, kGpuTemps);
  const auto got_values = gvalues.download(), got_lse = glse.download();
  std::vector<int32_t> got_ids(n * k);
  const auto id_bytes = gids.download_bytes();
  std::memcpy(got_ids.data(), id_bytes.data(), id_bytes.size());
  EXPECT_EQ(got_ids, ids) << what;
  for (int64_t i = 0; i < n * k; ++i) {
    const bool same = std::isnan(values[i]) ? std::isnan(got_values[i])
                                            : std::memcmp(&values[i], &got_values[i], 4) == 0;
    EXPECT_TRUE(same) << what << " value " << i << ": " << got_values[i] << " vs " << values[i];
  }
  testing::expect_same_nonfinite(got_lse, lse, "lse " + what);
  for (int64_t i = 0; i < num_t * 2 * n; ++i) {
    if (std::isfinite(lse[i])) {
      EXPECT_NEAR(got_lse[i], lse[i], lse_bound(lse[i])) << what << " lse " << i;
    }
  }
  EXPECT_TRUE(gvalues.guards_intact() && gids.guards_intact() && glse.guards_intact()) << what;
}

TS_GPU_PARITY_TEST_P(TopKLogitsGpu, MatchesCpu, "topk_logits") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(311);
  for (const TopKCase& c : kCases) run_case(dtype, c, rng, false);
  for (const TopKCase& c : kCases) run_case(dtype, c, rng, true);
}

// K above the CUDA limit and too many temperatures are refused with messages naming the limits.
TEST_P(TopKLogitsGpu, RejectsArgumentsBeyondItsLimits) {
  const DType dtype = GetParam();
  const int64_t n = 2, v = 3000;
  DeviceTensor glogits(dtype, {n, v}), glse(DType::f32, {1, 2, n});
  DeviceTensor gvalues(DType::f32, {n, 1025}), gids(DType::i32, {n, 1025});
  const float one[] = {1.0f};
  try {
    ops::topk_logits(gvalues, gids, glse, glogits, int(v), one);
    ADD_FAILURE() << "K = 1025 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1024"), std::string::npos) << e.what();
  }
  DeviceTensor values8(DType::f32, {n, 8}), ids8(DType::i32, {n, 8});
  DeviceTensor lse17(DType::f32, {17, 2, n});
  const std::vector<float> temps(17, 1.0f);
  try {
    ops::topk_logits(values8, ids8, lse17, glogits, int(v), temps);
    ADD_FAILURE() << "17 temperatures were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("16"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, TopKLogitsGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::gpu_topk
