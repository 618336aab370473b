// Token sampling for the inference engine, on the CPU, one logits row (V floats) per request:
// SamplingParams and its validation, the Sampler (penalty, temperature, top-k, top-p, min-p, draw)
// and the stop-condition check. No batching and no logprobs here: a batch is sampled row by row,
// and each row's token depends only on its own inputs, never on the other rows.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

// What a request asks of the sampler (the vLLM / llama.cpp / OpenAI meanings).
struct SamplingParams {
  float temperature = 1.0f;               // 0 = greedy; otherwise logits are divided by it
  int32_t top_k = 0;                      // keep the k most likely tokens; 0 = off
  float top_p = 1.0f;                     // nucleus mass in (0, 1]; 1 = off
  float min_p = 0.0f;                     // keep tokens with p >= min_p * p_max, in [0, 1]; 0 = off
  float repetition_penalty = 1.0f;        // CTRL/HF rule on tokens in the context; > 0, 1 = off
  uint64_t seed = 0;                      // keys this request's random draws
  int64_t max_tokens = 16;                // generated tokens at most, >= 1
  std::vector<int32_t> stop_token_ids;    // generation stops after any of these
  std::vector<std::string> stop_strings;  // ... or when the text contains one (not returned)
};

// User error (naming the field and its value) for out-of-range parameters: temperature < 0 or not
// finite, top_k < 0, top_p outside (0, 1], min_p outside [0, 1], repetition_penalty <= 0 or not
// finite, max_tokens < 1, a negative stop token id or an empty stop string.
void validate(const SamplingParams& p);

// The distribution a draw picks from: kept token ids in draw order (descending probability, ties
// toward the lower id) with their probabilities, which sum to 1.
struct Candidates {
  std::vector<int32_t> ids;
  std::vector<double> probs;
};

// Samples one token from one logits row. The transforms run in this order:
//   1. repetition penalty on the raw logits: for every distinct token id in `context_ids` (prompt
//      and generated tokens), a positive logit is divided by the penalty, a negative one
//      multiplied by it (CTRL, Keskar et al. 2019; Hugging Face's rule);
//   2. greedy when temperature == 0: the argmax, ties toward the lowest id; steps 3-6 are skipped;
//   3. temperature: p ~ exp((logit - max) / T), in double;
//   4. top-k: the k most likely tokens (ties toward the lower id), renormalized;
//   5. top-p: the shortest prefix of the sorted tokens whose mass reaches top_p (at least one);
//   6. min-p: the tokens with p >= min_p * p_max (the most likely token always stays);
//   7. the draw: inverse CDF over the kept tokens in draw order, summed in double, with a 53-bit
//      uniform u from Philox keyed by (seed, "sampling") at counter `step`.
// So the token is a pure function of (logits, params, context, step): the same request gives the
// same tokens alone or in any batch, in any order. `step` is the index of the token being
// generated (0 for the first generated token). Logits may hold -inf (masked tokens) but at least
// one must be finite; NaN or +inf is a check error (a broken model, not a choice to make here).
//
// A class rather than a bare function so that its scratch (a copy of the row, the sorted ids and
// their weights: ~16 bytes per vocabulary entry, 2.4 MB at V = 151936) is allocated once per
// thread, not once per token. One Sampler per thread; it holds no state between calls.
class Sampler {
 public:
  int32_t sample(const float* logits, int64_t vocab_size, const SamplingParams& p,
                 std::span<const int32_t> context_ids, int64_t step);

  // The distribution `sample` draws from for these inputs (one id with probability 1 when
  // greedy). For tests and, later, logprobs.
  Candidates candidates(const float* logits, int64_t vocab_size, const SamplingParams& p,
                        std::span<const int32_t> context_ids);

 private:
  // Steps 1-6: fills ids_ and weights_ (unnormalized, the first is 1) with the kept tokens in
  // draw order and returns how many are kept.
  int64_t filter(const float* logits, int64_t vocab_size, const SamplingParams& p,
                 std::span<const int32_t> context_ids);

  std::vector<float> logits_;    // (V) the row after the repetition penalty
  std::vector<int32_t> ids_;     // (V) token ids, the kept ones first in draw order
  std::vector<double> weights_;  // (V) exp((logit - max) / T) of ids_[i]
};

// One-off convenience: a fresh Sampler per call (allocates its scratch every time).
int32_t sample_token(const float* logits, int64_t vocab_size, const SamplingParams& p,
                     std::span<const int32_t> context_ids, int64_t step);

enum class StopReason { none, stop_token, stop_string, max_tokens };

struct StopCheck {
  bool stop = false;
  StopReason reason = StopReason::none;
  // How many leading bytes of the text to return: the text up to (not including) the earliest
  // stop string, else all of it.
  size_t keep_chars = 0;
};

// Whether generation stops after the newest token. `generated_ids` are the tokens generated so
// far (the prompt excluded) and `text` their decoded text (the caller decodes; a stop token's own
// text is the caller's to skip, as special tokens usually are). Call it after every token: it
// looks at the newest id only, but searches the whole text for stop strings, so a stop string
// spanning several tokens is found and the earliest occurrence wins. Precedence when several
// hold: stop string (it trims the text), then stop token, then max_tokens.
StopCheck check_stop(const SamplingParams& p, std::span<const int32_t> generated_ids,
                     std::string_view text);

}  // namespace tessera
