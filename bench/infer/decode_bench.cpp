// Decode speed of the inference engine on random weights of a named shape: B requests of P random
// prompt tokens each generate G tokens greedily (end-of-text ignored: there is no tokenizer).
// Prints the decode phase's time per step and tokens/s, and the HBM roofline of that step: every
// weight byte plus the K/V bytes of every request's context read once, over --bandwidth-gbs.
// bench/gpu_infer.sh runs it on the GPU beside bench/torch/decode.py; it also runs on the CPU.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include <fmt/format.h>

#include "core/error.h"
#include "core/memory.h"
#include "infer/engine.h"

namespace tessera {
namespace {

// The shapes benchmarked: Llama-3.2-1B (recipes/llama-1b.yaml), Llama-3-8B, and a tiny one for
// checking the tool on the CPU.
ModelConfig shape(const std::string& name) {
  ModelConfig c = model_defaults_for_family(ModelFamily::llama);
  c.vocab_size = 128256;
  c.max_seq_len = 4096;
  c.rope_theta = 500000.0f;
  c.norm_eps = 1e-5f;
  if (name == "llama-1b") {
    c.num_layers = 16, c.hidden = 2048, c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 64;
    c.ffn_hidden = 8192, c.tied_embeddings = true;
  } else if (name == "llama3-8b") {
    c.num_layers = 32, c.hidden = 4096, c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 128;
    c.ffn_hidden = 14336, c.tied_embeddings = false;
  } else if (name == "tiny") {
    c.vocab_size = 4096, c.num_layers = 4, c.hidden = 128, c.num_heads = 4, c.num_kv_heads = 2;
    c.head_dim = 32, c.ffn_hidden = 384, c.tied_embeddings = true;
  } else {
    TS_USER_ERROR("--shape {}: not llama-1b, llama3-8b or tiny", name);
  }
  c.padded_vocab_size = c.vocab_size;
  return c;
}

struct Args {
  std::string shape = "llama-1b", weights = "bf16", device = "cuda";
  int batch = 1, prompt = 128, tokens = 256;
  double bandwidth_gbs = 0.0;
};

int run(const Args& a) {
  const ModelConfig cfg = shape(a.shape);
  EngineModelOptions mo;
  mo.device = a.device == "cuda" ? Device::cuda : Device::cpu;
  mo.dtype = mo.device == Device::cuda ? DType::bf16 : DType::f32;
  SyntheticWeights w;
  if (a.weights == "bf16" || a.weights == "f32") {
    w.format = "float";
  } else if (a.weights == "int8") {
    w.format = "int8";
  } else if (a.weights.rfind("int4-g", 0) == 0) {
    w.format = "int4";
    w.group = std::stoi(a.weights.substr(6));
  } else {
    TS_USER_ERROR("--weights {}: not bf16, f32, int8 or int4-gN", a.weights);
  }
  auto model = std::shared_ptr<EngineModel>(EngineModel::synthetic(cfg, w, mo));
  EngineOptions eo;
  eo.ignore_eos = true;
  eo.max_context = a.prompt + a.tokens;
  eo.scheduler.max_num_seqs = std::max(a.batch, 1);
  eo.scheduler.max_num_batched_tokens = std::max<int64_t>(int64_t(a.batch) * a.prompt, a.batch);
  eo.kv_cache_bytes = 0;  // the default: all it needs fits
  Engine engine(model, eo);
  std::mt19937 gen(7);
  std::uniform_int_distribution<int32_t> id(0, int32_t(cfg.vocab_size - 1));
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = a.tokens;
  for (int b = 0; b < a.batch; ++b) {
    std::vector<int32_t> prompt(size_t(a.prompt));
    for (int32_t& t : prompt) t = id(gen);
    engine.add_request(prompt, p);
  }
  // The first step is the prefill of every prompt (the token budget holds them all); the rest are
  // decodes of the whole batch. The first decodes warm up (allocations, caches).
  std::vector<double> step_s;
  while (engine.has_unfinished()) {
    const auto t0 = std::chrono::steady_clock::now();
    engine.step();
    step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const size_t warm = std::min<size_t>(8, step_s.size() / 4);
  std::vector<double> decode(step_s.begin() + 1 + ptrdiff_t(warm), step_s.end());
  std::sort(decode.begin(), decode.end());
  const double med = decode[decode.size() / 2];
  const double kv_token = 2.0 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim() *
                          double(dtype_size(mo.dtype));
  const double ctx = a.prompt + a.tokens / 2.0;  // mean context of the decode steps
  const double bytes = double(model->weight_bytes()) + a.batch * ctx * kv_token;
  fmt::print("decode shape={} weights={} ({}) device={} batch={} prompt={} tokens={}\n", a.shape,
             a.weights, model->weight_format(), a.device, a.batch, a.prompt, a.tokens);
  fmt::print("  weights {:.3f} GB, KV read per step {:.3f} GB (mean context {:.0f})\n",
             model->weight_bytes() / 1e9, a.batch * ctx * kv_token / 1e9, ctx);
  fmt::print(
      "  prefill {:.2f} ms; decode step median {:.3f} ms, p10 {:.3f}, p90 {:.3f}: "
      "{:.1f} tokens/s\n",
      step_s[0] * 1e3, med * 1e3, decode[decode.size() / 10] * 1e3,
      decode[decode.size() * 9 / 10] * 1e3, a.batch / med);
  if (a.bandwidth_gbs > 0) {
    const double roof = bytes / (a.bandwidth_gbs * 1e9);
    fmt::print("  roofline {:.3f} ms/step at {:.0f} GB/s: {:.1f} tokens/s; achieved {:.1f}%\n",
               roof * 1e3, a.bandwidth_gbs, a.batch / roof, 100.0 * roof / med);
  }
  fmt::print(
      "RESULT shape={} weights={} batch={} tokens_per_s={:.2f} step_ms={:.4f} "
      "roofline_fraction={:.4f}\n",
      a.shape, a.weights, a.batch, a.batch / med, med * 1e3,
      a.bandwidth_gbs > 0 ? bytes / (a.bandwidth_gbs * 1e9) / med : 0.0);
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::Args a;
  CLI::App app("decode speed of the inference engine on random weights");
  app.add_option("--shape", a.shape, "llama-1b, llama3-8b or tiny")->capture_default_str();
  app.add_option("--weights", a.weights, "bf16, f32 (cpu), int8, int4-g32, int4-g128, ...")
      ->capture_default_str();
  app.add_option("--device", a.device, "cuda or cpu")->capture_default_str();
  app.add_option("--batch", a.batch, "requests decoding together")->capture_default_str();
  app.add_option("--prompt", a.prompt, "prompt tokens of each request")->capture_default_str();
  app.add_option("--tokens", a.tokens, "tokens each request generates")->capture_default_str();
  app.add_option("--bandwidth-gbs", a.bandwidth_gbs,
                 "memory bandwidth for the roofline, GB/s (H100 SXM 3350, H200 4800)");
  CLI11_PARSE(app, argc, argv);
  try {
    return tessera::run(a);
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return e.exit_code();
  }
}
