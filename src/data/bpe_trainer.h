// Byte-level BPE training: learns merges from texts and returns a Tokenizer (which saves itself as
// tokenizer.json). Encoding, loading and saving are in tokenizer.h.
//
// Vocabulary layout: ids 0..255 are the single bytes (id = byte value), then one id per new token
// in the order merges made it, then the special tokens in the order given. vocab_size counts all
// three; training stops early (smaller vocabulary, with a warning) if no pair occurs at least
// min_frequency times.
//
// Tie-breaking (what makes training deterministic): each step merges the adjacent pair with the
// highest count, summed over all words; among equal counts, the pair whose (left token bytes,
// right token bytes) is lexicographically smallest, comparing bytes as unsigned. The result depends
// only on the multiset of texts, not on their order, thread count or hash-table layout.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"

namespace tessera {

struct BpeTrainOptions {
  int vocab_size = 0;  // total, special tokens included
  std::vector<std::string> special_tokens = {"<|endoftext|>"};
  PreTokenizer pre = PreTokenizer::gpt2;
  int min_frequency = 2;  // a pair must occur at least this often to be merged
};

// The pre-token counts BPE trains on, built text by text so a corpus can be streamed through:
// memory grows with the number of distinct pre-tokens (the vocabulary of words), not with the
// text. Texts are split on the special tokens first (a special token's spelling is never
// learned), then pre-tokenized; merges never cross pre-token boundaries. No normalization.
class PreTokenCounts {
 public:
  // Looked up by string_view, so counting copies each distinct pre-token once.
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  using Map = std::unordered_map<std::string, int64_t, Hash, std::equal_to<>>;

  explicit PreTokenCounts(const BpeTrainOptions& opt);
  void add_text(std::string_view text);
  void merge(PreTokenCounts&& other);  // adds other's counts (its options must be the same)
  const Map& counts() const { return counts_; }

 private:
  std::vector<std::string> specials_;
  PreTokenizer pre_;
  Map counts_;
};

// Trains on counted pre-tokens; `counts` must have been made with the same options.
Tokenizer train_bpe(const PreTokenCounts& counts, const BpeTrainOptions& opt);
// Counts `texts` and trains on them.
Tokenizer train_bpe(const std::vector<std::string>& texts, const BpeTrainOptions& opt);

}  // namespace tessera
