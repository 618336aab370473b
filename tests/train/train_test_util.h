// A tiny mock-data recipe for the Run-level tests (CPU, no dataset needed), with overrides.
#pragma once
#include <string>
#include <vector>

#include "config/recipe.h"

namespace tessera::testing {

inline Recipe tiny_recipe(const std::string& out_dir, std::vector<std::string> overrides = {}) {
  const std::string text = R"(model:
  family: gpt2
  vocab_size: 64
  num_layers: 2
  hidden: 32
  num_heads: 4
  max_seq_len: 16
data:
  path: mock
  seq_len: 16
  micro_batch: 2
  grad_accum: 2
train:
  steps: 3
  device: cpu
  sample_tokens: 0
  eval_batches: 2
checkpoint:
  save_final: false
)";
  overrides.push_back("train.out_dir=" + out_dir);
  return parse_recipe(text, "tiny.yaml", overrides);
}

}  // namespace tessera::testing
