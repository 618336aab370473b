// Hand-written matchers for the GPT-2 and Qwen2 pre-tokenizer regexes. Each step finds the match
// that a backtracking engine would return at the current position: alternatives are tried in
// order, quantifiers are greedy, and the one lookahead, \s+(?!\S), gives back the last whitespace
// character when a non-space follows. Every character is covered by some alternative, so the
// matches tile the text with no gaps.
#include "data/pretokenizer.h"

#include <unicode/uchar.h>

#include <array>

#include "core/error.h"

namespace tessera {

namespace {

// Character classes (bit flags). A character with none of kLetter|kNumber|kSpace is "other"
// ([^\s\p{L}\p{N}]); kEnd marks the position past the text.
enum : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4, kNewline = 8, kEnd = 16 };
constexpr uint8_t kLns = kLetter | kNumber | kSpace;

struct Char {
  uint8_t cls;
  uint8_t len;  // bytes
};

const std::array<uint8_t, 128>& ascii_classes() {
  static const std::array<uint8_t, 128> t = [] {
    std::array<uint8_t, 128> r{};
    for (int c = 'a'; c <= 'z'; ++c) r[c] = kLetter;
    for (int c = 'A'; c <= 'Z'; ++c) r[c] = kLetter;
    for (int c = '0'; c <= '9'; ++c) r[c] = kNumber;
    for (int c : {'\t', '\n', '\v', '\f', '\r', ' '}) r[c] = kSpace;
    r['\n'] |= kNewline;
    r['\r'] |= kNewline;
    return r;
  }();
  return t;
}

uint8_t classify(char32_t cp) {
  switch (u_charType(UChar32(cp))) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER: return kLetter;
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER: return kNumber;
    default: return u_isUWhiteSpace(UChar32(cp)) ? kSpace : 0;
  }
}

// Decodes the character at byte `i` (strict UTF-8: no overlongs, surrogates or > U+10FFFF).
// `cp_out` receives the code point, or U+FFFD-like 0xFFFFFFFF for an invalid byte.
inline Char char_at(std::string_view s, size_t i, char32_t* cp_out = nullptr) {
  if (i >= s.size()) return {kEnd, 0};
  const auto u = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c0 = u(i);
  if (c0 < 0x80) {
    if (cp_out) *cp_out = c0;
    return {ascii_classes()[c0], 1};
  }
  const size_t left = s.size() - i;
  char32_t cp = 0;
  uint8_t len = 0;
  if (c0 >= 0xC2 && c0 <= 0xDF && left >= 2 && (u(i + 1) & 0xC0) == 0x80) {
    cp = (char32_t(c0 & 0x1F) << 6) | (u(i + 1) & 0x3F);
    len = 2;
  } else if (c0 >= 0xE0 && c0 <= 0xEF && left >= 3 && (u(i + 1) & 0xC0) == 0x80 &&
             (u(i + 2) & 0xC0) == 0x80) {
    cp = (char32_t(c0 & 0x0F) << 12) | (char32_t(u(i + 1) & 0x3F) << 6) | (u(i + 2) & 0x3F);
    if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) len = 3;
  } else if (c0 >= 0xF0 && c0 <= 0xF4 && left >= 4 && (u(i + 1) & 0xC0) == 0x80 &&
             (u(i + 2) & 0xC0) == 0x80 && (u(i + 3) & 0xC0) == 0x80) {
    cp = (char32_t(c0 & 0x07) << 18) | (char32_t(u(i + 1) & 0x3F) << 12) |
         (char32_t(u(i + 2) & 0x3F) << 6) | (u(i + 3) & 0x3F);
    if (cp >= 0x10000 && cp <= 0x10FFFF) len = 4;
  }
  if (len == 0) {  // invalid lead or continuation: one "other" character of one byte
    if (cp_out) *cp_out = 0xFFFFFFFF;
    return {0, 1};
  }
  if (cp_out) *cp_out = cp;
  return {classify(cp), len};
}

inline bool is_other(uint8_t cls) { return (cls & (kLns | kEnd)) == 0; }

// End of the run of characters starting at `i` whose class has any bit of `mask`.
inline size_t run_end(std::string_view s, size_t i, uint8_t mask) {
  while (true) {
    const Char c = char_at(s, i);
    if (!(c.cls & mask)) return i;
    i += c.len;
  }
}

inline size_t other_run_end(std::string_view s, size_t i) {
  while (true) {
    const Char c = char_at(s, i);
    if (!is_other(c.cls)) return i;
    i += c.len;
  }
}

// Contractions after an apostrophe at `i`: 's 't 're 've 'm 'll 'd. Returns the match length or 0.
size_t contraction(std::string_view s, size_t i, bool fold_case) {
  if (s[i] != '\'') return 0;
  char32_t cp1 = 0, cp2 = 0;
  const Char c1 = char_at(s, i + 1, &cp1);
  if (c1.cls & kEnd) return 0;
  const auto lower = [&](char32_t cp) -> char32_t {
    if (!fold_case) return cp;
    if (cp >= 'A' && cp <= 'Z') return cp + 32;
    if (cp == 0x017F) return 's';  // LATIN SMALL LETTER LONG S case-folds to 's'
    return cp;
  };
  const char32_t a = lower(cp1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 1 + c1.len;
  if (a == 'r' || a == 'v' || a == 'l') {
    const Char c2 = char_at(s, i + 1 + c1.len, &cp2);
    if (c2.cls & kEnd) return 0;
    const char32_t b = lower(cp2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
      return 1 + c1.len + c2.len;
  }
  return 0;
}

// The whitespace alternatives \s+(?!\S)|\s+ for a run starting at `i` (which is whitespace).
inline size_t whitespace_match(std::string_view s, size_t i) {
  size_t last_start = i, j = i;
  while (true) {
    const Char c = char_at(s, j);
    if (!(c.cls & kSpace)) break;
    last_start = j;
    j += c.len;
  }
  if (j == s.size()) return j;            // (?!\S) holds at the end of the text
  if (last_start > i) return last_start;  // give back the last space: it joins the next word
  return j;                               // a single space before a non-space: plain \s+
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t match_gpt2(std::string_view s, size_t i) {
  if (const size_t n = contraction(s, i, false)) return i + n;
  const Char c0 = char_at(s, i);
  // " ?X+" tries the space first, then (backtracking) X+ from `i` itself.
  if (s[i] == ' ') {
    const Char c1 = char_at(s, i + 1);
    if (c1.cls & kLetter) return run_end(s, i + 1, kLetter);
    if (c1.cls & kNumber) return run_end(s, i + 1, kNumber);
    if (is_other(c1.cls)) return other_run_end(s, i + 1);
  }
  if (c0.cls & kLetter) return run_end(s, i, kLetter);
  if (c0.cls & kNumber) return run_end(s, i, kNumber);
  if (is_other(c0.cls)) return other_run_end(s, i);
  return whitespace_match(s, i);
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+
size_t match_qwen2(std::string_view s, size_t i) {
  if (const size_t n = contraction(s, i, true)) return i + n;
  const Char c0 = char_at(s, i);
  if (c0.cls & kLetter) return run_end(s, i, kLetter);
  const bool prefix_ok = !(c0.cls & (kLetter | kNumber | kNewline));
  if (prefix_ok) {
    const Char c1 = char_at(s, i + c0.len);
    if (c1.cls & kLetter) return run_end(s, i + c0.len, kLetter);
  }
  if (c0.cls & kNumber) return i + c0.len;
  size_t others_from = std::string_view::npos;
  if (s[i] == ' ' && is_other(char_at(s, i + 1).cls))
    others_from = i + 1;
  else if (is_other(c0.cls))
    others_from = i;
  if (others_from != std::string_view::npos) {
    const size_t j = other_run_end(s, others_from);
    return run_end(s, j, kNewline);
  }
  // c0 is whitespace. \s*[\r\n]+ ends just after the run's last \r or \n, if it has one.
  size_t after_newline = 0;
  for (size_t j = i;;) {
    const Char c = char_at(s, j);
    if (!(c.cls & kSpace)) break;
    j += c.len;
    if (c.cls & kNewline) after_newline = j;
  }
  if (after_newline > 0) return after_newline;
  return whitespace_match(s, i);
}

}  // namespace

std::string_view pre_tokenizer_regex(PreTokenizer pre) {
  return pre == PreTokenizer::gpt2 ? kGpt2PreTokenizerRegex : kQwen2PreTokenizerRegex;
}

std::string_view pre_tokenizer_name(PreTokenizer pre) {
  return pre == PreTokenizer::gpt2 ? "gpt2" : "qwen2";
}

std::optional<PreTokenizer> parse_pre_tokenizer_name(std::string_view name) {
  if (name == "gpt2") return PreTokenizer::gpt2;
  if (name == "qwen2") return PreTokenizer::qwen2;
  return std::nullopt;
}

size_t next_pre_token_end(PreTokenizer pre, std::string_view text, size_t i) {
  const size_t j = pre == PreTokenizer::gpt2 ? match_gpt2(text, i) : match_qwen2(text, i);
  // Every pattern covers every character, so a match is never empty (or callers would loop).
  TS_CHECK(j > i && j <= text.size(), "pre-token match [{}, {}) is empty", i, j);
  return j;
}

void pre_tokenize(PreTokenizer pre, std::string_view text, std::vector<std::string_view>& out) {
  size_t i = 0;
  while (i < text.size()) {
    const size_t j = next_pre_token_end(pre, text, i);
    out.emplace_back(text.substr(i, j - i));
    i = j;
  }
}

std::vector<std::string_view> pre_tokenize(PreTokenizer pre, std::string_view text) {
  std::vector<std::string_view> out;
  pre_tokenize(pre, text, out);
  return out;
}

}  // namespace tessera
