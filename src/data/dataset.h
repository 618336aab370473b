// The HDF5 token dataset that `tessera prepare` writes and training reads: a train and a val split
// of token ids with document boundaries, plus the tokenizer that produced them. Written as a
// stream (TokenDatasetWriter) and read on demand (TokenDataset::source), so neither side holds a
// split in memory. Not here: how text becomes documents (prepare.h) or which windows training
// reads (loader.h).
//
// Layout (format_version 1):
//   /train/tokens, /val/tokens   1-D, uint16 when vocab_size <= 65536 else uint32; chunked
//                                (kTokenChunkElements per chunk; files of earlier builds used
//                                1 Mi), shuffle + deflate level 1 + Fletcher-32 checksum
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
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/token_source.h"
#include "io/fs_util.h"
#include "io/h5.h"

namespace tessera {

class Tokenizer;

inline constexpr int kTokenDatasetFormatVersion = 1;
// Tokens per stored chunk (128 KiB as uint16): a window read decompresses one or two chunks.
inline constexpr int64_t kTokenChunkElements = int64_t(1) << 16;

enum class Split { train = 0, val = 1 };
inline constexpr Split kSplits[2] = {Split::train, Split::val};
const char* split_name(Split split);  // "train", "val"

struct SourceFile {
  std::string name;    // the file name as recorded (see prepare.h)
  std::string sha256;  // hex of the file's bytes
};

// A whole split in memory (tests and small tools; training reads through TokenDataset::source).
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

// Writes a token dataset document by document: tokens are appended to the file a chunk at a time,
// so memory holds at most one chunk per split. Atomic: everything goes to "<path>.tmp-<pid>",
// which commit() flushes, fsyncs and renames over `path` (then fsyncs the directory); a writer
// destroyed before commit() removes its temporary file, so a crash or an error leaves either the
// old file or the new one. Failures are system errors; broken invariants (an id >= vocab_size,
// metadata that disagrees with the writer) are bugs.
class TokenDatasetWriter {
 public:
  TokenDatasetWriter(const std::string& path, int64_t vocab_size);
  ~TokenDatasetWriter();
  TokenDatasetWriter(const TokenDatasetWriter&) = delete;
  TokenDatasetWriter& operator=(const TokenDatasetWriter&) = delete;

  // Appends one document (its tokens, the eot separator included) to `split`.
  void add_document(Split split, std::span<const uint32_t> tokens);
  int64_t num_tokens(Split split) const { return streams_[int(split)].num_tokens; }
  int64_t num_docs(Split split) const { return streams_[int(split)].num_docs; }
  // Writes `meta` (whose vocab_size must be the writer's) as the root attributes and commits.
  void commit(const TokenDatasetMeta& meta);

 private:
  struct Stream {  // one split's two datasets and their unwritten tails
    io::h5::Handle group, tokens, offsets;
    std::vector<uint32_t> token_tail;  // fewer than one chunk, written by flush()
    std::vector<int64_t> offset_tail;
    int64_t num_tokens = 0, num_docs = 0;
  };
  void flush(Stream& s, bool all);

  io::TempPath temp_;  // first member: destroyed last, after the HDF5 handles are closed
  std::string path_;
  int64_t vocab_size_;
  io::h5::File file_;
  Stream streams_[2];
};

// Writes whole splits through TokenDatasetWriter (tests and small tools). Checks the splits first
// (ids < vocab_size, offsets as documented): a violation is a bug.
void write_token_dataset(const std::string& path, const TokenDatasetMeta& meta,
                         const TokenSplit& train, const TokenSplit& val);

class TokenDataset {
 public:
  // Reads and checks what describes the file, not its tokens: format_version, every required
  // attribute, tokenizer_hash = sha256(tokenizer_json), each split's datasets (types, shapes, the
  // first and last doc offset). Token ids are checked as they are read. Any problem, including a
  // missing, truncated, corrupt or non-HDF5 file, is a user error naming the file and the problem.
  static TokenDataset open(const std::string& path);

  const std::string& path() const { return path_; }
  const TokenDatasetMeta& meta() const { return meta_; }
  int64_t vocab_size() const { return meta_.vocab_size; }
  const std::string& tokenizer_json() const { return meta_.tokenizer_json; }
  const std::string& tokenizer_hash() const { return meta_.tokenizer_hash; }
  // `split` is "train" or "val"; anything else is a user error.
  int64_t num_tokens(std::string_view split) const;
  int64_t num_docs(std::string_view split) const;

  // The split's tokens, read from the file on demand in its stored dtype through a bounded chunk
  // cache (the source keeps the file open; names itself "<path> /<split>").
  std::shared_ptr<const TokenSource> source(std::string_view split) const;
  // The whole split in memory, its ids and doc_offsets checked (tools and tests).
  TokenSplit read_split(std::string_view split) const;

  // A key for the split's tokens without reading them: sha256 hex of what determines them (the
  // tokenizer hash, each source file's name and sha256, val_fraction, doc_chars, split_rule, and
  // both splits' token and document counts). Files derived from the dataset (a teacher cache)
  // record it to be matched back.
  std::string content_key() const;

  // User error unless `tokenizer` is the one this dataset was made with; the message names both
  // hashes, the dataset file and `tokenizer_source` (e.g. the recipe's tokenizer spec).
  void check_tokenizer(const Tokenizer& tokenizer, std::string_view tokenizer_source) const;
  void check_tokenizer_hash(std::string_view hash, std::string_view tokenizer_source) const;

 private:
  struct SplitInfo {
    int64_t num_tokens = 0, num_docs = 0;
    size_t token_bytes = 0;  // 2 or 4
  };
  const SplitInfo& info(std::string_view split) const;

  std::string path_;
  TokenDatasetMeta meta_;
  SplitInfo splits_[2];
};

}  // namespace tessera
