// Helpers of the engine tests (tests/infer): random prompts, a model's logits over a prompt run in
// chunks over a shuffled block table, the engine run to completion, sampling settings, and a
// synthetic checkpoint loaded as an engine model. Shared by the CPU tests and the GPU tests.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "infer/engine.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera::testing {

// Model sections (export_recipe's) of the engine tests: 2 layers of 64, a 48-token context.
inline const char* kEngineGpt2 =
    "  family: gpt2\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  max_seq_len: 96\n";
inline const char* kEngineQwen3 =
    "  family: llama\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  num_kv_heads: 2\n"
    "  head_dim: 32\n  ffn_hidden: 96\n  max_seq_len: 96\n  qk_norm: true\n";
inline const char* kEngineMoe =
    "moe:\n  num_experts: 4\n  topk: 2\n  ffn_hidden: 32\n  shared_experts: 1\n"
    "  first_dense_layers: 1\n";

inline std::vector<int32_t> random_tokens(int n, uint64_t seed) {
  std::mt19937 gen{uint32_t(seed)};
  std::uniform_int_distribution<int32_t> id(0, 4095);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = id(gen);
  return t;
}

// The logits of every position of `tokens` from the engine, run as consecutive chunks of the
// given sizes over a cache of block_size blocks whose table is a shuffled set of blocks.
inline std::vector<float> engine_logits(EngineModel& m, const std::vector<int32_t>& tokens,
                                        const std::vector<int>& chunks, int block_size) {
  const int T = int(tokens.size());
  const int blocks = (T + block_size - 1) / block_size;
  KvCacheArena kv = m.make_kv_cache(blocks + 5, block_size);
  std::vector<int32_t> table(size_t(blocks + 5));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(3));
  table.resize(size_t(blocks));
  m.reserve(T, T, 1, blocks, T);
  std::vector<float> out;
  int start = 0;
  for (int n : chunks) {
    StepRows rows;
    rows.table_width = blocks;
    rows.block_tables = table;
    rows.max_context = T;
    for (int p = start; p < start + n; ++p) {
      rows.tokens.push_back(tokens[size_t(p)]);
      rows.positions.push_back(p);
      rows.slots.push_back(table[size_t(p / block_size)] * block_size + p % block_size);
      rows.seq.push_back(0);
      rows.logit_rows.push_back(p - start);
    }
    const std::vector<float>& l = m.forward(rows, kv);
    out.insert(out.end(), l.begin(), l.end());
    start += n;
  }
  EXPECT_EQ(start, T);
  return out;
}

// Max |a - b| over the first rows * V entries, relative to the largest |b|.
inline double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / std::max(scale, 1e-30);
}

inline std::shared_ptr<EngineModel> synthetic_model(const ScratchDir& dir, const char* model,
                                                    const char* extra = "",
                                                    const EngineModelOptions& o = {}) {
  const Recipe r = export_recipe(model, extra);
  return std::shared_ptr<EngineModel>(
      EngineModel::load(write_synthetic_checkpoint(dir / "run", r), o));
}

inline std::vector<int32_t> random_tokens(int n, std::mt19937& gen) {
  std::uniform_int_distribution<int32_t> id(0, 4094);  // 4095 is the end-of-text token
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = id(gen);
  return t;
}

struct Output {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason reason = FinishReason::none;
};

// Steps until every request has finished; each request's tokens, text and finish reason.
inline std::map<RequestId, Output> run_all(Engine& e) {
  std::map<RequestId, Output> out;
  for (int guard = 0; e.has_unfinished(); ++guard) {
    EXPECT_LT(guard, 10000) << "the engine does not finish";
    if (guard >= 10000) break;
    for (const EngineEvent& ev : e.step()) {
      Output& o = out[ev.id];
      if (ev.token >= 0) o.tokens.push_back(ev.token);
      o.text += ev.text;
      if (ev.finished) o.reason = ev.reason;
    }
  }
  return out;
}

inline SamplingParams greedy(int max_tokens) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = max_tokens;
  return p;
}

inline SamplingParams sampled(int max_tokens, uint64_t seed) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_p = 0.9f;
  p.top_k = 50;
  p.seed = seed;
  p.max_tokens = max_tokens;
  return p;
}

inline EngineOptions small_options(int64_t block_size, int64_t kv_blocks, int64_t token_budget) {
  EngineOptions o;
  o.block_size = block_size;
  // 2 layers x 2 KV heads x 32 dims x K and V x 4 bytes per token.
  o.kv_cache_bytes = kv_blocks * block_size * 2 * 2 * 32 * 2 * 4;
  o.scheduler.max_num_seqs = 32;
  o.scheduler.max_num_batched_tokens = token_budget;
  o.ignore_eos = true;  // random weights may well pick the end-of-text token
  return o;
}

inline std::vector<int32_t> alone(const std::shared_ptr<EngineModel>& m,
                                  const std::vector<int32_t>& p, const SamplingParams& params) {
  Engine e(m, small_options(16, 64, 256));
  const RequestId id = e.add_request(p, params);
  return run_all(e)[id].tokens;
}

}  // namespace tessera::testing
