// Philox-4x32-10 against the Random123 known-answer vectors; CounterRng determinism, slice
// independence and distribution sanity (bounds from the standard error, so they can fail).
#include <gtest/gtest.h>

#include <cmath>
#include <utility>
#include <vector>

#include "core/rng.h"

namespace tessera {
namespace {

TEST(Philox, KnownAnswerVectors) {
  // Random123 kat_vectors, philox4x32 with 10 rounds.
  EXPECT_EQ(philox4x32({0, 0, 0, 0}, {0, 0}),
            (Philox4x32Ctr{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (Philox4x32Ctr{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (Philox4x32Ctr{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(HashName, Fnv1a64) {
  EXPECT_EQ(hash_name(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(hash_name("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(hash_name("foobar"), 0x85944171f73967e8ull);
}

TEST(CounterRng, DeterministicAndKeyedByName) {
  const CounterRng a(42, "layers.0.attn.wq"), b(42, "layers.0.attn.wq");
  const CounterRng by_hash(42, hash_name("layers.0.attn.wq"));
  for (uint64_t i = 0; i < 100; ++i) {
    EXPECT_EQ(a.bits(i), b.bits(i));
    EXPECT_EQ(a.bits(i), by_hash.bits(i));
    EXPECT_EQ(a.normal(i), b.normal(i));
  }
  // Element index above 2^32 uses the second counter word; it must not alias the low index.
  EXPECT_NE(a.bits(5), a.bits((uint64_t{1} << 32) + 5));
  EXPECT_NE(a.bits(5, 0), a.bits(5, 1));
}

TEST(CounterRng, DifferentNamesAndSeedsGiveDifferentStreams) {
  const CounterRng wq(7, "wq"), wk(7, "wk"), wq_seed8(8, "wq");
  int same_name = 0, same_seed = 0;
  for (uint64_t i = 0; i < 10000; ++i) {
    same_name += wq.bits(i) == wk.bits(i);
    same_seed += wq.bits(i) == wq_seed8.bits(i);
  }
  // Independent 32-bit words collide with probability 2^-32 each.
  EXPECT_LE(same_name, 1);
  EXPECT_LE(same_seed, 1);
}

TEST(CounterRng, SlicesMatchTheFullDraw) {
  const CounterRng rng(1, "embedding");
  const uint64_t n = 1000;
  std::vector<float> full(n), part(n);
  rng.fill_normal(full.data(), 0, n, 0.02f);
  for (auto [begin, end] : {std::pair<uint64_t, uint64_t>{0, 1}, {1, 2}, {333, 777}, {999, 1000}}) {
    rng.fill_normal(part.data(), begin, end - begin, 0.02f);
    for (uint64_t i = begin; i < end; ++i) ASSERT_EQ(part[i - begin], full[i]) << i;
  }
  rng.fill_uniform(full.data(), 0, n, -0.5f, 0.25f);
  rng.fill_uniform(part.data(), 500, 100, -0.5f, 0.25f);
  for (uint64_t i = 0; i < 100; ++i) ASSERT_EQ(part[i], full[500 + i]);
}

TEST(CounterRng, NormalAndUniformMoments) {
  const CounterRng rng(2024, "moments");
  const int n = 100000;
  double sum = 0, sum_sq = 0, sum_u = 0, sum_u_sq = 0;
  int outside_1_96 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = rng.normal(i);
    ASSERT_TRUE(std::isfinite(z));
    ASSERT_LT(std::fabs(z), 6.7);
    sum += z;
    sum_sq += z * z;
    outside_1_96 += std::fabs(z) > 1.959964;
    const double u = rng.uniform(i, 1);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum_u += u;
    sum_u_sq += u * u;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  // Standard errors: mean 1/sqrt(n); variance sqrt(2/n) for a normal; tail fraction
  // sqrt(p(1-p)/n). Five of them keeps the false-failure rate negligible for a fixed seed.
  EXPECT_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(var, 1.0, 5.0 * std::sqrt(2.0 / n));
  EXPECT_NEAR(outside_1_96 / double(n), 0.05, 5.0 * std::sqrt(0.05 * 0.95 / n));
  const double mean_u = sum_u / n, var_u = sum_u_sq / n - mean_u * mean_u;
  EXPECT_NEAR(mean_u, 0.5, 5.0 * std::sqrt(1.0 / 12 / n));
  // The sample variance of U(0,1) has variance (mu4 - sigma^4)/n = (1/80 - 1/144)/n = 1/(180 n).
  EXPECT_NEAR(var_u, 1.0 / 12, 5.0 * std::sqrt(1.0 / 180 / n));
}

TEST(CounterRng, FillScalesAndStaysInRange) {
  const CounterRng rng(3, "fill");
  std::vector<float> v(1000);
  rng.fill_normal(v.data(), 10, v.size(), 0.5f);
  for (size_t j = 0; j < v.size(); ++j) ASSERT_EQ(v[j], rng.normal(10 + j) * 0.5f);
  rng.fill_uniform(v.data(), 0, v.size(), 2.0f, 2.0000002f);  // one ulp wide: rounding hazard
  for (float x : v) {
    ASSERT_GE(x, 2.0f);
    ASSERT_LT(x, 2.0000002f);
  }
}

}  // namespace
}  // namespace tessera
