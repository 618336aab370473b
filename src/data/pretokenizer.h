// Pre-tokenizers: split text into the pieces BPE merges within, exactly as the GPT-2 and Qwen2/3
// regexes do under a backtracking engine (Oniguruma in Hugging Face tokenizers, JS RegExp in
// tiktoken ports), but hand-written over code points classified with ICU. No BPE here.
#pragma once
#include <optional>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace tessera {

// The patterns as tokenizer.json spells them (pre_tokenizer Split.pattern.Regex).
inline constexpr std::string_view kGpt2PreTokenizerRegex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2PreTokenizerRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|)"
    R"(\s*[\r\n]+|\s+(?!\S)|\s+)";

std::string_view pre_tokenizer_regex(PreTokenizer pre);
std::string_view pre_tokenizer_name(PreTokenizer pre);  // "gpt2" or "qwen2"
std::optional<PreTokenizer> parse_pre_tokenizer_name(std::string_view name);

// Appends the pre-tokens of `text` to `out`; they concatenate back to `text` exactly.
// Semantics, per code point (UTF-8 decoded):
//   \p{L}, \p{N}: ICU general categories L* and N*;  \s: Unicode White_Space (u_isUWhiteSpace),
//   as in Oniguruma and Rust. JavaScript's \s differs on U+0085 (not space in JS) and U+FEFF
//   (space in JS only).
//   Qwen's (?i:...) contractions fold case as Unicode does, so U+017F (long s) matches 's'.
//   A byte that does not start a valid UTF-8 sequence is one character of its own that is
//   neither letter, number nor space, so invalid input still splits (and round-trips).
void pre_tokenize(PreTokenizer pre, std::string_view text, std::vector<std::string_view>& out);
// The streaming form: the end of the pre-token that starts at byte `i` (< text.size()).
size_t next_pre_token_end(PreTokenizer pre, std::string_view text, size_t i);
std::vector<std::string_view> pre_tokenize(PreTokenizer pre, std::string_view text);

}  // namespace tessera
