// Pre-tokenizer semantics on tricky strings: each expectation is worked out by hand from the
// regexes in pretokenizer.h under backtracking semantics (alternatives in order, greedy
// quantifiers, \s+(?!\S) giving back the last whitespace character).
#include "data/pretokenizer.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace tessera {
namespace {

std::vector<std::string> split(PreTokenizer pre, std::string_view text) {
  std::vector<std::string> out;
  for (auto piece : pre_tokenize(pre, text)) out.emplace_back(piece);
  return out;
}

using V = std::vector<std::string>;

TEST(PreTokenizerGpt2, WordsAndSpaces) {
  const auto g = PreTokenizer::gpt2;
  EXPECT_EQ(split(g, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(split(g, "Hello  world"), (V{"Hello", " ", " world"}));
  EXPECT_EQ(split(g, "Hello   \n\nworld"), (V{"Hello", "   \n", "\n", "world"}));
  EXPECT_EQ(split(g, "x  "), (V{"x", "  "}));  // at the end (?!\S) holds: the whole run
  EXPECT_EQ(split(g, " "), (V{" "}));
  EXPECT_EQ(split(g, "\t\tfoo"), (V{"\t", "\t", "foo"}));  // only ' ' prefixes a word
  EXPECT_EQ(split(g, ""), (V{}));
}

TEST(PreTokenizerGpt2, ContractionsAreCaseSensitive) {
  const auto g = PreTokenizer::gpt2;
  EXPECT_EQ(split(g, "I'm don't we'll"), (V{"I", "'m", " don", "'t", " we", "'ll"}));
  EXPECT_EQ(split(g, "I'M"), (V{"I", "'", "M"}));
  EXPECT_EQ(split(g, "'sup"), (V{"'s", "up"}));
  EXPECT_EQ(split(g, "it's'"), (V{"it", "'s", "'"}));
}

TEST(PreTokenizerGpt2, NumbersPunctuationAndOtherScripts) {
  const auto g = PreTokenizer::gpt2;
  EXPECT_EQ(split(g, "abc123 456"), (V{"abc", "123", " 456"}));
  EXPECT_EQ(split(g, "!!! ??"), (V{"!!!", " ??"}));
  EXPECT_EQ(split(g, "a.b"), (V{"a", ".", "b"}));
  EXPECT_EQ(split(g, "😀😀 hi"), (V{"😀😀", " hi"}));
  EXPECT_EQ(split(g, "Größe ½"), (V{"Größe", " ½"}));  // ½ is \p{N} (No)
  EXPECT_EQ(split(g, "東京\u3000大阪"), (V{"東京", "\u3000", "大阪"}));
}

TEST(PreTokenizerGpt2, WhiteSpaceIsUnicodeWhiteSpace) {
  const auto g = PreTokenizer::gpt2;
  EXPECT_EQ(split(g, "a\u00a0b"), (V{"a", "\u00a0", "b"}));
  // U+0085 is White_Space (Oniguruma, Rust); U+FEFF is not (JavaScript disagrees on both).
  EXPECT_EQ(split(g, "a \u0085b"), (V{"a", " ", "\u0085", "b"}));
  EXPECT_EQ(split(g, "a \ufeffb"), (V{"a", " \ufeff", "b"}));
}

TEST(PreTokenizerGpt2, InvalidUtf8BytesAreOtherCharacters) {
  const auto g = PreTokenizer::gpt2;
  EXPECT_EQ(split(g,
                  "ab\xff\xfe"
                  "cd"),
            (V{"ab", "\xff\xfe", "cd"}));
  EXPECT_EQ(split(g, "a \xc3"), (V{"a", " \xc3"}));                // truncated sequence
  EXPECT_EQ(split(g, "\xed\xa0\x80x"), (V{"\xed\xa0\x80", "x"}));  // a surrogate
}

TEST(PreTokenizerQwen2, LettersTakeOnePrefixCharacter) {
  const auto q = PreTokenizer::qwen2;
  EXPECT_EQ(split(q, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(split(q, "\tfoo"), (V{"\tfoo"}));
  EXPECT_EQ(split(q, ".Hello"), (V{".Hello"}));
  EXPECT_EQ(split(q, "a\nb"), (V{"a", "\n", "b"}));  // \r and \n never prefix a word
}

TEST(PreTokenizerQwen2, ContractionsIgnoreCase) {
  const auto q = PreTokenizer::qwen2;
  EXPECT_EQ(split(q, "I'M DON'T"), (V{"I", "'M", " DON", "'T"}));
  EXPECT_EQ(split(q, "we'Ll"), (V{"we", "'Ll"}));
  EXPECT_EQ(split(q, "'sup"), (V{"'s", "up"}));
  // U+017F LATIN SMALL LETTER LONG S case-folds to 's' (as in Oniguruma and Rust's regex).
  EXPECT_EQ(split(q, "it'\u017f"), (V{"it", "'\u017f"}));
}

TEST(PreTokenizerQwen2, DigitsOneByOne) {
  const auto q = PreTokenizer::qwen2;
  EXPECT_EQ(split(q, "abc123"), (V{"abc", "1", "2", "3"}));
  EXPECT_EQ(split(q, "$$$ 100"), (V{"$$$", " ", "1", "0", "0"}));
  EXPECT_EQ(split(q, "x ½"), (V{"x", " ", "½"}));
}

TEST(PreTokenizerQwen2, NewlinesAndWhitespace) {
  const auto q = PreTokenizer::qwen2;
  EXPECT_EQ(split(q, "Hello\n\nworld"), (V{"Hello", "\n\n", "world"}));
  EXPECT_EQ(split(q, "Hello   \n\n  world"), (V{"Hello", "   \n\n", " ", " world"}));
  EXPECT_EQ(split(q, "foo!!\n\nbar"), (V{"foo", "!!\n\n", "bar"}));
  EXPECT_EQ(split(q, "a\r\nb"), (V{"a", "\r\n", "b"}));
  EXPECT_EQ(split(q, " \r\n"), (V{" \r\n"}));
  EXPECT_EQ(split(q, "x \n y"), (V{"x", " \n", " y"}));  // \s*[\r\n]+ stops after the newline
  EXPECT_EQ(split(q, "x  "), (V{"x", "  "}));
}

// The pieces always tile the input, whatever bytes it holds.
TEST(PreTokenizer, PiecesConcatenateToTheInput) {
  std::mt19937 rng(7);
  const std::vector<std::string> atoms = {"a",      "Z",  "7",    " ",    "  ", "\n",
                                          "\r",     "\t", "'",    "'s",   "!",  "é",
                                          "\u00a0", "😀",  "\xff", "\xc3", "中", "½"};
  for (int trial = 0; trial < 500; ++trial) {
    std::string text;
    const int n = int(rng() % 40);
    for (int k = 0; k < n; ++k) text += atoms[rng() % atoms.size()];
    for (auto pre : {PreTokenizer::gpt2, PreTokenizer::qwen2}) {
      std::string joined;
      for (auto piece : pre_tokenize(pre, text)) {
        EXPECT_FALSE(piece.empty());
        joined += piece;
      }
      EXPECT_EQ(joined, text);
    }
  }
}

TEST(PreTokenizer, Names) {
  EXPECT_EQ(parse_pre_tokenizer_name("gpt2"), PreTokenizer::gpt2);
  EXPECT_EQ(parse_pre_tokenizer_name("qwen2"), PreTokenizer::qwen2);
  EXPECT_FALSE(parse_pre_tokenizer_name("qwen3").has_value());
  EXPECT_EQ(pre_tokenizer_name(PreTokenizer::qwen2), "qwen2");
}

}  // namespace
}  // namespace tessera
