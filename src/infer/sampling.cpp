// Token sampling over one logits row: parameter validation, the filter chain (penalty,
// temperature, top-k, top-p, min-p), the counter-based draw and the stop check. The order and
// the meaning of each step are documented in sampling.h; the comments here say why it is done
// this way.
#include "infer/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/rng.h"

namespace tessera {

namespace {

// The stream name that, with the request's seed, keys its Philox draws (distinct from the
// trainer's "generate" samples so the two never share draws by accident).
constexpr std::string_view kSamplingStream = "sampling";

bool finite(float x) { return std::isfinite(x); }

// A uniform double in [0, 1) with 53 random bits, a pure function of (rng key, step): two Philox
// words (sub-counters 0 and 1) so the CDF walk can resolve probabilities far below 2^-24.
double uniform53(const CounterRng& rng, uint64_t step) {
  const uint64_t hi = rng.bits(step, 0) >> 5;  // 27 bits
  const uint64_t lo = rng.bits(step, 1) >> 6;  // 26 bits
  return static_cast<double>((hi << 26) | lo) * 0x1.0p-53;
}

}  // namespace

void validate(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !finite(p.temperature))
    TS_USER_ERROR("sampling: temperature = {} must be finite and >= 0 (0 = greedy)", p.temperature);
  if (p.top_k < 0) TS_USER_ERROR("sampling: top_k = {} must be >= 0 (0 = off)", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    TS_USER_ERROR("sampling: top_p = {} must be in (0, 1] (1 = off)", p.top_p);
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    TS_USER_ERROR("sampling: min_p = {} must be in [0, 1] (0 = off)", p.min_p);
  if (!(p.repetition_penalty > 0.0f) || !finite(p.repetition_penalty))
    TS_USER_ERROR("sampling: repetition_penalty = {} must be finite and > 0 (1 = off)",
                  p.repetition_penalty);
  if (p.max_tokens < 1) TS_USER_ERROR("sampling: max_tokens = {} must be >= 1", p.max_tokens);
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i)
    if (p.stop_token_ids[i] < 0)
      TS_USER_ERROR("sampling: stop_token_ids[{}] = {} must be >= 0", i, p.stop_token_ids[i]);
  for (size_t i = 0; i < p.stop_strings.size(); ++i)
    if (p.stop_strings[i].empty())
      TS_USER_ERROR("sampling: stop_strings[{}] = \"\" is empty (it would match at once)", i);
}

int64_t Sampler::filter(const float* logits, int64_t vocab_size, const SamplingParams& p,
                        std::span<const int32_t> context_ids) {
  TS_CHECK(logits != nullptr, "sampling needs a logits row");
  TS_CHECK(vocab_size >= 1 && vocab_size <= std::numeric_limits<int32_t>::max(),
           "vocab size {} must be in [1, 2^31)", vocab_size);
  const size_t V = static_cast<size_t>(vocab_size);
  logits_.assign(logits, logits + V);
  ids_.resize(V);
  weights_.resize(V);
  for (size_t i = 0; i < V; ++i) {
    const float x = logits_[i];
    // NaN would make every comparison below false and quietly pick some token; +inf would turn
    // exp(x - max) into NaN. Both mean the forward pass is broken: say so.
    TS_CHECK(!std::isnan(x) && x != std::numeric_limits<float>::infinity(),
             "logits[{}] = {} (vocab size {}): logits must be finite or -inf (a masked token)", i,
             x, vocab_size);
  }

  // 1. Repetition penalty, computed from the raw logit so a token repeated in the context is
  // penalized once (as in Hugging Face's gather/scatter), not once per occurrence.
  for (const int32_t id : context_ids) {
    // Checked even when the penalty is off: a stray id is the caller's bug either way.
    TS_CHECK(id >= 0 && id < vocab_size, "context token id {} outside the vocabulary [0, {})", id,
             vocab_size);
    if (p.repetition_penalty == 1.0f) continue;
    const float x = logits[id];
    logits_[id] = x > 0.0f ? x / p.repetition_penalty : x * p.repetition_penalty;
  }

  // The maximum, and the lowest id holding it (the strict > keeps the first).
  size_t best = 0;
  for (size_t i = 1; i < V; ++i)
    if (logits_[i] > logits_[best]) best = i;
  const float max_logit = logits_[best];
  TS_CHECK(max_logit != -std::numeric_limits<float>::infinity(),
           "every one of the {} logits is -inf: no token can be sampled", vocab_size);

  // 2. Greedy.
  if (p.temperature == 0.0f) {
    ids_[0] = static_cast<int32_t>(best);
    weights_[0] = 1.0;
    return 1;
  }

  // Draw order: descending logit (the same order as descending probability), ties toward the
  // lower id. This comparator is a strict total order on the finite tokens, so the sorted list is
  // unique whichever sort produced it, and so is every cumulative sum taken over it.
  int64_t n = 0;
  for (size_t i = 0; i < V; ++i)
    if (logits_[i] != -std::numeric_limits<float>::infinity()) ids_[n++] = static_cast<int32_t>(i);
  const auto before = [this](int32_t a, int32_t b) {
    return logits_[a] > logits_[b] || (logits_[a] == logits_[b] && a < b);
  };
  // 4. Top-k before the temperature's exps: dividing by T > 0 keeps the order, so the best k
  // are known from the logits alone, and only they need sorting (a partial sort).
  int64_t kept = p.top_k > 0 ? std::min<int64_t>(p.top_k, n) : n;
  if (kept < n)
    std::partial_sort(ids_.begin(), ids_.begin() + kept, ids_.begin() + n, before);
  else
    std::sort(ids_.begin(), ids_.begin() + n, before);

  // 3. Temperature: weights relative to the most likely token (whose weight is exactly 1), in
  // double so that min-p's threshold and the CDF walk see the same numbers on every machine.
  const double temperature = p.temperature;
  for (int64_t i = 0; i < kept; ++i)
    weights_[i] = std::exp((static_cast<double>(logits_[ids_[i]]) - max_logit) / temperature);

  // 5. Top-p over the top-k-renormalized distribution: compare the running sum with top_p times
  // the total (the same sum in the same order), which is renormalizing without dividing.
  if (p.top_p < 1.0f) {
    double total = 0.0;
    for (int64_t i = 0; i < kept; ++i) total += weights_[i];
    const double target = static_cast<double>(p.top_p) * total;
    double cum = 0.0;
    for (int64_t i = 0; i < kept; ++i) {
      cum += weights_[i];
      if (cum >= target) {
        kept = i + 1;
        break;
      }
    }
  }

  // 6. Min-p: p_i >= min_p * p_max is weight_i >= min_p because the weights are relative to the
  // max. Weights fall along the order, so the survivors are a prefix, and the first (weight 1)
  // always survives.
  if (p.min_p > 0.0f) {
    int64_t i = 1;
    while (i < kept && weights_[i] >= static_cast<double>(p.min_p)) ++i;
    kept = i;
  }

  // Tokens whose weight underflowed to 0 can never be drawn; dropping them keeps the fallback of
  // the CDF walk (for a rounded-up u * total) on a token of nonzero probability.
  while (kept > 1 && weights_[kept - 1] == 0.0) --kept;
  return kept;
}

int32_t Sampler::sample(const float* logits, int64_t vocab_size, const SamplingParams& p,
                        std::span<const int32_t> context_ids, int64_t step) {
  TS_CHECK(step >= 0, "sampling step {} must be >= 0", step);
  const int64_t kept = filter(logits, vocab_size, p, context_ids);
  if (kept == 1) return ids_[0];
  // 7. Inverse CDF in draw order. The uniform is a function of (seed, step) alone: never a
  // stream shared between requests, whose position would depend on the batch.
  double total = 0.0;
  for (int64_t i = 0; i < kept; ++i) total += weights_[i];
  const double target = uniform53(CounterRng(p.seed, kSamplingStream), uint64_t(step)) * total;
  double cum = 0.0;
  for (int64_t i = 0; i < kept; ++i) {
    cum += weights_[i];
    if (target < cum) return ids_[i];
  }
  return ids_[kept - 1];
}

Candidates Sampler::candidates(const float* logits, int64_t vocab_size, const SamplingParams& p,
                               std::span<const int32_t> context_ids) {
  const int64_t kept = filter(logits, vocab_size, p, context_ids);
  double total = 0.0;
  for (int64_t i = 0; i < kept; ++i) total += weights_[i];
  Candidates c;
  c.ids.assign(ids_.begin(), ids_.begin() + kept);
  c.probs.resize(kept);
  for (int64_t i = 0; i < kept; ++i) c.probs[i] = weights_[i] / total;
  return c;
}

int32_t sample_token(const float* logits, int64_t vocab_size, const SamplingParams& p,
                     std::span<const int32_t> context_ids, int64_t step) {
  Sampler sampler;
  return sampler.sample(logits, vocab_size, p, context_ids, step);
}

StopCheck check_stop(const SamplingParams& p, std::span<const int32_t> generated_ids,
                     std::string_view text) {
  // The earliest occurrence of any stop string; the text before it is what the client gets.
  size_t first = std::string_view::npos;
  for (const std::string& s : p.stop_strings) {
    TS_CHECK(!s.empty(), "an empty stop string matches everywhere: validate() the params first");
    first = std::min(first, text.find(s));
  }
  if (first != std::string_view::npos) return {true, StopReason::stop_string, first};
  if (!generated_ids.empty() && std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(),
                                          generated_ids.back()) != p.stop_token_ids.end())
    return {true, StopReason::stop_token, text.size()};
  if (static_cast<int64_t>(generated_ids.size()) >= p.max_tokens)
    return {true, StopReason::max_tokens, text.size()};
  return {false, StopReason::none, text.size()};
}

}  // namespace tessera
