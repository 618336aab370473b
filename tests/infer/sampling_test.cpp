// Token sampling (src/infer/sampling.*): greedy, the temperature distribution (chi-square),
// top-k / top-p / min-p on hand-computed cases, the repetition penalty, determinism per (seed,
// step) independent of the batch, validation messages, bad logits and the stop check.
#include "infer/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_error;
using testing::expect_user_error;

constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kPosInf;

SamplingParams greedy() {
  SamplingParams p;
  p.temperature = 0.0f;
  return p;
}

int32_t sample(const std::vector<float>& logits, const SamplingParams& p, int64_t step = 0,
               const std::vector<int32_t>& context = {}) {
  return sample_token(logits.data(), static_cast<int64_t>(logits.size()), p, context, step);
}

Candidates candidates(const std::vector<float>& logits, const SamplingParams& p,
                      const std::vector<int32_t>& context = {}) {
  Sampler s;
  return s.candidates(logits.data(), static_cast<int64_t>(logits.size()), p, context);
}

// Logits whose softmax at T = 1 is `probs` (up to rounding of the logs).
std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double q : probs) l.push_back(static_cast<float>(std::log(q)));
  return l;
}

// softmax(logits / T) in double.
std::vector<double> softmax(const std::vector<float>& logits, double temperature) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p;
  double total = 0.0;
  for (float l : logits) total += p.emplace_back(std::exp((l - mx) / temperature));
  for (double& q : p) q /= total;
  return p;
}

// ---- greedy ----

TEST(SamplingGreedy, ArgmaxWithTiesToTheLowestIdAndMaskedTokens) {
  EXPECT_EQ(sample({0.1f, 2.0f, -3.0f, 1.9f}, greedy()), 1);
  EXPECT_EQ(sample({1.0f, 5.0f, 5.0f, 2.0f, 5.0f}, greedy()), 1);
  EXPECT_EQ(sample({kNegInf, kNegInf, 3.0f, 3.0f, kNegInf}, greedy()), 2);
  EXPECT_EQ(sample({kNegInf, -1e30f, kNegInf}, greedy()), 1);
}

TEST(SamplingGreedy, IgnoresSeedStepAndFilters) {
  const std::vector<float> row = {0.5f, 0.7f, 0.7f, -2.0f, 0.69f};
  SamplingParams p = greedy();
  p.top_k = 3;
  p.top_p = 0.1f;
  p.min_p = 0.9f;
  for (uint64_t seed : {0ull, 1ull, 987654321ull}) {
    p.seed = seed;
    for (int64_t step : {0, 1, 1000}) EXPECT_EQ(sample(row, p, step), 1);
  }
  const Candidates c = candidates(row, p);
  EXPECT_EQ(c.ids, std::vector<int32_t>{1});
  EXPECT_EQ(c.probs, std::vector<double>{1.0});
}

// ---- temperature ----

// Pearson's statistic of `counts` against `probs` (sum over cells of (O - E)^2 / E).
double chi_square(const std::vector<int>& counts, const std::vector<double>& probs, int n) {
  double stat = 0.0;
  for (size_t v = 0; v < counts.size(); ++v) {
    const double expected = probs[v] * n;
    stat += (counts[v] - expected) * (counts[v] - expected) / expected;
  }
  return stat;
}

TEST(SamplingTemperature, EmpiricalDistributionMatchesSoftmaxOverLogitsDividedByT) {
  // 8 tokens, T = 0.7; the rarest has p ~ 0.0068, so >= 130 expected draws per cell and the
  // chi-square approximation holds. 7 degrees of freedom: P(stat > 29.88) = 1e-4 for a correct
  // sampler, and the draws are deterministic (Philox), so this either always passes or always
  // fails. A sampler that ignored T (softmax at T = 1) scores ~1700 here: checked below.
  const std::vector<float> row = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, 1.5f, -1.0f, 0.25f};
  const float temperature = 0.7f;  // the sampler divides by the float, so the test does too
  const std::vector<double> probs = softmax(row, temperature);
  constexpr int kDraws = 20000;
  constexpr double kChi2Bound = 29.88;
  SamplingParams p;
  p.temperature = temperature;
  Sampler sampler;
  std::vector<int> by_seed(row.size(), 0), by_step(row.size(), 0);
  for (int i = 0; i < kDraws; ++i) {
    p.seed = static_cast<uint64_t>(i);  // many requests, each at its first token
    ++by_seed[sampler.sample(row.data(), int64_t(row.size()), p, {}, 0)];
    p.seed = 77;  // one request, token after token
    ++by_step[sampler.sample(row.data(), int64_t(row.size()), p, {}, i)];
  }
  EXPECT_LT(chi_square(by_seed, probs, kDraws), kChi2Bound);
  EXPECT_LT(chi_square(by_step, probs, kDraws), kChi2Bound);
  EXPECT_GT(chi_square(by_seed, softmax(row, 1.0), kDraws), 10 * kChi2Bound);  // ~1700
  // The candidate distribution is exactly that softmax.
  const Candidates c = candidates(row, p);
  ASSERT_EQ(c.ids.size(), row.size());
  for (size_t i = 0; i < c.ids.size(); ++i) EXPECT_NEAR(c.probs[i], probs[c.ids[i]], 1e-12);
}

TEST(SamplingTemperature, MaskedTokensAreNeverDrawn) {
  const std::vector<float> row = {kNegInf, 0.0f, kNegInf, 0.0f, kNegInf};
  SamplingParams p;
  p.temperature = 5.0f;
  for (int64_t step = 0; step < 500; ++step) {
    const int32_t t = sample(row, p, step);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
  // One finite logit: that token, whatever the draw.
  for (int64_t step = 0; step < 20; ++step) EXPECT_EQ(sample({kNegInf, kNegInf, 7.0f}, p, step), 2);
}

// ---- top-k, top-p, min-p ----

TEST(SamplingTopK, KeepsExactlyTheKMostLikelyAndNeverSamplesOutside) {
  const CounterRng rng(5, "top-k logits");
  std::vector<float> row(64);
  rng.fill_normal(row.data(), 0, row.size(), 2.0f);
  std::vector<int32_t> by_logit(row.size());
  std::iota(by_logit.begin(), by_logit.end(), 0);
  std::sort(by_logit.begin(), by_logit.end(),
            [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  SamplingParams p;
  p.temperature = 1.5f;
  p.top_k = 5;
  const std::vector<int32_t> top5(by_logit.begin(), by_logit.begin() + 5);
  EXPECT_EQ(candidates(row, p).ids, top5);
  std::set<int32_t> seen;
  for (int64_t step = 0; step < 2000; ++step) seen.insert(sample(row, p, step));
  EXPECT_EQ(seen, std::set<int32_t>(top5.begin(), top5.end()));
  // Ties at the boundary go to the lower ids; k beyond the vocabulary keeps everything.
  p.top_k = 2;
  EXPECT_EQ(candidates({1.0f, 3.0f, 3.0f, 3.0f, 0.0f}, p).ids, (std::vector<int32_t>{1, 2}));
  p.top_k = 1000;
  EXPECT_EQ(candidates({1.0f, 3.0f, 0.0f}, p).ids, (std::vector<int32_t>{1, 0, 2}));
}

TEST(SamplingTopP, KeepsTheShortestPrefixWhoseMassReachesP) {
  // Probabilities 0.5, 0.25, 0.15, 0.1 at ids 2, 0, 3, 1 (draw order 2, 0, 3, 1).
  const std::vector<float> row = logits_of({0.25, 0.1, 0.5, 0.15});
  SamplingParams p;
  p.top_p = 0.7f;  // 0.5 < 0.7 <= 0.75
  Candidates c = candidates(row, p);
  EXPECT_EQ(c.ids, (std::vector<int32_t>{2, 0}));
  ASSERT_EQ(c.probs.size(), 2u);
  EXPECT_NEAR(c.probs[0], 0.5 / 0.75, 1e-6);
  EXPECT_NEAR(c.probs[1], 0.25 / 0.75, 1e-6);
  p.top_p = 0.8f;  // 0.75 < 0.8 <= 0.9
  EXPECT_EQ(candidates(row, p).ids, (std::vector<int32_t>{2, 0, 3}));
  p.top_p = 0.4f;  // the first token alone reaches it
  EXPECT_EQ(candidates(row, p).ids, std::vector<int32_t>{2});
  p.top_p = 1e-6f;  // at least one token
  EXPECT_EQ(candidates(row, p).ids, std::vector<int32_t>{2});
  p.top_p = 1.0f;
  EXPECT_EQ(candidates(row, p).ids, (std::vector<int32_t>{2, 0, 3, 1}));
  p.top_p = 0.8f;
  for (int64_t step = 0; step < 1000; ++step) EXPECT_NE(sample(row, p, step), 1);
}

TEST(SamplingTopP, AppliesToTheTopKRenormalizedDistribution) {
  // 0.4, 0.3, 0.2, 0.1; top-k 2 renormalizes to 4/7, 3/7, so top-p 0.5 keeps one token (it would
  // keep two over the original probabilities, where 0.4 < 0.5).
  const std::vector<float> row = logits_of({0.4, 0.3, 0.2, 0.1});
  SamplingParams p;
  p.top_p = 0.5f;
  EXPECT_EQ(candidates(row, p).ids, (std::vector<int32_t>{0, 1}));
  p.top_k = 2;
  EXPECT_EQ(candidates(row, p).ids, std::vector<int32_t>{0});
}

TEST(SamplingMinP, KeepsTokensAboveMinPTimesTheMax) {
  const std::vector<float> row = logits_of({0.1, 0.5, 0.15, 0.25});
  SamplingParams p;
  p.min_p = 0.25f;  // threshold 0.125: 0.1 goes
  EXPECT_EQ(candidates(row, p).ids, (std::vector<int32_t>{1, 3, 2}));
  p.min_p = 0.4f;  // threshold 0.2
  EXPECT_EQ(candidates(row, p).ids, (std::vector<int32_t>{1, 3}));
  p.min_p = 1.0f;  // only the max
  EXPECT_EQ(candidates(row, p).ids, std::vector<int32_t>{1});
  // After temperature: T = 0.5 squares the ratios (0.25/0.5)^2 = 0.25 < 0.4, so only the max.
  p.min_p = 0.4f;
  p.temperature = 0.5f;
  EXPECT_EQ(candidates(row, p).ids, std::vector<int32_t>{1});
}

// ---- repetition penalty ----

TEST(SamplingRepetitionPenalty, DividesPositiveAndMultipliesNegativeLogitsOnce) {
  // Penalty 2 on ids 0 (logit 2 -> 1), 1 (-1 -> -2; twice in the context, penalized once) and 4
  // (0 stays 0); ids 2 and 3 are untouched.
  const std::vector<float> row = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f};
  const std::vector<int32_t> context = {0, 1, 1, 4};
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  const std::vector<double> want = softmax({1.0f, -2.0f, 0.5f, 3.0f, 0.0f}, 1.0);
  const Candidates c = candidates(row, p, context);
  ASSERT_EQ(c.ids, (std::vector<int32_t>{3, 0, 2, 4, 1}));
  for (size_t i = 0; i < c.ids.size(); ++i) EXPECT_NEAR(c.probs[i], want[c.ids[i]], 1e-12);
  // Greedy sees the penalized logits: 3 / 2 < 2 and -1 * 2 < -1.5.
  SamplingParams g = greedy();
  g.repetition_penalty = 2.0f;
  EXPECT_EQ(sample({3.0f, 2.0f}, g, 0, {0}), 1);
  EXPECT_EQ(sample({-1.0f, -1.5f}, g, 0, {0}), 1);
  EXPECT_EQ(sample({3.0f, 2.0f}, greedy(), 0, {0}), 0);  // penalty 1 = off
  // A penalty below 1 encourages repetition instead.
  g.repetition_penalty = 0.5f;
  EXPECT_EQ(sample({1.0f, 1.5f}, g, 0, {0}), 0);
}

// ---- determinism ----

TEST(SamplingDeterminism, SameSeedAndStepGiveTheSameToken) {
  const std::vector<float> row(16, 0.0f);  // uniform: every draw shows in the token
  SamplingParams p;
  p.seed = 31337;
  Sampler a, b;
  for (int64_t step = 0; step < 200; ++step)
    EXPECT_EQ(a.sample(row.data(), 16, p, {}, step), b.sample(row.data(), 16, p, {}, step));
}

TEST(SamplingDeterminism, DifferentStepsAndSeedsDrawDifferently) {
  const std::vector<float> row(16, 0.0f);
  SamplingParams p, q;
  p.seed = 1;
  q.seed = 2;
  std::set<int32_t> over_steps, over_seeds;
  int same = 0;
  for (int64_t i = 0; i < 200; ++i) {
    over_steps.insert(sample(row, p, i));
    same += sample(row, p, i) == sample(row, q, i);
    SamplingParams r;
    r.seed = static_cast<uint64_t>(i);
    over_seeds.insert(sample(row, r, 0));
  }
  // 200 uniform draws over 16 tokens miss a given token with probability (15/16)^200 ~ 2.5e-6;
  // two independent sequences agree ~200/16 = 12.5 times (sd 3.4).
  EXPECT_EQ(over_steps.size(), 16u);
  EXPECT_EQ(over_seeds.size(), 16u);
  EXPECT_LT(same, 30);
}

TEST(SamplingDeterminism, PinnedDraws) {
  // Bit-for-bit reproducibility across builds and machines: these tokens were recorded once; a
  // change means the RNG keying, the order or the arithmetic of the draw changed.
  const std::vector<float> row = {0.3f, -0.2f, 1.1f, 0.0f, 0.7f, -1.5f, 0.9f, 0.1f};
  SamplingParams p;
  p.seed = 20240601;
  p.temperature = 0.8f;
  p.top_p = 0.9f;
  std::vector<int32_t> got;
  for (int64_t step = 0; step < 12; ++step) got.push_back(sample(row, p, step));
  EXPECT_EQ(got, (std::vector<int32_t>{0, 2, 6, 0, 2, 7, 0, 6, 2, 2, 6, 4}));
}

// A request of the batch-independence test: its own parameters, vocabulary and logits.
struct Request {
  SamplingParams params;
  int64_t vocab_size;
  std::vector<int32_t> context;  // prompt, then each generated token
};

// Request r's logits at step s: a pure function of (r, s), like a model's output for that
// request's sequence.
std::vector<float> request_logits(int r, int64_t step, int64_t vocab_size) {
  std::vector<float> row(vocab_size);
  CounterRng(uint64_t(r), "request logits")
      .fill_normal(row.data(), uint64_t(step * vocab_size), uint64_t(vocab_size), 1.5f);
  return row;
}

TEST(SamplingDeterminism, ARequestsTokensDoNotDependOnTheOtherRequests) {
  std::vector<Request> reqs(6);
  for (int r = 0; r < 6; ++r) {
    reqs[r].params.seed = 1000 + r % 3;  // some requests share a seed: still independent
    reqs[r].params.temperature = 0.6f + 0.2f * r;
    reqs[r].params.top_k = r % 2 ? 20 : 0;
    reqs[r].params.top_p = r % 3 ? 0.9f : 1.0f;
    reqs[r].params.repetition_penalty = r >= 3 ? 1.3f : 1.0f;
    reqs[r].vocab_size = 50 + 37 * r;
    reqs[r].context = {int32_t(r), int32_t(2 * r)};
  }
  constexpr int64_t kSteps = 25;
  // Alone: each request on its own Sampler, start to finish.
  std::vector<std::vector<int32_t>> alone(reqs.size());
  for (size_t r = 0; r < reqs.size(); ++r) {
    Request q = reqs[r];
    Sampler s;
    for (int64_t step = 0; step < kSteps; ++step) {
      const std::vector<float> row = request_logits(int(r), step, q.vocab_size);
      alone[r].push_back(s.sample(row.data(), q.vocab_size, q.params, q.context, step));
      q.context.push_back(alone[r].back());
    }
  }
  // Batched: one shared Sampler, requests interleaved in a shuffled order (each still in its own
  // step order, as an engine schedules them).
  std::vector<int> schedule;
  for (size_t r = 0; r < reqs.size(); ++r) schedule.insert(schedule.end(), kSteps, int(r));
  const CounterRng shuffle_rng(9, "schedule");
  for (size_t i = schedule.size() - 1; i > 0; --i)
    std::swap(schedule[i], schedule[shuffle_rng.bits(i) % (i + 1)]);
  Sampler shared;
  std::vector<std::vector<int32_t>> batched(reqs.size());
  for (const int r : schedule) {
    Request& q = reqs[r];
    const int64_t step = int64_t(batched[r].size());
    const std::vector<float> row = request_logits(r, step, q.vocab_size);
    batched[r].push_back(shared.sample(row.data(), q.vocab_size, q.params, q.context, step));
    q.context.push_back(batched[r].back());
  }
  EXPECT_EQ(batched, alone);
}

// ---- validation and bad inputs ----

TEST(SamplingValidate, DefaultsAndEdgeValuesPass) {
  validate(SamplingParams{});
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.top_k = 1;
  p.repetition_penalty = 0.01f;
  p.max_tokens = 1;
  p.stop_token_ids = {0};
  p.stop_strings = {"\n"};
  validate(p);
}

TEST(SamplingValidate, ErrorsNameTheFieldAndTheValue) {
  struct Case {
    void (*set)(SamplingParams&);
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {[](SamplingParams& p) { p.temperature = -1.0f; }, {"temperature = -1"}},
      {[](SamplingParams& p) { p.temperature = std::nanf(""); }, {"temperature = nan"}},
      {[](SamplingParams& p) { p.temperature = kPosInf; }, {"temperature = inf"}},
      {[](SamplingParams& p) { p.top_k = -1; }, {"top_k = -1"}},
      {[](SamplingParams& p) { p.top_p = 0.0f; }, {"top_p = 0 ", "(0, 1]"}},
      {[](SamplingParams& p) { p.top_p = 1.5f; }, {"top_p = 1.5"}},
      {[](SamplingParams& p) { p.top_p = std::nanf(""); }, {"top_p = nan"}},
      {[](SamplingParams& p) { p.min_p = -0.1f; }, {"min_p = -0.1"}},
      {[](SamplingParams& p) { p.min_p = 2.0f; }, {"min_p = 2"}},
      {[](SamplingParams& p) { p.repetition_penalty = 0.0f; }, {"repetition_penalty = 0 "}},
      {[](SamplingParams& p) { p.repetition_penalty = -1.0f; }, {"repetition_penalty = -1"}},
      {[](SamplingParams& p) { p.max_tokens = 0; }, {"max_tokens = 0"}},
      {[](SamplingParams& p) {
         p.stop_token_ids = {5, -3};
       },
       {"stop_token_ids[1] = -3"}},
      {[](SamplingParams& p) {
         p.stop_strings = {"a", ""};
       },
       {"stop_strings[1]", "empty"}},
  };
  for (const Case& c : cases) {
    SamplingParams p;
    c.set(p);
    expect_user_error([&] { validate(p); }, c.fragments);
  }
}

TEST(SamplingBadLogits, NaNOrPlusInfIsACheckError) {
  for (const SamplingParams& p : {greedy(), SamplingParams{}}) {
    expect_error(
        [&] {
          sample({0.0f, 1.0f, 2.0f, std::nanf(""), 0.5f}, p);
        },
        ErrorKind::bug, {"logits[3] = nan"});
    expect_error([&] { sample({0.0f, kPosInf}, p); }, ErrorKind::bug, {"logits[1] = inf"});
  }
}

TEST(SamplingBadLogits, AllMaskedIsACheckError) {
  for (const SamplingParams& p : {greedy(), SamplingParams{}})
    expect_error(
        [&] {
          sample({kNegInf, kNegInf, kNegInf}, p);
        },
        ErrorKind::bug, {"every one of the 3 logits is -inf"});
}

TEST(SamplingBadLogits, ContextIdsOutsideTheVocabularyAreACheckError) {
  for (const float penalty : {1.2f, 1.0f}) {  // checked whether or not the penalty is on
    SamplingParams p;
    p.repetition_penalty = penalty;
    expect_error(
        [&] {
          sample({0.0f, 1.0f}, p, 0, {1, 2});
        },
        ErrorKind::bug, {"context token id 2 outside the vocabulary [0, 2)"});
    expect_error(
        [&] {
          sample({0.0f, 1.0f}, p, 0, {-1});
        },
        ErrorKind::bug, {"context token id -1 outside"});
  }
}

// ---- stop conditions ----

TEST(SamplingStop, StopTokenIsTheNewestToken) {
  SamplingParams p;
  p.max_tokens = 100;
  p.stop_token_ids = {7, 9};
  const std::vector<int32_t> ended = {5, 7}, earlier = {7, 5};
  StopCheck s = check_stop(p, ended, "ab");
  EXPECT_TRUE(s.stop);
  EXPECT_EQ(s.reason, StopReason::stop_token);
  EXPECT_EQ(s.keep_chars, 2u);
  s = check_stop(p, earlier, "ab");
  EXPECT_FALSE(s.stop);
  EXPECT_EQ(s.reason, StopReason::none);
  EXPECT_EQ(s.keep_chars, 2u);
}

TEST(SamplingStop, StopStringSpanningSeveralTokensIsCutFromTheText) {
  // Tokens decode to "Hel" "lo " "wor" "ld" "!"; the stop string "lo wo" spans three of them and
  // is complete only after the third.
  SamplingParams p;
  p.max_tokens = 100;
  p.stop_strings = {"xyz", "lo wo"};
  const std::vector<std::string> pieces = {"Hel", "lo ", "wor", "ld", "!"};
  std::vector<int32_t> ids;
  std::string text;
  StopCheck s;
  for (size_t i = 0; i < pieces.size(); ++i) {
    ids.push_back(int32_t(100 + i));
    text += pieces[i];
    s = check_stop(p, ids, text);
    if (s.stop) break;
  }
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_EQ(s.reason, StopReason::stop_string);
  EXPECT_EQ(text.substr(0, s.keep_chars), "Hel");
  // The earliest occurrence of any stop string wins, and it beats max_tokens.
  p.stop_strings = {"ld", "wor", "Hello world"};
  p.max_tokens = 2;
  s = check_stop(p, std::vector<int32_t>{1, 2}, "Hello world");
  EXPECT_EQ(s.reason, StopReason::stop_string);
  EXPECT_EQ(s.keep_chars, 0u);
  p.stop_strings = {"ld", "wor"};
  s = check_stop(p, std::vector<int32_t>{1, 2}, "Hello world");
  EXPECT_EQ(s.keep_chars, 6u);
}

TEST(SamplingStop, MaxTokens) {
  SamplingParams p;
  p.max_tokens = 3;
  std::vector<int32_t> ids;
  for (int32_t t = 0; t < 3; ++t) {
    EXPECT_FALSE(check_stop(p, ids, "").stop) << ids.size();
    ids.push_back(t);
  }
  const StopCheck s = check_stop(p, ids, "abc");
  EXPECT_TRUE(s.stop);
  EXPECT_EQ(s.reason, StopReason::max_tokens);
  EXPECT_EQ(s.keep_chars, 3u);
}

}  // namespace
}  // namespace tessera
