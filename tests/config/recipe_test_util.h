// Helpers for the recipe tests: a small valid recipe with known line numbers. Error checks come
// from the shared kit (tests/common/errors.h).
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/common/errors.h"

namespace tessera::testing {

// Line numbers (1-based) are relied on by the tests: model 1..7, data 8..11, train 12..14.
inline const char* kBaseRecipe = R"(model:
  family: gpt2
  vocab_size: 100
  num_layers: 2
  hidden: 32
  num_heads: 4
  max_seq_len: 16
data:
  path: data/x.h5
  seq_len: 16
  micro_batch: 2
train:
  steps: 10
  out_dir: runs/t
)";

// kBaseRecipe with a blend of two datasets in data.path (same line numbers).
inline std::string base_recipe_blend() {
  std::string text = kBaseRecipe;
  const std::string from = "path: data/x.h5";
  text.replace(text.find(from), from.size(), "path: [{path: a.h5, weight: 0.7}, {path: b.h5}]");
  return text;
}

}  // namespace tessera::testing
