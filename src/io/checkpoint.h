// Sharded, reshardable HDF5 checkpoints, written atomically; tensors by global name and shape.
//
// Layout on disk (format_version 1):
//   <root>/checkpoints/step_<N>/
//     shard_<rank>_of_<world>.h5   one per rank; root attributes format_version, step, rank,
//                                  world and tessera_format = "tessera-checkpoint"
//       /tensors/<global name>     THIS rank's slice of the tensor, e.g. "layers.3.attn.wq.weight"
//                                  or "optim.m.layers.3.attn.wq.weight" (no '/' in names), with
//                                  attributes dtype (f32 f64 i32 i8 bf16 f16 e4m3 e5m2),
//                                  global_shape (int64[]) and offset (int64[], the slice's start
//                                  in each dim). Chunked with Fletcher-32 checksums, so a
//                                  flipped byte fails the load.
//       /meta/<key>                (shard 0 only) string metadata: recipe, rng, loader, ...
//     COMPLETE                     text, written last (after every shard is fsynced), before the
//                                  directory gets its final name; a step dir without it is ignored
// All metadata lives in HDF5 (shard 0) apart from the COMPLETE marker, so a checkpoint is
// self-describing to h5dump/h5py. A single process writes whole tensors (offset all zero).
// Dtypes: f32, f64, i32, i8 are stored as native HDF5 numbers; bf16/f16 as u16 bit patterns and
// e4m3/e5m2 as u8 bit patterns (the dtype attribute says which); packed int4 is not supported
// here (exports handle it). Slices must be boxes and must not overlap across shards (a replicated
// tensor, e.g. under data parallelism, is written by one replica only).
//
// Atomic commit: each rank writes its shard into <root>/checkpoints/.tmp-step_<N>/ and fsyncs it
// (write_shard); after a barrier that the CALLER runs, rank 0 (finalize) checks every shard, writes
// and fsyncs COMPLETE, fsyncs the directory, renames it to step_<N> (an existing step_<N> is
// swapped out atomically and then deleted), fsyncs checkpoints/, removes stale temporaries of
// earlier steps and prunes to the newest `keep` checkpoints. A crash at any point leaves every
// earlier checkpoint intact. Requires a file system shared by all ranks; one job writes a root at a
// time. Loading (CheckpointReader::read_slice) assembles any box from whichever shards hold parts
// of it, so a checkpoint saved under one (tp, pp) layout loads under any other.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/h5.h"

namespace tessera::io {

constexpr int64_t kCheckpointFormatVersion = 1;
constexpr const char* kCompleteMarker = "COMPLETE";

// One rank's slice of a tensor, in host memory.
struct TensorSlice {
  std::string name;  // global name
  DType dtype = DType::f32;
  std::vector<int64_t> global_shape;  // the whole tensor; empty for a scalar
  std::vector<int64_t> offset;        // start of this slice in each dim
  std::vector<int64_t> shape;         // extent of this slice in each dim
  const void* data = nullptr;         // row-major, prod(shape) elements of dtype
};

std::string checkpoints_dir(const std::string& root_dir);  // <root>/checkpoints
std::string step_dir_name(int64_t step);                   // step_<N>
std::string shard_file_name(int rank, int world);          // shard_<rank>_of_<world>.h5

class CheckpointWriter {
 public:
  // Creates the temporary directory (if needed) and this rank's shard file in it.
  CheckpointWriter(const std::string& root_dir, int64_t step, int rank, int world);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Writes the slice immediately (`data` may be reused once this returns).
  void add(const TensorSlice& slice);
  // String metadata; rank 0 only (metadata is global). Values must not contain NUL bytes.
  void set_meta(const std::string& key, const std::string& value);
  // Every rank: closes and fsyncs this rank's shard. No add/set_meta afterwards.
  void write_shard();
  // Rank 0, after every rank's write_shard() (the caller's barrier). Returns the step dir.
  // keep >= 1 prunes to the newest `keep` complete checkpoints; keep == 0 keeps all.
  std::string finalize(int keep);
  // A single process (world == 1): write_shard() then finalize(keep).
  std::string commit(int keep);

  const std::string& temp_dir() const { return temp_dir_; }

 private:
  std::string root_dir_, temp_dir_, shard_path_;
  int64_t step_;
  int rank_, world_;
  h5::File file_;
  h5::Handle tensors_group_, meta_group_;
  bool shard_written_ = false;
};

// Rank 0's half of a commit, usable without a writer object (see CheckpointWriter::finalize).
std::string finalize_checkpoint(const std::string& root_dir, int64_t step, int world, int keep);

// Deletes all but the newest `keep` complete checkpoints (keep == 0: none) and leftovers of
// interrupted replacements and prunes. Returns the removed step dirs.
std::vector<std::string> prune_checkpoints(const std::string& root_dir, int keep);

// True when `step_dir` holds the COMPLETE marker.
bool is_complete_checkpoint(const std::string& step_dir);
// The highest complete <root>/checkpoints/step_<N>, or "" when there is none.
std::string latest_checkpoint(const std::string& root_dir);
// checkpoint.resume: "" -> "" (no resume); "latest" -> latest_checkpoint(root) or "" (logged:
// starting fresh); anything else is a step directory that must exist and be complete
// (TS_USER_ERROR naming it otherwise).
std::string resolve_resume(const std::string& root_dir, const std::string& spec);

class CheckpointReader {
 public:
  // Opens a complete step directory; validates every shard's header and indexes its tensors.
  static CheckpointReader open(const std::string& step_dir);

  const std::string& path() const { return dir_; }
  int64_t step() const { return step_; }
  int num_shards() const { return world_; }

  std::vector<std::string> tensor_names() const;  // sorted
  bool has_tensor(const std::string& name) const;
  DType dtype(const std::string& name) const;
  const std::vector<int64_t>& global_shape(const std::string& name) const;
  int64_t numel(const std::string& name) const;

  // Fills `out` (row-major, prod(shape) elements of dtype(name)) with the box
  // [offset, offset + shape) of the global tensor, from any shards that hold parts of it.
  // A box outside the global shape, or an element no shard holds, is a user error.
  void read_slice(const std::string& name, const std::vector<int64_t>& offset,
                  const std::vector<int64_t>& shape, void* out) const;
  void read_full(const std::string& name, void* out) const;

  bool has_meta(const std::string& key) const;
  std::string meta(const std::string& key) const;  // TS_USER_ERROR naming key and path if missing
  std::vector<std::string> meta_keys() const;

 private:
  struct Piece {
    int shard_idx = 0;
    std::vector<int64_t> offset, shape;
  };
  struct Entry {
    DType dtype = DType::f32;
    std::vector<int64_t> global_shape;
    std::vector<Piece> pieces;
  };
  const Entry& entry(const std::string& name) const;
  h5::File& shard(int shard_idx) const;

  std::string dir_;
  int64_t step_ = 0;
  int world_ = 0;
  std::vector<std::string> shard_paths_;
  std::map<std::string, Entry> entries_;
  std::vector<std::string> meta_keys_;
  // Shard files are opened on first use: a rank loading its slice touches only the shards that
  // overlap it, so thousands of shards do not mean thousands of open files.
  mutable std::vector<std::unique_ptr<h5::File>> files_;
};

}  // namespace tessera::io
