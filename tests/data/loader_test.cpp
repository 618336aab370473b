// The loader's contract: windows and shifted targets, determinism, every window once per epoch,
// dp ranks disjoint and together equal to one rank, any micro-batching equal, inputs-only /
// targets-only / neither fills, in-order evaluation with padding, more than 2^32 windows, blends
// (proportions in batches, each dataset's own epochs, resume, dp split, blended evaluation), and
// the user errors. Tokens are base, base + 1, ... so a row's first input names its window (window
// w of a source with base b starts at b + w*T).
#include "data/loader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_user_error;

std::shared_ptr<const TokenSource> iota_source(int64_t n, std::string name = "iota",
                                               uint32_t base = 0) {
  std::vector<uint32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), base);
  return std::make_shared<MemoryTokenSource>(std::move(t), int64_t(base) + n + 1, std::move(name));
}

Loader one_source(int64_t num_tokens, int T, int64_t G, uint64_t seed, int rank = 0,
                  int world = 1) {
  return Loader({{iota_source(num_tokens), 1.0}}, {T, G, seed, rank, world});
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
  const Loader loader = one_source(1001, 10, 4, 1);
  EXPECT_EQ(loader.num_windows(), 100);  // (1001 - 1) / 10: the last token is only a target
  EXPECT_EQ(loader.local_batch(), 4);
  EXPECT_EQ(one_source(1000, 10, 4, 1).num_windows(), 99);
}

TEST(Loader, DeterministicAndSeedDependent) {
  const int64_t n = 64 * 50 + 1;
  const Loader a = one_source(n, 64, 8, 42), b = one_source(n, 64, 8, 42);
  const Loader c = one_source(n, 64, 8, 43);
  bool differs = false;
  for (int64_t step : {0, 1, 5, 17, 3, 0}) {  // out of order on purpose: no hidden state
    const auto wa = fill_windows(a, step, 0, 8, n);
    EXPECT_EQ(wa, fill_windows(b, step, 0, 8, n));
    differs |= wa != fill_windows(c, step, 0, 8, n);
  }
  EXPECT_TRUE(differs) << "seed 42 and 43 gave the same batches";
}

TEST(Loader, EveryWindowOncePerEpoch) {
  // G = 7 does not divide 50 windows, so batches straddle epoch boundaries.
  const int64_t n = 5 * 50 + 3;
  const Loader loader = one_source(n, 5, 7, 3);
  ASSERT_EQ(loader.num_windows(), 50);
  std::vector<int64_t> order;
  for (int64_t step = 0; step < 22; ++step) {  // 154 samples: three full epochs and a bit
    const auto w = fill_windows(loader, step, 0, 7, n);
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
    EXPECT_EQ(loader.window_of(static_cast<int64_t>(g)).window, order[g]);
}

TEST(Loader, DpRanksPartitionTheGlobalBatch) {
  const int64_t n = 16 * 37 + 1;
  const int64_t G = 8;
  const Loader single = one_source(n, 16, G, 11);
  for (int64_t step : {0, 3, 4, 9}) {
    const auto expected = fill_windows(single, step, 0, static_cast<int>(G), n);
    for (int world : {2, 4, 8}) {
      for (int micro : {1, 2}) {
        if ((G / world) % micro != 0) continue;
        std::vector<int64_t> got;
        for (int rank = 0; rank < world; ++rank) {
          const Loader loader = one_source(n, 16, G, 11, rank, world);
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

TEST(Loader, InputsOnlyTargetsOnlyAndNeither) {
  // Pipeline stages ask for part of a batch: each part equals the same part of a full fill.
  const int64_t n = 16 * 40 + 1;
  const Loader loader = one_source(n, 16, 8, 5);
  const size_t size = 4 * 16;
  std::vector<int32_t> in(size), tg(size), in_only(size, -9), tg_only(size, -9), none(size, -9);
  for (int64_t step : {0, 7}) {
    loader.fill(step, 1, 4, in.data(), tg.data());
    loader.fill(step, 1, 4, in_only.data(), nullptr);
    loader.fill(step, 1, 4, nullptr, tg_only.data());
    loader.fill(step, 1, 4, nullptr, nullptr);
    EXPECT_EQ(in_only, in);
    EXPECT_EQ(tg_only, tg);
    std::vector<int32_t> eval_in(size, -9), eval_tg(size, -9);
    EXPECT_EQ(loader.fill_eval(step % 5, 0, 4, eval_in.data(), nullptr), 4);  // 5 eval batches
    EXPECT_EQ(loader.fill_eval(step % 5, 0, 4, nullptr, eval_tg.data()), 4);
    EXPECT_EQ(eval_tg[0], eval_in[0] + 1);
  }
  EXPECT_EQ(none, std::vector<int32_t>(size, -9));
}

TEST(Loader, EvalWalksInOrderWithPadding) {
  const int T = 4;
  for (int world : {1, 2}) {
    std::vector<int64_t> seen;
    int num_real_total = 0;
    for (int rank = 0; rank < world; ++rank) {
      const Loader loader = one_source(4 * 10 + 1, T, 4, 99, rank, world);  // 10 windows
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

TEST(Loader, MoreThanTwoToThe32Windows) {
  // A synthetic source of 2^40 tokens: 2^33 - 1 windows of 128, far past any 32-bit index.
  const int T = 128;
  const auto source = std::make_shared<MockTokenSource>(7, "big", 50000, int64_t(1) << 40);
  const Loader loader({{source, 1.0}}, {T, 64, 7, 0, 1});
  EXPECT_EQ(loader.num_windows(), ((int64_t(1) << 40) - 1) / T);
  std::set<int64_t> windows;
  bool beyond_32_bits = false;
  for (int64_t step : {int64_t(0), int64_t(1) << 20, (int64_t(1) << 27) + 5}) {  // ~2^33 samples
    for (int64_t j = 0; j < 64; ++j) {
      const int64_t w = loader.window_of(step * 64 + j).window;
      ASSERT_GE(w, 0);
      ASSERT_LT(w, loader.num_windows());
      beyond_32_bits |= w > int64_t(UINT32_MAX);
      windows.insert(w);
    }
    std::vector<int32_t> in(64 * T), tg(64 * T), want(T + 1);
    loader.fill(step, 0, 64, in.data(), tg.data());
    const int64_t w0 = loader.window_of(step * 64).window;
    source->read(w0 * T, T + 1, want.data());
    EXPECT_TRUE(std::equal(want.begin(), want.end() - 1, in.begin()));
    EXPECT_TRUE(std::equal(want.begin() + 1, want.end(), tg.begin()));
  }
  EXPECT_EQ(windows.size(), 3u * 64);  // distinct: one epoch has not ended
  EXPECT_TRUE(beyond_32_bits);
}

// --- blends -----------------------------------------------------------------------------------

// Three datasets of 40, 23 and 7 windows (T = 4) whose tokens start at 0, 10^6 and 2 * 10^6, so
// an input names its dataset and window.
std::vector<BlendPart> three_parts(double w0, double w1, double w2) {
  return {{iota_source(4 * 40 + 1, "a.h5 /train", 0), w0},
          {iota_source(4 * 23 + 1, "b.h5 /train", 1000000), w1},
          {iota_source(4 * 7 + 1, "c.h5 /train", 2000000), w2}};
}

struct Row {
  int dataset;
  int64_t window;
  bool operator==(const Row&) const = default;
};

std::vector<Row> blend_rows(const Loader& loader, int64_t step, int micro_idx, int B) {
  const int T = loader.seq_len();
  std::vector<int32_t> in(size_t(B) * T), tg(in.size());
  loader.fill(step, micro_idx, B, in.data(), tg.data());
  std::vector<Row> rows;
  for (int b = 0; b < B; ++b) {
    const int32_t first = in[size_t(b) * T];
    EXPECT_EQ(tg[size_t(b) * T], first + 1);
    rows.push_back({first / 1000000, (first % 1000000) / T});
  }
  return rows;
}

TEST(LoaderBlend, BatchesFollowTheScheduleAndEachDatasetItsOwnEpochs) {
  const int64_t G = 6;
  const Loader loader(three_parts(0.5, 0.3, 0.2), {4, G, 21, 0, 1});
  ASSERT_EQ(loader.num_datasets(), 3);
  std::vector<std::vector<int64_t>> per_dataset(3);
  std::vector<int64_t> counts(3, 0);
  for (int64_t step = 0; step < 100; ++step) {
    const std::vector<Row> rows = blend_rows(loader, step, 0, int(G));
    for (int64_t j = 0; j < G; ++j) {
      const Row& r = rows[size_t(j)];
      EXPECT_EQ(r.dataset, loader.schedule().pick(step * G + j).dataset);
      per_dataset[size_t(r.dataset)].push_back(r.window);
      ++counts[size_t(r.dataset)];
      // Proportions: within 1 of n * w_d after every prefix of n samples.
      const int64_t n = step * G + j + 1;
      for (int d = 0; d < 3; ++d)
        EXPECT_LT(std::abs(double(counts[size_t(d)]) - double(n) * (d == 0   ? 0.5
                                                                    : d == 1 ? 0.3
                                                                             : 0.2)),
                  1.0)
            << "after " << n << " samples, dataset " << d;
    }
  }
  // Each dataset walks its own windows: every window once per epoch of its own, reshuffled.
  for (int d = 0; d < 3; ++d) {
    const int64_t nw = loader.num_windows(d);
    const auto& seq = per_dataset[size_t(d)];
    ASSERT_GE(int64_t(seq.size()), 2 * nw) << d;
    for (int e = 0; e < 2; ++e) {
      const std::set<int64_t> epoch(seq.begin() + e * nw, seq.begin() + (e + 1) * nw);
      EXPECT_EQ(int64_t(epoch.size()), nw) << "dataset " << d << " epoch " << e;
      EXPECT_EQ(*epoch.rbegin(), nw - 1);
    }
    EXPECT_FALSE(std::equal(seq.begin(), seq.begin() + nw, seq.begin() + nw)) << d;
  }
}

TEST(LoaderBlend, ResumeAndDpLayoutsSeeTheSameSamples) {
  const int64_t G = 12;
  const Loader single(three_parts(3, 2, 1), {4, G, 8, 0, 1});
  // "Resume": a fresh loader asked for step s directly equals the uninterrupted run's step s.
  std::vector<std::vector<Row>> run;
  for (int64_t step = 0; step < 30; ++step) run.push_back(blend_rows(single, step, 0, int(G)));
  const Loader resumed(three_parts(3, 2, 1), {4, G, 8, 0, 1});
  for (int64_t step : {29, 17, 0, 23}) EXPECT_EQ(blend_rows(resumed, step, 0, int(G)), run[step]);
  for (int world : {2, 3, 4, 6}) {
    for (int64_t step : {0, 13, 29}) {
      std::vector<Row> got;
      for (int rank = 0; rank < world; ++rank) {
        const Loader loader(three_parts(3, 2, 1), {4, G, 8, rank, world});
        for (int m = 0; m < int(G / world); ++m) {  // micro-batches of one sequence
          const auto rows = blend_rows(loader, step, m, 1);
          got.insert(got.end(), rows.begin(), rows.end());
        }
      }
      EXPECT_EQ(got, run[size_t(step)]) << "dp " << world << " step " << step;
    }
  }
}

TEST(LoaderBlend, EvalWalksEachValSplitInOrderInTheMix) {
  // Weights 1:1:1 over 40, 23 and 7 windows, served in the order 0, 1, 2 of each period of 3: the
  // eval set ends where dataset 2 runs out (its 8th sample, window 7, would be global index 23).
  const int64_t G = 4;
  const Loader loader(three_parts(1, 1, 1), {4, G, 0, 0, 1});
  EXPECT_EQ(loader.num_eval_samples(), 23);
  EXPECT_EQ(loader.num_eval_batches(), 6);
  std::vector<int64_t> next(3, 0);
  int num_real = 0;
  for (int64_t batch = 0; batch < loader.num_eval_batches(); ++batch) {
    std::vector<int32_t> in(G * 4), tg(G * 4);
    const int real = loader.fill_eval(batch, 0, int(G), in.data(), tg.data());
    num_real += real;
    for (int b = 0; b < real; ++b) {
      const int d = in[size_t(b) * 4] / 1000000;
      EXPECT_EQ(d, loader.schedule().pick(batch * G + b).dataset);
      EXPECT_EQ((in[size_t(b) * 4] % 1000000) / 4, next[size_t(d)]++) << "in order";
    }
    for (int b = real; b < int(G); ++b) EXPECT_EQ(tg[size_t(b) * 4], -1);
  }
  EXPECT_EQ(num_real, 23);
  EXPECT_EQ(next, (std::vector<int64_t>{8, 8, 7}));
}

TEST(Loader, Errors) {
  const auto src = iota_source(100, "d.h5 /train");
  expect_user_error(
      [&] {
        Loader l({{src, 1.0}}, {8, 6, 0, 0, 4});
      },
      {"global batch of 6", "dp=4"});
  expect_user_error(
      [&] {
        Loader l({{iota_source(8, "d.h5 /val"), 1.0}}, {8, 4, 0, 0, 1});
      },
      {"d.h5 /val", "8 tokens", "seq_len 8"});
  expect_user_error([&] { Loader l({{src, 1.0}}, {0, 4, 0, 0, 1}); }, {"seq_len"});
  expect_user_error([&] { Loader l({{src, 1.0}}, {8, 4, 0, 2, 2}); }, {"dp rank 2"});
  expect_user_error([&] { Loader l({}, {8, 4, 0, 0, 1}); }, {"no datasets"});
  expect_user_error(
      [&] {
        Loader l({{src, 1.0}, {iota_source(50, "e.h5 /train"), 0.0}}, {8, 4, 0, 0, 1});
      },
      {"e.h5 /train", "weight 0", "positive"});
  expect_user_error([&] { Loader l({{src, -2.0}}, {8, 4, 0, 0, 1}); }, {"d.h5 /train", "-2"});
  const Loader loader({{src, 1.0}}, {8, 4, 0, 1, 2});  // 2 sequences per rank
  std::vector<int32_t> in(3 * 8), tg(3 * 8);
  testing::expect_error([&] { loader.fill(0, 1, 2, in.data(), tg.data()); }, ErrorKind::bug,
                        {"runs past"});
  testing::expect_error([&] { loader.fill(0, 0, 3, in.data(), tg.data()); }, ErrorKind::bug,
                        {"runs past"});
  // An id outside the vocabulary is found when its window is read.
  const auto bad =
      std::make_shared<MemoryTokenSource>(std::vector<uint32_t>(41, 60), 50, "x.h5 /train");
  const Loader reads_bad({{bad, 1.0}}, {8, 1, 0, 0, 1});
  expect_user_error([&] { reads_bad.fill(0, 0, 1, in.data(), tg.data()); },
                    {"x.h5 /train", "token id 60", "vocab_size 50"});
}

}  // namespace
}  // namespace tessera
