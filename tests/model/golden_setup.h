// The golden check's fixed setup, shared by the generator of the initial state
// (bench/torch/make_golden_init.cpp) and the CPU test that compares against PyTorch
// (golden_test.cpp). bench/torch/make_golden.py reads the same numbers from the init checkpoint's
// meta "golden".
#pragma once
#include <string>

#include "tests/common/tiny_models.h"

namespace tessera::golden {

constexpr int kBatch = 2;     // B
constexpr int kSeq = 8;       // T (= the tiny models' max_seq_len)
constexpr int kSteps = 10;    // optimizer steps, a fresh batch each
constexpr float kLr = 1e-2f;  // constant
constexpr float kBeta1 = 0.9f, kBeta2 = 0.95f, kEps = 1e-8f, kWeightDecay = 0.1f;
constexpr float kGradClip = 1.0f;
constexpr uint64_t kSeed = 2024;

inline ModelConfig config_for(const std::string& family) {
  return family == "gpt2" ? testing::tiny_gpt2() : testing::tiny_llama();
}

// <source>/tests/fixtures/golden/<family>/init : a Tessera checkpoint (step 0) of the initial
// weights plus tensors golden.tokens / golden.targets (kSteps, B, T) i32.
inline std::string init_dir(const std::string& source_dir, const std::string& family) {
  return source_dir + "/tests/fixtures/golden/" + family + "/init";
}
// <source>/tests/fixtures/golden/<family>/golden.h5 : PyTorch's outputs (written by
// make_golden.py).
inline std::string golden_file(const std::string& source_dir, const std::string& family) {
  return source_dir + "/tests/fixtures/golden/" + family + "/golden.h5";
}

}  // namespace tessera::golden
