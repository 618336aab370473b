// The offline distillation teacher cache: for training windows of one token dataset at one seq_len,
// the teacher's K largest logits per position, their token ids, and its tempered log-sum-exps
// over the whole vocabulary and over the other ids (the tail) at each cached temperature.
// `tessera distill-cache` writes it (TeacherCacheWriter, atomic like the token dataset) and a
// recipe with distill.teacher_cache reads it per rank, one window at a time (TeacherCache). Not
// here: running the teacher (train/distill_cache.h) or the sparse KD loss (ops.h kd_sparse_*).
//
// Letters: W cached windows, T seq_len, K top-k, nT cached temperatures.
// Layout (format_version 1):
//   /windows      (W) i64          the dataset's train windows cached (loader.h numbers them),
//                                  strictly increasing; row r of the datasets below is windows[r]
//   /topk_logits  (W, T, K) f32    the teacher's raw logits (not divided by t), descending
//   /topk_ids     (W, T, K) i32    their vocabulary ids
//   /lse          (nT, 2, W, T) f32  log sum_j exp(z_j / t) for t = temperatures[i] over every
//                                  real id ([i][0]) and over the ids not among the K ([i][1];
//                                  -inf when K = vocab_size)
//   /temperatures (nT) f32         increasing
//   Position p of window w is the teacher's prediction of token w*T + p + 1 (the target).
//   The three row datasets are chunked one window per chunk, stored raw (no checksum: training
//   reads whole chunks with H5Dread_chunk, the fast path; the cache is rebuildable derived data).
//   Root attributes: format_version, top_k, seq_len, vocab_size, dataset_windows (the dataset's
//   train windows at T), tokenizer_hash, dataset_key (TokenDataset::content_key), dataset (its
//   path when written), teacher (the checkpoint step directory), teacher_precision, created_by.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/fs_util.h"
#include "io/h5.h"

namespace tessera {

class TokenDataset;

inline constexpr int kTeacherCacheFormatVersion = 1;

struct TeacherCacheMeta {
  int top_k = 0;       // K
  int seq_len = 0;     // T
  int vocab_size = 0;  // the real vocabulary
  int64_t dataset_windows = 0;
  std::vector<float> temperatures;  // (nT) increasing
  std::string tokenizer_hash, dataset_key, dataset, teacher, teacher_precision, created_by;
};

// Host rows of some windows, as the loss reads them: for row b of a micro-batch of B windows,
// logits/ids [b*T*K, (b+1)*T*K) and lse[(i*2 + h)*B*T + b*T + p] for temperature i, row h.
struct TeacherRows {
  std::vector<float> topk_logits;  // (B, T, K)
  std::vector<int32_t> topk_ids;   // (B, T, K)
  std::vector<float> lse;          // (nT, 2, B, T)
};

// Writes a cache whose window list is known up front; rows are written in that order, any number
// at a time. Atomic: everything goes to "<path>.tmp-<pid>", which commit() fsyncs and renames
// over `path`; a writer destroyed before commit() removes its temporary file.
class TeacherCacheWriter {
 public:
  TeacherCacheWriter(const std::string& path, const TeacherCacheMeta& meta,
                     std::vector<int64_t> windows);
  ~TeacherCacheWriter();
  TeacherCacheWriter(const TeacherCacheWriter&) = delete;
  TeacherCacheWriter& operator=(const TeacherCacheWriter&) = delete;

  // The next `count` windows' rows, laid out as TeacherRows with B = count.
  void write(int64_t count, const TeacherRows& rows);
  int64_t num_written() const { return written_; }
  void commit();  // needs every window written

 private:
  io::TempPath temp_;  // first member: destroyed last, after the HDF5 handles are closed
  std::string path_;
  TeacherCacheMeta meta_;
  int64_t num_windows_ = 0, written_ = 0;
  io::h5::File file_;
  io::h5::Handle logits_, ids_, lse_;
};

class TeacherCache {
 public:
  // Reads and checks what describes the file (format, attributes, shapes, the window list). Any
  // problem is a user error naming the file.
  static TeacherCache open(const std::string& path);

  const std::string& path() const { return path_; }
  const TeacherCacheMeta& meta() const { return meta_; }
  int64_t num_windows() const { return int64_t(windows_.size()); }

  // User errors unless the cache was made for `dataset`'s train split at seq_len T (its
  // tokenizer, content key and window count); `who` names the setting, e.g. the recipe's key.
  void check_dataset(const TokenDataset& dataset, int seq_len, const std::string& who) const;
  // The index of `temperature` among the cached ones (within 1e-6 relative), or -1.
  int temperature_index(float temperature) const;

  // Row b of `rows` (sized for B windows) from dataset window `window`. A window the cache lacks
  // is a user error naming it and `context`. Not thread-safe: one reader per thread.
  void read(int64_t window, int b, int B, TeacherRows& rows, const std::string& context) const;
  static void resize(TeacherRows& rows, const TeacherCacheMeta& m, int B);

 private:
  std::string path_;
  TeacherCacheMeta meta_;
  std::vector<int64_t> windows_;
  io::h5::File file_;
  io::h5::Handle logits_, ids_, lse_;
};

}  // namespace tessera
