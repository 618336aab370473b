// Tokenizer behaviour that does not need the reference ids: the byte-level alphabet, the two BPE
// merge strategies agreeing, merges on a hand-built vocabulary, special tokens, NFC, and
// decode(encode(x)) == x for arbitrary bytes (invalid UTF-8 included).
#include <gtest/gtest.h>

#include <random>
#include <set>
#include <thread>

#include "core/error.h"
#include "data/byte_level.h"
#include "data/tokenizer_impl.h"
#include "tokenizer_test_util.h"

namespace tessera {
namespace {

using testing::gpt2_tokenizer;
using testing::ids_text;
using testing::qwen3_tokenizer;

TEST(ByteLevel, AlphabetIsABijectionOntoPrintableCharacters) {
  std::set<char32_t> seen;
  for (int b = 0; b < 256; ++b) {
    const char32_t cp = byte_to_unicode(uint8_t(b));
    EXPECT_TRUE(seen.insert(cp).second) << "byte " << b;
    EXPECT_GT(cp, char32_t(' '));
  }
  EXPECT_EQ(byte_to_unicode(' '), char32_t(0x120));   // 'Ġ'
  EXPECT_EQ(byte_to_unicode('\n'), char32_t(0x10A));  // 'Ċ'
  EXPECT_EQ(byte_to_unicode('a'), char32_t('a'));
  EXPECT_EQ(byte_to_unicode(0xAD), char32_t(0x143));  // soft hyphen is the last shifted byte
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(char(b));
  EXPECT_EQ(byte_level_to_bytes(bytes_to_byte_level(all)), all);
  EXPECT_EQ(bytes_to_byte_level(" hi\n"), "\u0120hi\u010a");
  EXPECT_FALSE(byte_level_to_bytes("中").has_value());    // not in the alphabet
  EXPECT_FALSE(byte_level_to_bytes("\xc3").has_value());  // truncated UTF-8
  EXPECT_FALSE(byte_level_to_bytes(" ").has_value());     // ' ' itself is written 'Ġ'
}

// A byte-level tokenizer with the given merges (each merge adds its result to the vocabulary).
Tokenizer tiny_tokenizer(const std::vector<std::pair<std::string, std::string>>& merges,
                         bool ignore_merges = false,
                         const std::vector<std::string>& extra_vocab = {}) {
  TokenizerSpec spec;
  spec.source = "tiny";
  spec.ignore_merges = ignore_merges;
  for (int b = 0; b < 256; ++b) spec.vocab.emplace_back(std::string(1, char(b)), b);
  std::set<std::string> have;
  auto add = [&](const std::string& t) {
    if (t.size() > 1 && have.insert(t).second)
      spec.vocab.emplace_back(t, int32_t(spec.vocab.size()));
  };
  for (const auto& [l, r] : merges) add(l + r);
  for (const auto& t : extra_vocab) add(t);
  spec.merges = merges;
  spec.added.push_back({"<|endoftext|>", int32_t(spec.vocab.size()), true, false});
  return make_tokenizer(std::move(spec));
}

TEST(Bpe, MergesLowestRankFirstLeftmostOnTies) {
  // Ranks: 0 "b"+"c", 1 "a"+"b", 2 "a"+"bc". In "abc", "bc" (rank 0) wins over "ab" (rank 1),
  // then "a"+"bc" applies. In "aaa" with only "a"+"a", the leftmost pair merges: "aa" "a".
  const Tokenizer tok = tiny_tokenizer({{"b", "c"}, {"a", "b"}, {"a", "bc"}, {"a", "a"}});
  const int32_t bc = 256, ab = 257, abc = 258, aa = 259;
  EXPECT_EQ(tok.encode("abc"), (std::vector<int32_t>{abc}));
  EXPECT_EQ(tok.encode("abd"), (std::vector<int32_t>{ab, 'd'}));
  EXPECT_EQ(tok.encode("aaa"), (std::vector<int32_t>{aa, 'a'}));
  EXPECT_EQ(tok.encode("aaaa"), (std::vector<int32_t>{aa, aa}));
  EXPECT_EQ(tok.encode("cbc"), (std::vector<int32_t>{'c', bc}));
  EXPECT_EQ(tok.vocab_size(), 261);
  EXPECT_EQ(tok.eot_id(), 260);
}

TEST(Bpe, IgnoreMergesTakesWholeVocabularyWords) {
  const Tokenizer plain = tiny_tokenizer({{"a", "b"}}, false, {"abc"});
  const Tokenizer ignoring = tiny_tokenizer({{"a", "b"}}, true, {"abc"});
  EXPECT_EQ(plain.encode("abc"), (std::vector<int32_t>{256, 'c'}));
  EXPECT_EQ(ignoring.encode("abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(ignoring.encode("abd"), (std::vector<int32_t>{256, 'd'}));
}

// The quadratic scan (short words) and the heap (long words) must give identical merges.
TEST(Bpe, HeapAndQuadraticStrategiesAgree) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  std::mt19937 rng(11);
  const std::string alphabet = "aaeeinst  .,0123";
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 2 + int(rng() % 200);
    std::vector<int32_t> a;
    for (int k = 0; k < n; ++k)
      a.push_back(tok->impl().byte_ids[uint8_t(alphabet[rng() % alphabet.size()])]);
    std::vector<int32_t> b = a;
    bpe_merge_quadratic(tok->impl(), a);
    bpe_merge_heap(tok->impl(), b);
    ASSERT_EQ(a, b) << "trial " << trial;
  }
}

TEST(Bpe, LongPreTokensEncodeAndRoundTrip) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  // A 100k-digit number is one GPT-2 pre-token: the heap keeps this fast.
  std::string digits;
  for (int k = 0; k < 100000; ++k) digits.push_back(char('0' + (k * 7 + k / 13) % 10));
  const auto ids = tok->encode(digits);
  EXPECT_LT(ids.size(), digits.size());
  EXPECT_EQ(tok->decode(ids), digits);
}

TEST(Gpt2, KnownIds) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_EQ(tok->eot_id(), 50256);
  EXPECT_EQ(tok->encode("Hello world"), (std::vector<int32_t>{15496, 995}));
  EXPECT_EQ(tok->encode("<|endoftext|>"), (std::vector<int32_t>{50256}));
  // Without allow_special the same text is ordinary characters.
  const auto plain = tok->encode("<|endoftext|>", false);
  EXPECT_GT(plain.size(), 1u) << ids_text(plain);
  EXPECT_EQ(tok->decode(plain), "<|endoftext|>");
}

TEST(Qwen3, SpecialAndAddedTokens) {
  const Tokenizer* tok = qwen3_tokenizer();
  if (!tok) return;
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->eot_id(), 151643);
  EXPECT_EQ(tok->encode("<|im_start|>"), (std::vector<int32_t>{151644}));
  // Special tokens need allow_special; non-special added tokens (<think>) always match, as in
  // Hugging Face tokenizers.
  const auto plain = tok->encode("<|im_start|><think>", false);
  ASSERT_GT(plain.size(), 2u);
  EXPECT_NE(plain.front(), 151644);
  EXPECT_EQ(plain.back(), 151667);
  EXPECT_EQ(tok->decode(plain), "<|im_start|><think>");
}

TEST(Qwen3, NormalizesToNfc) {
  const Tokenizer* tok = qwen3_tokenizer();
  if (!tok) return;
  const std::string nfc = "caf\u00e9 \u00c5ngstr\u00f6m";
  const std::string nfd = "cafe\u0301 A\u030angstro\u0308m";
  EXPECT_EQ(tok->encode(nfd), tok->encode(nfc));
  EXPECT_EQ(tok->decode(tok->encode(nfd)), nfc);
  std::string storage;
  EXPECT_EQ(nfc_normalize(nfd, storage), nfc);
  EXPECT_EQ(nfc_normalize("ascii only", storage), "ascii only");
  // Invalid bytes survive normalization in place.
  EXPECT_EQ(nfc_normalize("e\u0301\xff"
                          "e\u0301",
                          storage),
            "\u00e9\xff\u00e9");
}

std::string random_bytes(std::mt19937& rng, int max_len) {
  static const std::vector<std::string> atoms = {"a",
                                                 "b",
                                                 "The",
                                                 " ",
                                                 "  ",
                                                 "\n",
                                                 "\r\n",
                                                 "\t",
                                                 "'s",
                                                 "'LL",
                                                 "0",
                                                 "123",
                                                 "!",
                                                 "...",
                                                 "é",
                                                 "e\u0301",
                                                 "中文",
                                                 "😀",
                                                 "\u00a0",
                                                 "<|endoftext|>",
                                                 "<|im_start|>",
                                                 "<think>",
                                                 "<|endo"};
  std::string s;
  const int n = int(rng() % max_len);
  for (int k = 0; k < n; ++k) {
    if (rng() % 5 == 0)
      s.push_back(char(rng() % 256));  // any byte, often invalid UTF-8
    else
      s += atoms[rng() % atoms.size()];
  }
  return s;
}

TEST(RoundTrip, DecodeReproducesArbitraryBytes) {
  const Tokenizer* gpt2 = gpt2_tokenizer();
  const Tokenizer* qwen = qwen3_tokenizer();
  if (!gpt2 || !qwen) return;
  std::mt19937 rng(3);
  std::string storage;
  for (int trial = 0; trial < 400; ++trial) {
    const std::string text = random_bytes(rng, 30);
    for (bool special : {true, false}) {
      ASSERT_EQ(gpt2->decode(gpt2->encode(text, special)), text) << "trial " << trial;
      // Qwen normalizes to NFC first; the bytes of the normalized text come back exactly.
      const std::string expected(nfc_normalize(text, storage));
      ASSERT_EQ(qwen->decode(qwen->encode(text, special)), expected) << "trial " << trial;
    }
  }
}

TEST(RoundTrip, EveryIdDecodesToItsBytes) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  // Encoding a single token's bytes gives the token back for these common words.
  for (const char* word : {" the", " and", "Hello", " world", "\n\n", " 2024"}) {
    const auto ids = tok->encode(word);
    ASSERT_EQ(ids.size(), 1u) << word;
    const int32_t one[] = {ids[0]};
    EXPECT_EQ(tok->decode(one), word);
  }
}

TEST(Errors, DecodeRejectsUnknownIds) {
  const Tokenizer tok = tiny_tokenizer({});
  const int32_t bad[] = {1, 257};
  try {
    tok.decode(bad);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_NE(std::string(e.what()).find("257"), std::string::npos) << e.what();
  }
  const int32_t negative[] = {-1};
  EXPECT_THROW(tok.decode(negative), Error);
}

TEST(Errors, SpecRejectsBrokenVocabularies) {
  TokenizerSpec missing_byte;
  missing_byte.source = "broken.json";
  for (int b = 0; b < 255; ++b) missing_byte.vocab.emplace_back(std::string(1, char(b)), b);
  try {
    make_tokenizer(missing_byte);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_NE(std::string(e.what()).find("0xFF"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("broken.json"), std::string::npos) << e.what();
  }
  TokenizerSpec bad_merge;
  bad_merge.source = "broken.json";
  for (int b = 0; b < 256; ++b) bad_merge.vocab.emplace_back(std::string(1, char(b)), b);
  bad_merge.merges.emplace_back("a", "b");  // "ab" is not in the vocabulary
  EXPECT_THROW(make_tokenizer(bad_merge), Error);
}

TEST(Tokenizer, ConcurrentEncodesAgree) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  const std::string text =
      testing::read_all(testing::source_path("tests/fixtures/tokenizer/conformance.txt"));
  const auto expected = tok->encode(text);
  std::vector<std::vector<int32_t>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep) got[t] = tok->encode(text);
    });
  for (auto& th : threads) th.join();
  for (const auto& g : got) EXPECT_EQ(g, expected);
}

}  // namespace
}  // namespace tessera
