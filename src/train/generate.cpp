// Sampling loop: forward over the (right-padded) window, read the logits at the last real
// position, sample among the real vocabulary (padding columns never sampled).
#include "train/generate.h"

#include <algorithm>
#include <cmath>

#include "core/log.h"
#include "core/rng.h"

namespace tessera {

std::vector<int32_t> generate(const Transformer& model, Activations& acts,
                              const std::vector<int32_t>& prompt, int num_tokens, float temperature,
                              uint64_t seed, int32_t stop_token) {
  TS_CHECK(acts.B() == 1, "generate needs batch-1 activations, got {}", acts.B());
  TS_CHECK(!prompt.empty(), "generate needs a non-empty prompt");
  const int T = acts.T();
  const int V = model.config().vocab_size, Vp = model.config().padded_vocab_size;
  const CounterRng rng(seed, "generate");
  std::vector<int32_t> seq = prompt, window(T);
  std::vector<float> row(Vp);
  Buffer tokens_dev(model.device(), sizeof(int32_t) * T);
  Tensor tokens(tokens_dev.data(), DType::i32, model.device(), {1, T});
  for (int i = 0; i < num_tokens; ++i) {
    // Causal attention: padding after the last real token cannot affect its logits.
    const int len = std::min<int>(T, static_cast<int>(seq.size()));
    std::fill(window.begin(), window.end(), 0);
    std::copy(seq.end() - len, seq.end(), window.begin());
    copy_bytes(tokens.data, tokens.device, window.data(), Device::cpu, sizeof(int32_t) * T);
    model.forward(acts, tokens, Tensor());
    const Tensor logits = model.logits(acts).slice(len - 1, len);  // (1, Vp)
    // Download the row in its own dtype (f32, or bf16 on the GPU), then widen on the host.
    std::vector<char> raw(logits.nbytes());
    copy_bytes(raw.data(), Device::cpu, logits.data, logits.device, raw.size());
    convert_buffer(raw.data(), logits.dtype, row.data(), DType::f32, Vp);
    int32_t next = 0;
    if (temperature <= 0.0f) {
      next = static_cast<int32_t>(std::max_element(row.begin(), row.begin() + V) - row.begin());
    } else {
      const float mx = *std::max_element(row.begin(), row.begin() + V);
      double total = 0.0;
      std::vector<double> p(V);
      for (int v = 0; v < V; ++v) total += p[v] = std::exp(double(row[v] - mx) / temperature);
      double u = rng.uniform(static_cast<uint64_t>(i)) * total;
      next = V - 1;
      for (int v = 0; v < V; ++v) {
        if ((u -= p[v]) < 0) {
          next = v;
          break;
        }
      }
    }
    seq.push_back(next);
    if (next == stop_token) break;
  }
  return std::vector<int32_t>(seq.begin() + prompt.size(), seq.end());
}

void print_samples(Run& run) {
  const Recipe& r = run.recipe();
  const Tokenizer* tokenizer = run.data().tokenizer();
  if (!tokenizer || r.train.sample_tokens == 0 || r.train.num_samples == 0 || !run.rank0()) return;
  if (r.parallel.tp > 1 || r.parallel.pp > 1 || r.parallel.ep > 1) {
    log_info("samples skipped: generation needs tp = pp = ep = 1 (this run has tp {} pp {} ep {})",
             r.parallel.tp, r.parallel.pp, r.parallel.ep);
    return;
  }
  if (run.fp8()) run.fp8()->set_recording(false);
  Activations acts(run.model(), 1, r.data.seq_len, /*training=*/false, nullptr);
  std::vector<int32_t> prompt = r.train.sample_prompt.empty()
                                    ? std::vector<int32_t>{}
                                    : tokenizer->encode(r.train.sample_prompt);
  if (prompt.empty()) prompt.push_back(tokenizer->eot_id() >= 0 ? tokenizer->eot_id() : 0);
  for (int i = 0; i < r.train.num_samples; ++i) {
    const auto ids = generate(run.model(), acts, prompt, r.train.sample_tokens,
                              r.train.sample_temperature, r.train.seed + i, tokenizer->eot_id());
    log_info("sample {}: {}{}", i, r.train.sample_prompt, tokenizer->decode(ids));
  }
}

}  // namespace tessera
