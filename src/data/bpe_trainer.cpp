// BPE training with incremental pair counts: words (distinct pre-tokens) are counted once; each
// merge revisits only the words that contain the merged pair (a per-pair word index), adjusts the
// pair counts by the difference, and pushes raised counts onto a lazy max-heap whose stale entries
// are re-checked when they reach the top. Tie-breaking is documented in bpe_trainer.h.
#include "data/bpe_trainer.h"

#include <algorithm>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/log.h"
#include "data/pretokenizer.h"
#include "data/text_normalize.h"
#include "data/tokenizer_impl.h"

namespace tessera {

namespace {

struct Word {
  std::vector<int32_t> symbols;
  int64_t freq = 0;
};

// Calls on_text for the text between leftmost-longest occurrences of `specials`.
template <class F>
void split_on_specials(std::string_view text, const std::vector<std::string>& specials,
                       F&& on_text) {
  size_t plain_begin = 0, i = 0;
  while (i < text.size()) {
    size_t best = 0;
    for (const auto& s : specials)
      if (s.size() > best && text.compare(i, s.size(), s) == 0) best = s.size();
    if (best == 0) {
      ++i;
      continue;
    }
    if (i > plain_begin) on_text(text.substr(plain_begin, i - plain_begin));
    i += best;
    plain_begin = i;
  }
  if (plain_begin < text.size()) on_text(text.substr(plain_begin));
}

struct HeapEntry {
  int64_t count;
  int32_t left, right;
};

class Trainer {
 public:
  Trainer(const BpeTrainOptions& opt) : opt_(opt) {
    tokens_.reserve(size_t(std::clamp(opt.vocab_size, 256, 1 << 20)));
    for (int b = 0; b < 256; ++b) {
      tokens_.emplace_back(1, char(b));
      token_ids_.emplace(tokens_.back(), b);
    }
  }

  void load_words(const PreTokenCounts::Map& counts) {
    // Words of one byte have no pairs and cannot change the merges.
    words_.reserve(counts.size());
    for (const auto& [w, n] : counts) {
      if (w.size() < 2) continue;
      Word word;
      word.freq = n;
      word.symbols.assign(w.begin(), w.end());
      for (auto& s : word.symbols) s = int32_t(static_cast<unsigned char>(s));
      words_.push_back(std::move(word));
    }
    for (size_t w = 0; w < words_.size(); ++w) {
      const Word& word = words_[w];
      for (size_t k = 0; k + 1 < word.symbols.size(); ++k) {
        const uint64_t key = pair_key(word.symbols[k], word.symbols[k + 1]);
        pair_counts_[key] += word.freq;
        auto& index = pair_words_[key];
        if (index.empty() || index.back() != int32_t(w)) index.push_back(int32_t(w));
      }
    }
    for (const auto& [key, count] : pair_counts_) push(key, count);
  }

  void run() {
    const int target = opt_.vocab_size - int(opt_.special_tokens.size());
    std::vector<int32_t> visited(words_.size(), -1);
    int32_t step = 0;
    while (int(tokens_.size()) < target && !heap_.empty()) {
      const HeapEntry top = heap_.top();
      heap_.pop();
      const uint64_t key = pair_key(top.left, top.right);
      const auto it = pair_counts_.find(key);
      const int64_t current = it == pair_counts_.end() ? 0 : it->second;
      if (current != top.count) {  // stale: the count fell since this entry was pushed
        if (current > 0) push(key, current);
        continue;
      }
      if (current < opt_.min_frequency) break;
      merge(top.left, top.right, step++, visited);
    }
  }

  Tokenizer result() const {
    TokenizerSpec spec;
    spec.source = "train_bpe";
    spec.pre = opt_.pre;
    spec.vocab.reserve(tokens_.size());
    for (size_t id = 0; id < tokens_.size(); ++id)
      spec.vocab.emplace_back(tokens_[id], int32_t(id));
    spec.merges.reserve(merges_.size());
    for (const auto& [l, r] : merges_) spec.merges.emplace_back(tokens_[l], tokens_[r]);
    for (size_t k = 0; k < opt_.special_tokens.size(); ++k)
      spec.added.push_back({opt_.special_tokens[k], int32_t(tokens_.size() + k), true, false});
    return make_tokenizer(std::move(spec));
  }

 private:
  // Max-heap order: higher count first, then the lexicographically smaller (left, right) bytes.
  struct Later {
    const std::vector<std::string>* tokens;
    bool operator()(const HeapEntry& a, const HeapEntry& b) const {
      if (a.count != b.count) return a.count < b.count;
      const std::string& al = (*tokens)[a.left];
      const std::string& bl = (*tokens)[b.left];
      if (al != bl) return al > bl;
      return (*tokens)[a.right] > (*tokens)[b.right];
    }
  };

  void push(uint64_t key, int64_t count) {
    heap_.push({count, int32_t(key >> 32), int32_t(key & 0xFFFFFFFFu)});
  }

  void merge(int32_t left, int32_t right, int32_t step, std::vector<int32_t>& visited) {
    const std::string merged_bytes = tokens_[left] + tokens_[right];
    int32_t merged;
    if (const auto it = token_ids_.find(merged_bytes); it != token_ids_.end()) {
      // Another merge already made these bytes (e.g. "ab"+"c" after "a"+"bc"): reuse its id.
      merged = it->second;
    } else {
      merged = int32_t(tokens_.size());
      tokens_.push_back(merged_bytes);
      token_ids_.emplace(merged_bytes, merged);
    }
    // A pair is recorded once. Its count can grow back only when a later merge re-makes one of
    // its tokens; those occurrences are merged now, and encoding merges them at the first rank.
    if (recorded_.insert(pair_key(left, right)).second) merges_.emplace_back(left, right);

    std::unordered_map<uint64_t, int64_t> delta;
    std::vector<int32_t> index;
    index.swap(pair_words_[pair_key(left, right)]);
    for (const int32_t w : index) {
      if (visited[w] == step) continue;  // the index may list a word twice
      visited[w] = step;
      Word& word = words_[w];
      auto& s = word.symbols;
      bool found = false;
      for (size_t k = 0; k + 1 < s.size() && !found; ++k) found = s[k] == left && s[k + 1] == right;
      if (!found) continue;  // stale index entry: an earlier merge consumed the pair here
      for (size_t k = 0; k + 1 < s.size(); ++k) delta[pair_key(s[k], s[k + 1])] -= word.freq;
      size_t out = 0;
      for (size_t k = 0; k < s.size(); ++out) {
        if (k + 1 < s.size() && s[k] == left && s[k + 1] == right) {
          s[out] = merged;
          k += 2;
        } else {
          s[out] = s[k];
          k += 1;
        }
      }
      s.resize(out);
      for (size_t k = 0; k + 1 < s.size(); ++k) {
        const uint64_t key = pair_key(s[k], s[k + 1]);
        delta[key] += word.freq;
        // Pairs the word did not have before all contain the merged token.
        if (s[k] == merged || s[k + 1] == merged) {
          auto& list = pair_words_[key];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      }
    }
    pair_words_.erase(pair_key(left, right));
    for (const auto& [key, d] : delta) {
      if (d == 0) continue;
      int64_t& count = pair_counts_[key];
      count += d;
      TS_CHECK(count >= 0, "pair count went negative ({}) after merge {}", count, step);
      if (count == 0)
        pair_counts_.erase(key);
      else if (d > 0)
        push(key, count);
    }
  }

  const BpeTrainOptions& opt_;
  std::vector<std::string> tokens_;  // id -> bytes
  std::unordered_map<std::string, int32_t> token_ids_;
  std::vector<std::pair<int32_t, int32_t>> merges_;
  std::unordered_set<uint64_t> recorded_;
  std::vector<Word> words_;
  std::unordered_map<uint64_t, int64_t> pair_counts_;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words_;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, Later> heap_{Later{&tokens_}};
};

void validate(const BpeTrainOptions& opt) {
  std::unordered_set<std::string> seen;
  for (const auto& s : opt.special_tokens) {
    if (s.empty()) TS_USER_ERROR("train_bpe: special_tokens holds an empty string");
    if (!seen.insert(s).second) TS_USER_ERROR("train_bpe: special token '{}' is listed twice", s);
    if (first_invalid_utf8(s) >= 0)
      TS_USER_ERROR("train_bpe: special token '{}' is not valid UTF-8", s);
  }
  const int min_size = 256 + int(opt.special_tokens.size());
  if (opt.vocab_size < min_size)
    TS_USER_ERROR("train_bpe: vocab_size {} is below {} (256 bytes + {} special tokens)",
                  opt.vocab_size, min_size, opt.special_tokens.size());
  constexpr int kMaxVocabSize = 1 << 24;  // the ceiling make_tokenizer() puts on ids
  if (opt.vocab_size > kMaxVocabSize)
    TS_USER_ERROR("train_bpe: vocab_size {} is above {}", opt.vocab_size, kMaxVocabSize);
  if (opt.min_frequency < 1)
    TS_USER_ERROR("train_bpe: min_frequency {} must be at least 1", opt.min_frequency);
}

}  // namespace

PreTokenCounts::PreTokenCounts(const BpeTrainOptions& opt)
    : specials_(opt.special_tokens), pre_(opt.pre) {}

void PreTokenCounts::add_text(std::string_view text) {
  split_on_specials(text, specials_, [&](std::string_view piece) {
    for (size_t i = 0; i < piece.size();) {
      const size_t j = next_pre_token_end(pre_, piece, i);
      const std::string_view word = piece.substr(i, j - i);
      auto it = counts_.find(word);
      if (it == counts_.end()) it = counts_.emplace(std::string(word), 0).first;
      ++it->second;
      i = j;
    }
  });
}

void PreTokenCounts::merge(PreTokenCounts&& other) {
  TS_CHECK(other.specials_ == specials_ && other.pre_ == pre_,
           "merging pre-token counts made with different options");
  if (counts_.empty()) {
    counts_ = std::move(other.counts_);
    return;
  }
  for (auto& [word, n] : other.counts_) counts_[word] += n;
  other.counts_.clear();
}

Tokenizer train_bpe(const PreTokenCounts& counts, const BpeTrainOptions& opt) {
  validate(opt);
  Trainer trainer(opt);
  trainer.load_words(counts.counts());
  trainer.run();
  Tokenizer tok = trainer.result();
  if (tok.vocab_size() < opt.vocab_size)
    log_warn(
        "train_bpe: stopped at {} tokens (asked for {}): no remaining pair occurs {} or more "
        "times",
        tok.vocab_size(), opt.vocab_size, opt.min_frequency);
  return tok;
}

Tokenizer train_bpe(const std::vector<std::string>& texts, const BpeTrainOptions& opt) {
  PreTokenCounts counts(opt);
  for (const std::string& text : texts) counts.add_text(text);
  return train_bpe(counts, opt);
}

}  // namespace tessera
