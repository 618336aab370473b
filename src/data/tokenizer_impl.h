// Tokenizer::Impl: the immutable state behind a Tokenizer (vocabulary as raw bytes, merge ranks,
// added tokens, pre-tokenizer, normalizer flag) plus its thread-safe BPE cache. Built only through
// make_tokenizer(), which validates a TokenizerSpec; loaders (tokenizer_json.cpp) and the trainer
// (bpe_trainer.cpp) fill a spec. Internal to src/data and its tests.
#pragma once
#include <array>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "data/tokenizer.h"

namespace tessera {

// A string matched as a whole before pre-tokenization (tokenizer.json "added_tokens").
struct AddedToken {
  std::string content;  // UTF-8, matched byte for byte
  int32_t id = -1;
  bool special = true;      // special: matched only under encode(allow_special); others always
  bool normalized = false;  // matched in the normalized text (true) or the raw text (false)
};

// Everything a tokenizer is made from. Vocabulary and merges are raw bytes (not the byte-level
// alphabet); merges are in rank order (index = rank).
struct TokenizerSpec {
  std::string source;  // file name (or "trainer") for error messages
  PreTokenizer pre = PreTokenizer::gpt2;
  bool nfc = false;            // NFC-normalize text between added tokens
  bool ignore_merges = false;  // a pre-token that is itself in the vocabulary skips the merges
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<AddedToken> added;
};

// Validates `spec` (user errors name spec.source) and builds the tokenizer.
Tokenizer make_tokenizer(TokenizerSpec spec);

// Pre-token bytes -> ids. Sharded so threads encoding in parallel rarely contend; each shard is
// cleared when it grows past its cap, which bounds memory on large or adversarial corpora.
class BpeCache {
 public:
  bool lookup(std::string_view word, std::vector<int32_t>& out) const;  // appends on a hit
  void insert(std::string_view word, std::span<const int32_t> ids) const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct Shard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, Hash, std::equal_to<>> map;
  };
  static constexpr int kNumShards = 16;
  static constexpr size_t kMaxEntriesPerShard = 1 << 16;
  mutable std::array<Shard, kNumShards> shards_;
};

struct MergeRule {
  int32_t rank;
  int32_t merged_id;
};

inline uint64_t pair_key(int32_t left, int32_t right) {
  return (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
}

struct Tokenizer::Impl {
  TokenizerSpec spec;  // as given (serialization writes it back)

  // id -> bytes for every id (vocabulary entry or added token); id_used[id] = 0 for holes.
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_used;
  std::unordered_map<std::string, int32_t> vocab_ids;   // model vocabulary only
  std::array<int32_t, 256> byte_ids{};                  // id of each single-byte token
  std::unordered_map<uint64_t, MergeRule> merge_rules;  // (left id, right id) -> rank, result
  int32_t num_ids = 0;
  int32_t eot = -1;

  // Added tokens grouped by first byte, longest first, split by where they are matched.
  struct AddedMatcher {
    std::array<std::vector<int32_t>, 256> by_first_byte;  // indices into spec.added
    bool empty = true;
  };
  AddedMatcher raw_matcher, normalized_matcher;

  BpeCache cache;
  mutable std::once_flag hash_once;
  mutable std::string hash_hex;

  // Appends the ids of one pre-token (raw bytes).
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
};

// The two merge strategies bpe() chooses between by length (exposed so tests can compare them).
// Both merge the lowest-rank adjacent pair, leftmost first among equal ranks, until none applies.
void bpe_merge_quadratic(const Tokenizer::Impl& impl, std::vector<int32_t>& symbols);
void bpe_merge_heap(const Tokenizer::Impl& impl, std::vector<int32_t>& symbols);

// NFC of UTF-8 text: `text` itself when it is already NFC, else the normalized text written into
// `storage`. Bytes that are not valid UTF-8 are kept as they are, between NFC'd runs.
std::string_view nfc_normalize(std::string_view text, std::string& storage);

}  // namespace tessera
