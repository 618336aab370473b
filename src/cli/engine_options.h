// The options `tessera generate` and `tessera serve` share: where and how the engine runs
// (device, dtype, KV cache, batching budgets) and the default sampling settings.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "infer/engine.h"

namespace tessera::cli {

struct EngineArgs {
  std::string device = "auto", dtype = "auto";
  double kv_cache_gb = 0.0;
  int64_t block_size = 16, max_context = 0, max_num_seqs = 64, max_batched_tokens = 2048;
  bool ignore_eos = false;
};

struct SamplingArgs {
  int64_t max_tokens = 128;
  float temperature = 0.8f, top_p = 0.95f, min_p = 0.05f, repetition_penalty = 1.0f;
  int top_k = 40;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
};

void add_engine_options(CLI::App& sub, EngineArgs& a);
void add_sampling_options(CLI::App& sub, SamplingArgs& a);

// The model on the device --device names (auto: CUDA when a GPU is visible), in --dtype (auto:
// bf16 on CUDA, fp32 on the CPU).
std::shared_ptr<EngineModel> load_engine_model(const EngineArgs& a, const std::string& path);
EngineOptions engine_options(const EngineArgs& a);
SamplingParams sampling_params(const SamplingArgs& a);  // validated (user errors)

}  // namespace tessera::cli
