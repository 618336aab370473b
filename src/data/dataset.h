// The HDF5 token dataset that `tessera prepare` writes and training reads: a train and a val split
// of token ids with document boundaries, plus the tokenizer that produced them.
// Not here: how text becomes documents (prepare.h) or how windows are sampled (loader.h).
//
// Layout (format_version 1):
//   /train/tokens, /val/tokens   1-D, uint16 when vocab_size <= 65536 else uint32; chunked,
//                                shuffle + deflate level 1 + Fletcher-32 checksum
//   /train/doc_offsets, /val/doc_offsets
//                                1-D int64, num_docs + 1 entries: document d is
//                                tokens[doc_offsets[d], doc_offsets[d + 1]); offsets start at 0,
//                                never decrease and end at the token count.
//   Document convention: each document's tokens are encode(text) followed by the tokenizer's eot
//   token (root attribute eot_id) when it has one (eot_id = -1: no separator). The eot belongs to
//   the document it ends, so the token stream of a split is doc 0, eot, doc 1, eot, ...
//   Root attributes: format_version (int), tokenizer_json (string: the full tokenizer.json),
//   tokenizer_hash (sha256 hex of tokenizer_json), vocab_size (int), eot_id (int),
//   source_files (strings: file names), source_sha256 (strings: sha256 hex of each file's bytes),
//   val_fraction (double), doc_chars (int), split_rule (string: how documents were assigned),
//   created_by (string).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

class Tokenizer;

inline constexpr int kTokenDatasetFormatVersion = 1;

struct SourceFile {
  std::string name;    // the file name as recorded (see prepare.h)
  std::string sha256;  // hex of the file's bytes
};

struct TokenSplit {
  std::vector<uint32_t> tokens;      // (N,) every id < vocab_size
  std::vector<int64_t> doc_offsets;  // (D + 1,) 0 = doc_offsets[0] <= ... <= doc_offsets[D] = N
  int64_t num_docs() const { return static_cast<int64_t>(doc_offsets.size()) - 1; }
};

struct TokenDatasetMeta {
  std::string tokenizer_json;
  std::string tokenizer_hash;
  int64_t vocab_size = 0;
  int64_t eot_id = -1;
  std::vector<SourceFile> sources;
  double val_fraction = 0.0;
  int64_t doc_chars = 0;
  std::string split_rule;
  std::string created_by;
};

// Writes `path` atomically: into "<path>.tmp-<pid>", flushed, closed and fsync'ed, then renamed
// over `path` (and the directory fsync'ed), so a crash leaves either the old file or the new one.
// Validates the splits first (ids < vocab_size, offsets as documented): a violation is a bug.
void write_token_dataset(const std::string& path, const TokenDatasetMeta& meta,
                         const TokenSplit& train, const TokenSplit& val);

class TokenDataset {
 public:
  // Reads and validates the whole file: format_version, every required attribute and dataset, the
  // token dtype, every id < vocab_size, doc_offsets, and tokenizer_hash = sha256(tokenizer_json).
  // Any problem, including a missing, truncated, corrupt or non-HDF5 file, is a user error naming
  // the file and the problem.
  static TokenDataset open(const std::string& path);

  const std::string& path() const { return path_; }
  const TokenDatasetMeta& meta() const { return meta_; }
  int64_t vocab_size() const { return meta_.vocab_size; }
  const std::string& tokenizer_json() const { return meta_.tokenizer_json; }
  const std::string& tokenizer_hash() const { return meta_.tokenizer_hash; }
  const TokenSplit& train() const { return train_; }
  const TokenSplit& val() const { return val_; }
  // "train" or "val"; anything else is a user error.
  const TokenSplit& split(std::string_view name) const;

  // User error unless `tokenizer` is the one this dataset was made with; the message names both
  // hashes, the dataset file and `tokenizer_source` (e.g. the recipe's tokenizer spec).
  void check_tokenizer(const Tokenizer& tokenizer, std::string_view tokenizer_source) const;
  void check_tokenizer_hash(std::string_view hash, std::string_view tokenizer_source) const;

 private:
  std::string path_;
  TokenDatasetMeta meta_;
  TokenSplit train_;
  TokenSplit val_;
};

}  // namespace tessera
