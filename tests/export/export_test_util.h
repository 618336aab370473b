// Synthetic checkpoints for the export tests: a recipe around a tiny model, random parameters and
// optimizer moments written by io::CheckpointWriter in any number of shards (each tensor cut into
// uneven boxes along dim 0), with padding rows in the vocabulary tables. Faster than training and
// independent of the trainer; the end-to-end test (export_cli_test.cpp) exports trained runs.
#pragma once
#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "data/dataset.h"
#include "io/checkpoint.h"
#include "model/transformer.h"
#include "tests/common/cli.h"

namespace tessera::testing {

// The tokenizer of the CI corpus (scripts/prepare-data.sh): 4096 tokens, eot 4095.
inline const TokenDataset& ci_tokens() {
  static const TokenDataset ds = TokenDataset::open(ci_dataset());
  return ds;
}

// A recipe whose model section is `model_yaml` (indented two spaces under "model:"), plus `extra`
// top-level YAML (e.g. a moe section). Vocabulary: the CI tokenizer's 4096, padded to 4160.
inline Recipe export_recipe(const std::string& model_yaml, const std::string& extra = "",
                            const std::string& compute = "fp32") {
  const std::string text =
      "model:\n  vocab_size: 4096\n  vocab_pad_multiple: 64\n  padded_vocab_size: 4160\n" +
      model_yaml + extra + "precision:\n  compute: " + compute +
      "\ndata:\n  path: " + ci_dataset() +
      "\n  seq_len: 8\n  micro_batch: 1\ntrain:\n  steps: 1\n  out_dir: unused\n";
  return parse_recipe(text, "export-test-recipe");
}

inline const char* kGpt2Model =
    "  family: gpt2\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  max_seq_len: 16\n";
inline const char* kLlamaModel =
    "  family: llama\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  num_kv_heads: 2\n"
    "  head_dim: 32\n  ffn_hidden: 96\n  max_seq_len: 16\n  qk_norm: true\n";

struct SyntheticOptions {
  int num_shards = 1;
  uint64_t seed = 7;
  bool tokenizer_json = true;  // store meta tokenizer_json (checkpoints since export)
  std::string tokenizer_hash;  // "" : the CI tokenizer's
  int64_t step = 5;
};

// Every tensor the trainer would save for `r` (parameters at full padded shape, optim moments),
// with values drawn from `seed`; by name.
inline std::map<std::string, std::vector<float>> synthetic_values(
    const Recipe& r, uint64_t seed, std::map<std::string, std::vector<int64_t>>* shapes) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::map<std::string, std::vector<float>> out;
  const ParamStore declared = Transformer::declared_params(r.model, ModelShard{});
  for (const Param& p : declared.all()) {
    const Shape s = p.spec.full_shape();
    std::vector<int64_t> dims(s.dims.begin(), s.dims.begin() + s.ndim);
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    for (const std::string& prefix :
         {std::string(), std::string("optim.m."), std::string("optim.v.")}) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = normal(gen);
      out[prefix + p.spec.name] = std::move(v);
      (*shapes)[prefix + p.spec.name] = dims;
    }
  }
  return out;
}

// Writes the checkpoint under <root>/checkpoints/step_<step>; returns the step directory.
inline std::string write_synthetic_checkpoint(const std::string& root, const Recipe& r,
                                              const SyntheticOptions& o = {}) {
  std::map<std::string, std::vector<int64_t>> shapes;
  const auto values = synthetic_values(r, o.seed, &shapes);
  const int n = o.num_shards;
  std::vector<std::unique_ptr<io::CheckpointWriter>> writers;
  for (int rank = 0; rank < n; ++rank)
    writers.push_back(std::make_unique<io::CheckpointWriter>(root, o.step, rank, n));
  for (const auto& [name, v] : values) {
    const std::vector<int64_t>& dims = shapes.at(name);
    const int64_t rows = dims[0], row_elems = int64_t(v.size()) / rows;
    // Shard k holds rows [cut[k], cut[k + 1]): uneven cuts, some shards possibly empty.
    std::vector<int64_t> cut(size_t(n + 1), 0);
    for (int k = 1; k < n; ++k) cut[k] = std::clamp(rows * k / n + (k % 2), cut[k - 1], rows);
    cut[n] = rows;
    for (int k = 0; k < n; ++k) {
      const int64_t b = cut[k], e = cut[k + 1];
      if (e <= b) continue;
      std::vector<int64_t> offset(dims.size(), 0), box = dims;
      offset[0] = b;
      box[0] = e - b;
      writers[k]->add({name, DType::f32, dims, offset, box, v.data() + b * row_elems});
    }
  }
  const TokenDataset& ds = ci_tokens();
  writers[0]->set_meta("recipe", recipe_to_yaml(r));
  writers[0]->set_meta("step", std::to_string(o.step));
  writers[0]->set_meta("tokenizer_hash",
                       o.tokenizer_hash.empty() ? ds.tokenizer_hash() : o.tokenizer_hash);
  if (o.tokenizer_json) writers[0]->set_meta("tokenizer_json", ds.tokenizer_json());
  for (auto& w : writers) w->write_shard();
  return writers[0]->finalize(0);
}

}  // namespace tessera::testing
