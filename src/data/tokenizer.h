// Byte-level BPE tokenizer: loads GPT-2's encoder.json + vocab.bpe or a Hugging Face tokenizer.json
// (byte-level BPE, e.g. Qwen3), encodes exactly as those reference tokenizers do (special tokens
// included), decodes, and saves itself as tokenizer.json. Training lives in bpe_trainer.h.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

// The pre-tokenizer regex family (how text is split before BPE merges).
enum class PreTokenizer {
  gpt2,   // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  qwen2,  // Qwen2/Qwen3 (= cl100k-style with single digits):
          // (?i:'s|'t|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|
          // ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
};

// The vocabulary as model files list it (GGUF's tokenizer.ggml.*, tokenizer.json's model): one
// entry per id 0..vocab_size()-1, tokens in the byte-level alphabet (added tokens as their
// content), merges in rank order as "left right" in the byte-level alphabet.
struct TokenizerVocabulary {
  enum class Kind { normal, special, added, unused };  // unused: an id no token has (a hole)
  PreTokenizer pre = PreTokenizer::gpt2;
  bool nfc = false;            // text is NFC-normalized before pre-tokenization
  bool ignore_merges = false;  // a pre-token found whole in the vocabulary skips the merges
  std::vector<std::string> tokens;
  std::vector<Kind> kinds;
  std::vector<std::string> merges;
};

class Tokenizer {
 public:
  static Tokenizer load_gpt2(const std::string& encoder_json_path,
                             const std::string& vocab_bpe_path);
  static Tokenizer load_hf_json(const std::string& tokenizer_json_path);
  static Tokenizer from_hf_json(const std::string& json_text, const std::string& source_name);

  // allow_special: text spans equal to a special token (e.g. "<|endoftext|>") become its id.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  std::string decode(std::span<const int32_t> ids) const;

  int vocab_size() const;  // max id + 1 (special tokens included)
  int eot_id() const;      // document separator ("<|endoftext|>" or the configured one), or -1
  TokenizerVocabulary vocabulary() const;
  std::string to_hf_json() const;  // canonical tokenizer.json text (byte-level BPE model)
  void save_hf_json(const std::string& path) const;
  std::string hash() const;  // sha256 hex of to_hf_json(): identifies the tokenizer in datasets

  struct Impl;
  Tokenizer();
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  const Impl& impl() const { return *impl_; }

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tessera
