// The loader's contract: windows and shifted targets, determinism, every window once per epoch,
// dp ranks disjoint and together equal to one rank, any micro-batching equal, unbiased shuffles,
// in-order evaluation with padding, and the user errors.
// Tokens are 0, 1, 2, ... so a row's first input names its window (window w starts at w*T).
#include "data/loader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::expect_user_error;

std::vector<uint32_t> iota_tokens(int64_t n) {
  std::vector<uint32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), 0u);
  return t;
}

// The windows of micro-batch `micro_idx`, read back from the inputs; checks targets and bounds.
std::vector<int64_t> fill_windows(const Loader& loader, int64_t step, int micro_idx,
                                  int micro_batch, int64_t num_tokens) {
  const int T = loader.seq_len();
  std::vector<int32_t> in(static_cast<size_t>(micro_batch) * T, -7);
  std::vector<int32_t> tg(in.size(), -7);
  loader.fill(step, micro_idx, micro_batch, in.data(), tg.data());
  std::vector<int64_t> windows;
  for (int b = 0; b < micro_batch; ++b) {
    const int64_t first = in[static_cast<size_t>(b) * T];
    EXPECT_EQ(first % T, 0) << "row " << b << " does not start at a window boundary";
    for (int t = 0; t < T; ++t) {
      const size_t k = static_cast<size_t>(b) * T + t;
      EXPECT_EQ(in[k], first + t);   // a contiguous slice of the split
      EXPECT_EQ(tg[k], in[k] + 1);   // targets are inputs shifted by one
      EXPECT_LT(tg[k], num_tokens);  // never reads past the split
    }
    windows.push_back(first / T);
  }
  return windows;
}

TEST(Loader, WindowCountAndShape) {
  const auto tokens = iota_tokens(1001);
  const Loader loader(tokens, 10, 4, 1, 0, 1);
  EXPECT_EQ(loader.num_windows(), 100);  // (1001 - 1) / 10: the last token is only a target
  EXPECT_EQ(loader.steps_per_epoch(), 25);
  const Loader shorter(std::span<const uint32_t>(tokens).first(1000), 10, 4, 1, 0, 1);
  EXPECT_EQ(shorter.num_windows(), 99);
}

TEST(Loader, DeterministicAndSeedDependent) {
  const auto tokens = iota_tokens(64 * 50 + 1);
  const Loader a(tokens, 64, 8, 42, 0, 1), b(tokens, 64, 8, 42, 0, 1), c(tokens, 64, 8, 43, 0, 1);
  bool differs = false;
  for (int64_t step : {0, 1, 5, 17, 3, 0}) {  // out of order on purpose: no hidden state
    const auto wa = fill_windows(a, step, 0, 8, static_cast<int64_t>(tokens.size()));
    EXPECT_EQ(wa, fill_windows(b, step, 0, 8, static_cast<int64_t>(tokens.size())));
    differs |= wa != fill_windows(c, step, 0, 8, static_cast<int64_t>(tokens.size()));
  }
  EXPECT_TRUE(differs) << "seed 42 and 43 gave the same batches";
}

TEST(Loader, EveryWindowOncePerEpoch) {
  // G = 7 does not divide 50 windows, so batches straddle epoch boundaries.
  const auto tokens = iota_tokens(5 * 50 + 3);
  const Loader loader(tokens, 5, 7, 3, 0, 1);
  ASSERT_EQ(loader.num_windows(), 50);
  std::vector<int64_t> order;
  for (int64_t step = 0; step < 22; ++step) {  // 154 samples: three full epochs and a bit
    const auto w = fill_windows(loader, step, 0, 7, static_cast<int64_t>(tokens.size()));
    order.insert(order.end(), w.begin(), w.end());
  }
  std::vector<std::vector<int64_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> ep(order.begin() + e * 50, order.begin() + (e + 1) * 50);
    EXPECT_EQ(std::set<int64_t>(ep.begin(), ep.end()).size(), 50u) << "epoch " << e;
    EXPECT_EQ(*std::max_element(ep.begin(), ep.end()), 49);
    epochs.push_back(ep);
  }
  EXPECT_NE(epochs[0], epochs[1]) << "epochs must be reshuffled";
  for (size_t g = 0; g < order.size(); ++g)
    EXPECT_EQ(loader.window_of(static_cast<int64_t>(g)), order[g]);
}

TEST(Loader, DpRanksPartitionTheGlobalBatch) {
  const auto tokens = iota_tokens(16 * 37 + 1);
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t G = 8;
  const Loader single(tokens, 16, G, 11, 0, 1);
  for (int64_t step : {0, 3, 4, 9}) {
    const auto expected = fill_windows(single, step, 0, static_cast<int>(G), n);
    for (int world : {2, 4, 8}) {
      for (int micro : {1, 2}) {
        if ((G / world) % micro != 0) continue;
        std::vector<int64_t> got;
        for (int rank = 0; rank < world; ++rank) {
          const Loader loader(tokens, 16, G, 11, rank, world);
          for (int m = 0; m < (G / world) / micro; ++m) {
            const auto w = fill_windows(loader, step, m, micro, n);
            got.insert(got.end(), w.begin(), w.end());
          }
        }
        // Ranks in order, micro-batches in order: exactly the one-rank batch, so the ranks are
        // disjoint blocks whose union is the global batch.
        EXPECT_EQ(got, expected) << "step " << step << " dp " << world << " micro " << micro;
      }
    }
  }
}

TEST(Loader, ShuffleIsUnbiased) {
  // All 24 orders of 4 windows over 9600 epochs: about 400 each. A biased Fisher-Yates (e.g.
  // drawing j in [0, i) or [0, n)) misses or skews some; the bounds are far outside the normal
  // spread (sd ~ 20); the naive n-way swap gives some orders 300 and others 560.
  std::map<std::vector<uint32_t>, int> counts;
  for (int64_t e = 0; e < 9600; ++e) ++counts[loader_epoch_permutation(4, 5, e)];
  EXPECT_EQ(counts.size(), 24u);
  for (const auto& [perm, count] : counts) {
    EXPECT_GT(count, 320);
    EXPECT_LT(count, 480);
  }
  EXPECT_EQ(loader_epoch_permutation(1000, 5, 2), loader_epoch_permutation(1000, 5, 2));
  EXPECT_NE(loader_epoch_permutation(1000, 5, 2), loader_epoch_permutation(1000, 5, 3));
}

TEST(Loader, EvalWalksInOrderWithPadding) {
  const auto tokens = iota_tokens(4 * 10 + 1);  // 10 windows
  const int T = 4;
  for (int world : {1, 2}) {
    std::vector<int64_t> seen;
    int num_real_total = 0;
    for (int rank = 0; rank < world; ++rank) {
      const Loader loader(tokens, T, 4, 99, rank, world);
      EXPECT_EQ(loader.num_eval_batches(), 3);
      for (int64_t batch = 0; batch < loader.num_eval_batches(); ++batch) {
        const int B = 4 / world;
        std::vector<int32_t> in(B * T), tg(B * T);
        const int num_real = loader.fill_eval(batch, 0, B, in.data(), tg.data());
        num_real_total += num_real;
        for (int b = 0; b < B; ++b) {
          const int64_t expected_window = batch * 4 + rank * B + b;
          if (b < num_real) {
            EXPECT_EQ(in[b * T], expected_window * T);
            for (int t = 0; t < T; ++t) EXPECT_EQ(tg[b * T + t], in[b * T + t] + 1);
            seen.push_back(expected_window);
          } else {
            EXPECT_GE(expected_window, 10);
            for (int t = 0; t < T; ++t) {
              EXPECT_EQ(in[b * T + t], 0);
              EXPECT_EQ(tg[b * T + t], -1);
            }
          }
        }
      }
    }
    EXPECT_EQ(num_real_total, 10);
    std::sort(seen.begin(), seen.end());
    std::vector<int64_t> all(10);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(seen, all) << "dp " << world;
  }
}

TEST(Loader, Errors) {
  const auto tokens = iota_tokens(100);
  const std::span<const uint32_t> all(tokens);
  expect_user_error([&] { Loader l(all, 8, 6, 0, 0, 4, "d.h5 /train"); },
                    {"global batch of 6", "dp=4"});
  expect_user_error([&] { Loader l(all.first(8), 8, 4, 0, 0, 1, "d.h5 /val"); },
                    {"d.h5 /val", "8 tokens", "seq_len 8"});
  expect_user_error([&] { Loader l(all, 0, 4, 0, 0, 1); }, {"seq_len"});
  expect_user_error([&] { Loader l(all, 8, 4, 0, 2, 2); }, {"dp rank 2"});
  const Loader loader(tokens, 8, 4, 0, 1, 2);  // 2 sequences per rank
  std::vector<int32_t> in(3 * 8), tg(3 * 8);
  testing::expect_error([&] { loader.fill(0, 1, 2, in.data(), tg.data()); }, ErrorKind::bug,
                        {"runs past"});
  testing::expect_error([&] { loader.fill(0, 0, 3, in.data(), tg.data()); }, ErrorKind::bug,
                        {"runs past"});
}

}  // namespace
}  // namespace tessera
