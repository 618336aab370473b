// BPE training: a hand-computed example, the documented tie-break, exact vocabulary size,
// determinism and text-order independence, save/load equality, and agreement with a naive trainer
// that recounts every pair at every step (which checks the incremental count updates).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_impl.h"
#include "tokenizer_test_util.h"

namespace tessera {
namespace {

using testing::read_all;
using testing::source_path;
using Merges = std::vector<std::pair<std::string, std::string>>;

const Merges& merges_of(const Tokenizer& tok) { return tok.impl().spec.merges; }

TEST(Trainer, HandComputedExample) {
  // Words: "abab" x2, "ab" x1, "cd" x1. Pair counts: (a,b) 5, (b,a) 2, (c,d) 1.
  // Step 1 merges (a,b) -> "ab" (256); the words become [ab ab] x2, [ab]: (ab,ab) 2, (c,d) 1.
  // Step 2 merges (ab,ab) -> "abab" (257). Step 3 merges (c,d) -> "cd" (258). Then <|endoftext|>.
  BpeTrainOptions opt;
  opt.vocab_size = 260;
  opt.min_frequency = 1;
  const Tokenizer tok = train_bpe({"abab", "abab", "ab", "cd"}, opt);
  EXPECT_EQ(merges_of(tok), (Merges{{"a", "b"}, {"ab", "ab"}, {"c", "d"}}));
  EXPECT_EQ(tok.vocab_size(), 260);
  EXPECT_EQ(tok.eot_id(), 259);
  EXPECT_EQ(tok.encode("abab cd<|endoftext|>"), (std::vector<int32_t>{257, ' ', 258, 259}));

  // With min_frequency 2, (c,d) (count 1) is never merged: training stops one token short.
  opt.min_frequency = 2;
  const Tokenizer short_tok = train_bpe({"abab", "abab", "ab", "cd"}, opt);
  EXPECT_EQ(merges_of(short_tok), (Merges{{"a", "b"}, {"ab", "ab"}}));
  EXPECT_EQ(short_tok.vocab_size(), 259);
}

TEST(Trainer, TiesGoToTheSmallestPairBytes) {
  BpeTrainOptions opt;
  opt.vocab_size = 256 + 3 + 1;
  opt.min_frequency = 1;
  // (b,a), (a,z) and (z,y)... all occur once: order by (left bytes, right bytes).
  const Tokenizer tok = train_bpe({"ba", "az", "zy"}, opt);
  EXPECT_EQ(merges_of(tok), (Merges{{"a", "z"}, {"b", "a"}, {"z", "y"}}));
}

TEST(Trainer, SpecialTokensAreNeverLearnedAcross) {
  BpeTrainOptions opt;
  opt.vocab_size = 300;
  opt.min_frequency = 1;
  // Unsplit, "<|endoftext|>" would pre-tokenize to "<|", "endoftext", "|>" and be learned.
  const Tokenizer tok = train_bpe({"ab<|endoftext|>ab<|endoftext|>"}, opt);
  EXPECT_EQ(merges_of(tok), (Merges{{"a", "b"}}));
  EXPECT_EQ(tok.vocab_size(), 258);
}

std::vector<std::string> corpus_lines() {
  const std::string text = read_all(source_path("tests/fixtures/tokenizer/conformance.txt"));
  std::vector<std::string> lines;
  size_t begin = 0;
  while (begin < text.size()) {
    const size_t end = std::min(text.find('\n', begin), text.size());
    lines.push_back(text.substr(begin, end - begin + 1));
    begin = end + 1;
  }
  return lines;
}

TEST(Trainer, ExactSizeDeterministicAndOrderIndependent) {
  const auto lines = corpus_lines();
  ASSERT_GT(lines.size(), 100u);
  for (auto pre : {PreTokenizer::gpt2, PreTokenizer::qwen2}) {
    BpeTrainOptions opt;
    opt.vocab_size = 700;
    opt.pre = pre;
    opt.special_tokens = {"<|endoftext|>", "<|im_start|>"};
    const Tokenizer a = train_bpe(lines, opt);
    EXPECT_EQ(a.vocab_size(), 700);
    EXPECT_EQ(a.eot_id(), 698);
    auto shuffled = lines;
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(5));
    const Tokenizer b = train_bpe(shuffled, opt);
    EXPECT_EQ(a.to_hf_json(), b.to_hf_json());
    EXPECT_EQ(a.hash(), b.hash());
  }
}

TEST(Trainer, SavedTokenizerLoadsAndEncodesIdentically) {
  const auto lines = corpus_lines();
  BpeTrainOptions opt;
  opt.vocab_size = 600;
  opt.pre = PreTokenizer::qwen2;
  const Tokenizer tok = train_bpe(lines, opt);
  const testing::ScratchDir scratch;
  const std::string path = scratch.file("tokenizer.json");
  tok.save_hf_json(path);
  const Tokenizer back = Tokenizer::load_hf_json(path);
  EXPECT_EQ(back.to_hf_json(), tok.to_hf_json());
  EXPECT_EQ(back.hash(), tok.hash());
  EXPECT_EQ(back.vocab_size(), 600);
  EXPECT_EQ(back.eot_id(), tok.eot_id());
  std::string all;
  for (const auto& l : lines) all += l;
  const auto ids = tok.encode(all);
  EXPECT_EQ(back.encode(all), ids);
  EXPECT_EQ(tok.decode(ids), all);
  EXPECT_LT(ids.size(), all.size() * 7 / 10);  // the merges compress the text they were trained on
  // Bytes never seen in training (and invalid UTF-8) still round-trip through the byte tokens.
  const std::string unseen = "\x01\x02\xff\xfe 🦀 ∮ E⋅da = Q";
  EXPECT_EQ(back.decode(back.encode(unseen)), unseen);
}

// The reference: recount every pair over every word at every step; same tie-break, same rule for
// merges whose bytes already exist (reuse the token, record a pair once).
Merges naive_train(const std::vector<std::string>& texts, const BpeTrainOptions& opt) {
  std::map<std::string, int64_t> word_counts;
  for (const auto& t : texts)
    for (auto piece : pre_tokenize(opt.pre, t)) ++word_counts[std::string(piece)];
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;
  for (const auto& [w, n] : word_counts) {
    std::vector<std::string> symbols;
    for (char c : w) symbols.emplace_back(1, c);
    words.emplace_back(symbols, n);
  }
  std::set<std::string> vocab;
  for (int b = 0; b < 256; ++b) vocab.insert(std::string(1, char(b)));
  Merges merges;
  std::set<std::pair<std::string, std::string>> recorded;
  const size_t target = size_t(opt.vocab_size) - opt.special_tokens.size();
  while (vocab.size() < target) {
    std::map<std::pair<std::string, std::string>, int64_t> counts;
    for (const auto& [s, n] : words)
      for (size_t k = 0; k + 1 < s.size(); ++k) counts[{s[k], s[k + 1]}] += n;
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_count = 0;
    for (const auto& [pair, n] : counts)  // std::map iterates pairs in byte order
      if (n > best_count) best = &pair, best_count = n;
    if (!best || best_count < opt.min_frequency) break;
    const auto [l, r] = *best;
    vocab.insert(l + r);
    if (recorded.insert({l, r}).second) merges.emplace_back(l, r);
    for (auto& [s, n] : words) {
      std::vector<std::string> out;
      for (size_t k = 0; k < s.size();) {
        if (k + 1 < s.size() && s[k] == l && s[k + 1] == r)
          out.push_back(l + r), k += 2;
        else
          out.push_back(s[k]), k += 1;
      }
      s = std::move(out);
    }
  }
  return merges;
}

TEST(Trainer, MatchesNaiveRecountingTrainer) {
  const auto lines = corpus_lines();
  for (auto pre : {PreTokenizer::gpt2, PreTokenizer::qwen2}) {
    BpeTrainOptions opt;
    opt.vocab_size = 256 + 1 + 250;
    opt.pre = pre;
    opt.special_tokens = {"<|endoftext|>"};
    // Texts without the special token so both trainers see the same words.
    std::vector<std::string> texts;
    for (const auto& l : lines)
      if (l.find("<|") == std::string::npos) texts.push_back(l);
    const Tokenizer tok = train_bpe(texts, opt);
    const Merges expected = naive_train(texts, opt);
    ASSERT_EQ(merges_of(tok).size(), expected.size());
    for (size_t k = 0; k < expected.size(); ++k)
      ASSERT_EQ(merges_of(tok)[k], expected[k]) << "merge " << k;
  }
}

TEST(Trainer, RejectsBadOptions) {
  BpeTrainOptions opt;
  opt.vocab_size = 200;
  EXPECT_THROW(train_bpe({"abc"}, opt), Error);
  opt.vocab_size = 300;
  opt.special_tokens = {"<a>", "<a>"};
  EXPECT_THROW(train_bpe({"abc"}, opt), Error);
  opt.special_tokens = {""};
  EXPECT_THROW(train_bpe({"abc"}, opt), Error);
  opt.special_tokens = {"\xff"};
  EXPECT_THROW(train_bpe({"abc"}, opt), Error);
  opt.special_tokens = {};
  opt.min_frequency = 0;
  EXPECT_THROW(train_bpe({"abc"}, opt), Error);
}

}  // namespace
}  // namespace tessera
