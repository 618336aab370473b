// The blend schedule: the period it picks, exact proportions after every prefix (within
// 1 - 1/(2K - 2) of n * q_d / P, checked over whole periods, which repeat), pick and
// global_index_of as inverses, and the weights it refuses.
#include "data/blend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_user_error;

BlendSchedule schedule(const std::vector<double>& w) {
  return BlendSchedule(w, std::vector<std::string>(w.size(), "ds"));
}

// The largest |c_d(n) - n q_d / P| over two periods (so the wrap is covered), checking that the
// picks of each dataset come with consecutive indices.
double worst_error(const BlendSchedule& s) {
  const int K = s.num_datasets();
  std::vector<int64_t> count(size_t(K), 0);
  double worst = 0.0;
  for (int64_t g = 0; g < 2 * s.period(); ++g) {
    const BlendSchedule::Pick p = s.pick(g);
    EXPECT_EQ(p.index, count[size_t(p.dataset)]) << "g " << g;
    ++count[size_t(p.dataset)];
    EXPECT_EQ(s.global_index_of(p.dataset, p.index), g);
    for (int d = 0; d < K; ++d) {
      const double share = double(g + 1) * double(s.per_period(d)) / double(s.period());
      worst = std::max(worst, std::abs(double(count[size_t(d)]) - share));
    }
  }
  return worst;
}

double bound(int K) { return K == 1 ? 0.0 : 1.0 - 1.0 / (2.0 * K - 2.0); }

TEST(BlendSchedule, PeriodIsTheSmallestExactOne) {
  EXPECT_EQ(schedule({1.0}).period(), 1);
  EXPECT_EQ(schedule({0.7, 0.3}).period(), 10);
  EXPECT_EQ(schedule({0.7, 0.3}).per_period(0), 7);
  EXPECT_EQ(schedule({1, 1, 1}).period(), 3);
  EXPECT_EQ(schedule({2, 1, 1}).period(), 4);
  EXPECT_EQ(schedule({5, 5}).period(), 2);
  // sqrt(2) : 1 has no exact period: 2^16, shares by largest remainders.
  const BlendSchedule s = schedule({std::sqrt(2.0), 1.0});
  EXPECT_EQ(s.period(), kMaxBlendPeriod);
  EXPECT_EQ(s.per_period(0) + s.per_period(1), kMaxBlendPeriod);
  EXPECT_NEAR(double(s.per_period(0)) / double(kMaxBlendPeriod),
              std::sqrt(2.0) / (1 + std::sqrt(2.0)), 1.0 / kMaxBlendPeriod);
}

TEST(BlendSchedule, ProportionsExactAfterEveryPrefix) {
  for (const std::vector<double>& w :
       std::vector<std::vector<double>>{{1.0},
                                        {0.7, 0.3},
                                        {1, 1, 1},
                                        {0.5, 0.25, 0.25},
                                        {1, 1, 1, 1, 1, 100, 100, 100},
                                        {1, 2, 4, 8, 16, 32, 64}}) {
    const BlendSchedule s = schedule(w);
    EXPECT_LE(worst_error(s), bound(s.num_datasets()) + 1e-12) << "weights " << w.size();
  }
  // Random weights, including tiny ones next to large ones.
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int K = 2 + int(rng() % 7);
    std::vector<double> w;
    for (int d = 0; d < K; ++d) w.push_back(rng() % 3 == 0 ? 1.0 : double(1 + rng() % 60));
    const BlendSchedule s = schedule(w);
    EXPECT_LE(worst_error(s), bound(K) + 1e-12) << "trial " << trial;
  }
  // Two datasets: within 1/2 at every prefix; an irrational ratio over its 2^16 period.
  EXPECT_LE(worst_error(schedule({std::sqrt(2.0), 1.0})), 0.5 + 1e-12);
}

TEST(BlendSchedule, LaterPeriodsRepeatTheFirst) {
  const BlendSchedule s = schedule({0.6, 0.3, 0.1});
  for (int64_t g = 0; g < s.period(); ++g) {
    const int64_t later = g + 1000003 * s.period();
    const auto a = s.pick(g), b = s.pick(later);
    EXPECT_EQ(a.dataset, b.dataset);
    EXPECT_EQ(b.index, a.index + 1000003 * s.per_period(a.dataset));
    EXPECT_EQ(s.global_index_of(b.dataset, b.index), later);
  }
}

TEST(BlendSchedule, RefusedWeights) {
  expect_user_error([] { BlendSchedule({}, {}); }, {"no datasets"});
  expect_user_error([] { BlendSchedule({1.0, 0.0}, {"a.h5", "b.h5"}); }, {"b.h5", "weight 0"});
  expect_user_error([] { BlendSchedule({1.0, NAN}, {"a.h5", "b.h5"}); }, {"b.h5", "nan"});
  expect_user_error(
      [] {
        BlendSchedule({1e9, 1.0 + 1e-12}, {"a.h5", "b.h5"});
      },
      {"b.h5", "never be sampled"});
}

}  // namespace
}  // namespace tessera
