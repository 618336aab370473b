// The loader's per-index permutation: a bijection of [0, n) for awkward sizes (checked whole),
// spot checks above 2^32 (images in range, no collisions among many, inverse round trips), keyed
// by the stream (seed, epoch), and unbiased over the orders of a small set.
#include "data/permutation.h"

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <vector>

namespace tessera {
namespace {

std::vector<uint64_t> materialize(const Permutation& p) {
  std::vector<uint64_t> v(p.size());
  for (uint64_t i = 0; i < p.size(); ++i) v[i] = p(i);
  return v;
}

TEST(Permutation, BijectionForAwkwardSizes) {
  for (const uint64_t n : {1ull, 2ull, 3ull, 7ull, 255ull, 256ull, 257ull, 1000003ull}) {
    const Permutation p(n, CounterRng(5, "perm/test"));
    std::vector<bool> hit(n, false);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t y = p(i);
      ASSERT_LT(y, n) << "n " << n;
      ASSERT_FALSE(hit[y]) << "n " << n << ": " << y << " hit twice";
      hit[y] = true;
      ASSERT_EQ(p.inverse(y), i) << "n " << n;
    }
  }
}

TEST(Permutation, SpotChecksBeyondTwoToThe32) {
  // A random function would collide among 200000 draws from ~2^33 values with probability ~0.9;
  // a bijection never does, and its inverse must undo every image.
  for (const uint64_t n :
       {(1ull << 32) + 15, (1ull << 33) - 1, (1ull << 40) + 3, (1ull << 62) + 1}) {
    const Permutation p(n, CounterRng(9, "perm/big"));
    std::set<uint64_t> images;
    int64_t upper_half = 0;
    for (uint64_t k = 0; k < 200000; ++k) {
      const uint64_t i = (k * 0x9E3779B97F4A7C15ull) % n;  // spread over the whole range
      const uint64_t y = p(i);
      ASSERT_LT(y, n);
      ASSERT_EQ(p.inverse(y), i);
      images.insert(y);
      upper_half += y >= n / 2;
    }
    EXPECT_EQ(images.size(), 200000u) << "n " << n;
    EXPECT_NEAR(double(upper_half) / 200000.0, 0.5, 0.01) << "n " << n;  // spread, sd 0.0011
    EXPECT_EQ(p(n - 1), p(n - 1));
    EXPECT_LT(p(n - 1), n);
  }
}

TEST(Permutation, KeyedByTheStream) {
  const auto perm = [](uint64_t seed, const char* stream) {
    return materialize(Permutation(1000, CounterRng(seed, stream)));
  };
  EXPECT_EQ(perm(5, "e/2"), perm(5, "e/2"));
  EXPECT_NE(perm(5, "e/2"), perm(5, "e/3"));
  EXPECT_NE(perm(5, "e/2"), perm(6, "e/2"));
  // Not the identity or a shift: far fewer fixed points than 1000 (about one is expected).
  const std::vector<uint64_t> v = perm(5, "e/2");
  int fixed = 0;
  for (uint64_t i = 0; i < v.size(); ++i) fixed += v[i] == i;
  EXPECT_LT(fixed, 8);
}

TEST(Permutation, ShuffleIsUnbiased) {
  // All 24 orders of 4 windows over 9600 epochs: about 400 each. The bounds are far outside the
  // normal spread (sd ~ 20); a Feistel network over only 4 elements reaches just the even
  // permutations (12 orders), which is why the domain is at least 256.
  std::map<std::vector<uint64_t>, int> counts;
  for (int64_t e = 0; e < 9600; ++e)
    ++counts[materialize(
        Permutation(4, CounterRng(5, "tessera/loader/0/epoch/" + std::to_string(e))))];
  EXPECT_EQ(counts.size(), 24u);
  for (const auto& [perm, count] : counts) {
    EXPECT_GT(count, 320);
    EXPECT_LT(count, 480);
  }
}

}  // namespace
}  // namespace tessera
