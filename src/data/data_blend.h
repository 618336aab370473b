// What the trainer reads: a blend of token datasets given as {path, weight} (or the synthetic
// "mock" source), opened into the train and val sources of the loaders, with the tokenizer they
// share. Not here: the recipe syntax (src/config) or the sampling rules (loader.h, blend.h).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/loader.h"

namespace tessera {

struct DataPathWeight {
  std::string path;     // an HDF5 token dataset, or "mock" (alone: uniform random tokens)
  double weight = 1.0;  // relative
};

// Sizes of the synthetic mock splits: far beyond any run, and free (tokens are computed).
inline constexpr int64_t kMockTrainTokens = int64_t(1) << 40;
inline constexpr int64_t kMockValTokens = int64_t(1) << 30;

struct DataBlend {
  std::vector<std::string> paths;
  std::string tokenizer_json;  // the shared tokenizer ("" for mock)
  std::string tokenizer_hash;  // its sha256 ("mock" for mock)
  int64_t vocab_size = 0;
  std::vector<BlendPart> train;  // each dataset's /train split with its weight
  std::vector<BlendPart> val;    // each dataset's /val split with the same weight

  // User error unless `hash` is the blend's tokenizer; names the datasets, both hashes and
  // `tokenizer_source` (e.g. "data.tokenizer = gpt2").
  void check_tokenizer_hash(std::string_view hash, std::string_view tokenizer_source) const;
};

// Opens every dataset (metadata only: the loaders read windows on demand). User errors: an empty
// list, "mock" in a blend of several, datasets whose tokenizers differ (naming both files and
// hashes), and anything TokenDataset::open refuses. For mock, `mock_vocab_size` gives the
// vocabulary and the token streams are "mock/train" and "mock/val" of `seed`.
DataBlend open_data_blend(const std::vector<DataPathWeight>& paths, uint64_t seed,
                          int64_t mock_vocab_size = 0);

}  // namespace tessera
