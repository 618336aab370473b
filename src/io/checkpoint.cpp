// Checkpoint writer (per-rank shards, rank 0's atomic commit and pruning), discovery of complete
// checkpoints, and the reader that assembles any box of a tensor from any shard layout.
// The on-disk format is described in checkpoint.h.
#include "io/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "core/error.h"
#include "core/log.h"
#include "io/fs_util.h"

namespace tessera::io {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormatTag = "tessera-checkpoint";
constexpr const char* kTempPrefix = ".tmp-step_";
constexpr const char* kOldPrefix = ".old-step_";
constexpr const char* kTrashPrefix = ".trash-step_";

// How each dtype is stored. The names are part of the file format (fixed here, not taken from
// dtype_name(), so renaming a dtype in core cannot make old checkpoints unreadable).
struct DiskType {
  DType dtype;
  const char* name;
  size_t bytes;
};
constexpr DiskType kDiskTypes[] = {
    {DType::f32, "f32", 4},   {DType::f64, "f64", 8},   {DType::i32, "i32", 4},
    {DType::i8, "i8", 1},     {DType::bf16, "bf16", 2}, {DType::f16, "f16", 2},
    {DType::e4m3, "e4m3", 1}, {DType::e5m2, "e5m2", 1},
};

const DiskType* find_disk_type(DType t) {
  for (const DiskType& d : kDiskTypes)
    if (d.dtype == t) return &d;
  return nullptr;
}

const DiskType* find_disk_type(const std::string& name) {
  for (const DiskType& d : kDiskTypes)
    if (name == d.name) return &d;
  return nullptr;
}

// HDF5 type ids are runtime values (the library must be initialised), hence functions.
hid_t file_type_of(DType t) {
  switch (t) {
    case DType::f32: return H5T_IEEE_F32LE;
    case DType::f64: return H5T_IEEE_F64LE;
    case DType::i32: return H5T_STD_I32LE;
    case DType::i8: return H5T_STD_I8LE;
    case DType::bf16:
    case DType::f16: return H5T_STD_U16LE;  // bit patterns
    case DType::e4m3:
    case DType::e5m2: return H5T_STD_U8LE;  // bit patterns
    default: TS_BUG("dtype {} has no checkpoint storage type", int(t));
  }
}

hid_t mem_type_of(DType t) {
  switch (t) {
    case DType::f32: return H5T_NATIVE_FLOAT;
    case DType::f64: return H5T_NATIVE_DOUBLE;
    case DType::i32: return H5T_NATIVE_INT32;
    case DType::i8: return H5T_NATIVE_INT8;
    case DType::bf16:
    case DType::f16: return H5T_NATIVE_UINT16;
    case DType::e4m3:
    case DType::e5m2: return H5T_NATIVE_UINT8;
    default: TS_BUG("dtype {} has no checkpoint storage type", int(t));
  }
}

std::string shape_text(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", v[i]);
  return s + ")";
}

int64_t product(const std::vector<int64_t>& v) {
  int64_t n = 1;
  for (int64_t d : v) n *= d;
  return n;
}

bool valid_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

std::string join_path(const std::string& a, const std::string& b) {
  return (fs::path(a) / b).string();
}

std::string temp_dir_for(const std::string& root_dir, int64_t step) {
  return join_path(checkpoints_dir(root_dir), fmt::format("{}{}", kTempPrefix, step));
}

// The checked header of one shard file.
struct ShardHeader {
  int64_t format_version = 0, step = 0, rank = 0, world = 0;
};

int64_t read_scalar_attr(const h5::File& f, const char* name) {
  if (!h5::attr_exists(f.ctx(), f.id(), name))
    TS_USER_ERROR("{} is not a tessera checkpoint shard: root attribute '{}' is missing", f.path(),
                  name);
  const std::vector<int64_t> v = h5::read_attr_i64s(f.ctx(), f.id(), name);
  if (v.size() != 1)
    TS_USER_ERROR("{}: root attribute '{}' must hold one integer, found {}", f.path(), name,
                  v.size());
  return v[0];
}

ShardHeader read_shard_header(const h5::File& f) {
  if (!h5::attr_exists(f.ctx(), f.id(), "tessera_format") ||
      h5::read_attr_string(f.ctx(), f.id(), "tessera_format") != kFormatTag)
    TS_USER_ERROR("{} is not a tessera checkpoint shard (root attribute tessera_format != '{}')",
                  f.path(), kFormatTag);
  ShardHeader h;
  h.format_version = read_scalar_attr(f, "format_version");
  h.step = read_scalar_attr(f, "step");
  h.rank = read_scalar_attr(f, "rank");
  h.world = read_scalar_attr(f, "world");
  if (h.format_version < 1 || h.format_version > kCheckpointFormatVersion)
    TS_USER_ERROR("{}: format_version {} is not readable by this build (reads 1 to {})", f.path(),
                  h.format_version, kCheckpointFormatVersion);
  return h;
}

void expect_header(const h5::File& f, const ShardHeader& h, int64_t step, int rank, int world) {
  if (h.step != step || h.rank != rank || h.world != world)
    TS_USER_ERROR("{}: header says step {}, rank {} of {}; expected step {}, rank {} of {}",
                  f.path(), h.step, h.rank, h.world, step, rank, world);
}

// Removes leftovers of interrupted commits and prunes: temporaries of steps before
// `stale_temp_before` (later ones may be in progress on other ranks), and every aside/trash dir
// (only rank 0 creates those, and never concurrently with this).
void remove_leftovers(const std::string& ck_dir, int64_t stale_temp_before) {
  std::error_code ec;
  if (!fs::exists(ck_dir, ec)) return;
  std::vector<std::string> doomed;
  for (fs::directory_iterator it(ck_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    int64_t step = 0;
    if (name.rfind(kOldPrefix, 0) == 0 || name.rfind(kTrashPrefix, 0) == 0) {
      doomed.push_back(it->path().string());
    } else if (name.rfind(kTempPrefix, 0) == 0 &&
               parse_step_dir_name("step_" + name.substr(std::string(kTempPrefix).size()), &step) &&
               step < stale_temp_before) {
      doomed.push_back(it->path().string());
    }
  }
  if (ec) TS_SYSTEM_ERROR("listing directory {}: {}", ck_dir, ec.message());
  for (const std::string& p : doomed) remove_tree(p);
  if (!doomed.empty()) fsync_dir(ck_dir);
}

std::vector<std::string> prune_impl(const std::string& root_dir, int keep, int64_t protect_step) {
  TS_CHECK(keep >= 0, "keep = {} (0 keeps all)", keep);
  const std::string ck_dir = checkpoints_dir(root_dir);
  std::vector<std::string> removed;
  if (keep == 0) return removed;
  std::vector<StepDir> complete;
  for (const StepDir& d : list_step_dirs(ck_dir))
    if (is_complete_checkpoint(d.path)) complete.push_back(d);
  const size_t num_remove = complete.size() > size_t(keep) ? complete.size() - size_t(keep) : 0;
  for (size_t i = 0; i < num_remove; ++i) {
    if (complete[i].step == protect_step) continue;
    // Rename first, so a crash mid-delete never leaves a half-deleted step_<N> that still looks
    // complete; the trash is removed here or by the next prune.
    const std::string trash =
        join_path(ck_dir, fmt::format("{}{}", kTrashPrefix, complete[i].step));
    remove_tree(trash);
    rename_path(complete[i].path, trash);
    fsync_dir(ck_dir);
    remove_tree(trash);
    removed.push_back(complete[i].path);
  }
  return removed;
}

}  // namespace

std::string checkpoints_dir(const std::string& root_dir) {
  return join_path(root_dir, "checkpoints");
}

std::string step_dir_name(int64_t step) { return fmt::format("step_{}", step); }

std::string shard_file_name(int rank, int world) {
  return fmt::format("shard_{}_of_{}.h5", rank, world);
}

// ---------------------------------------------------------------------------------------------
// Writer

CheckpointWriter::CheckpointWriter(const std::string& root_dir, int64_t step, int rank, int world)
    : root_dir_(root_dir), step_(step), rank_(rank), world_(world) {
  TS_CHECK(world >= 1 && rank >= 0 && rank < world, "rank {} of world {}", rank, world);
  TS_CHECK(step >= 0, "checkpoint step {}", step);
  temp_dir_ = temp_dir_for(root_dir, step);
  shard_path_ = join_path(temp_dir_, shard_file_name(rank, world));
  make_dirs(temp_dir_);  // every rank: idempotent, and no rank waits for another
  file_ = h5::File::create(shard_path_);
  const h5::Ctx& ctx = file_.ctx();
  h5::write_attr_string(ctx, file_.id(), "tessera_format", kFormatTag);
  h5::write_attr_i64s(ctx, file_.id(), "format_version", {kCheckpointFormatVersion});
  h5::write_attr_i64s(ctx, file_.id(), "step", {step});
  h5::write_attr_i64s(ctx, file_.id(), "rank", {rank});
  h5::write_attr_i64s(ctx, file_.id(), "world", {world});
  tensors_group_ = h5::create_group(ctx, file_.id(), "tensors");
  if (rank == 0) meta_group_ = h5::create_group(ctx, file_.id(), "meta");
}

// An unfinished writer (an exception mid-save) just closes its file: the temporary directory is
// never renamed, so readers never see it, and a later commit removes it.
CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::add(const TensorSlice& s) {
  TS_CHECK(!shard_written_, "add('{}') after write_shard()", s.name);
  TS_CHECK(valid_name(s.name), "tensor name '{}' (empty, '.', or contains '/')", s.name);
  const DiskType* disk = find_disk_type(s.dtype);
  TS_CHECK(disk != nullptr, "tensor '{}': dtype {} cannot be checkpointed (int4 is export-only)",
           s.name, int(s.dtype));
  const size_t ndim = s.global_shape.size();
  TS_CHECK(s.offset.size() == ndim && s.shape.size() == ndim,
           "tensor '{}': global shape {}, offset {}, slice shape {} differ in rank", s.name,
           shape_text(s.global_shape), shape_text(s.offset), shape_text(s.shape));
  for (size_t d = 0; d < ndim; ++d)
    TS_CHECK(s.offset[d] >= 0 && s.shape[d] >= 0 && s.offset[d] + s.shape[d] <= s.global_shape[d],
             "tensor '{}': slice offset {} shape {} outside global shape {}", s.name,
             shape_text(s.offset), shape_text(s.shape), shape_text(s.global_shape));
  const int64_t numel = product(s.shape);
  TS_CHECK(numel == 0 || s.data != nullptr, "tensor '{}': null data", s.name);
  const h5::Ctx& ctx = file_.ctx();
  TS_CHECK(!h5::link_exists(ctx, tensors_group_.id(), s.name), "tensor '{}' added twice to {}",
           s.name, shard_path_);
  h5::Handle dset = h5::create_dataset(ctx, tensors_group_.id(), s.name, file_type_of(s.dtype),
                                       s.shape, disk->bytes, /*checksum=*/true);
  if (numel > 0) h5::write_dataset(ctx, dset.id(), mem_type_of(s.dtype), s.data, s.name);
  h5::write_attr_string(ctx, dset.id(), "dtype", disk->name);
  h5::write_attr_i64s(ctx, dset.id(), "global_shape", s.global_shape);
  h5::write_attr_i64s(ctx, dset.id(), "offset", s.offset);
  dset.close(ctx, "H5Dclose", s.name);
}

void CheckpointWriter::set_meta(const std::string& key, const std::string& value) {
  TS_CHECK(rank_ == 0, "set_meta('{}') on rank {}: metadata is global and written by rank 0", key,
           rank_);
  TS_CHECK(!shard_written_, "set_meta('{}') after write_shard()", key);
  TS_CHECK(valid_name(key), "metadata key '{}' (empty, '.', or contains '/')", key);
  const h5::Ctx& ctx = file_.ctx();
  // Setting a key twice keeps the last value.
  if (h5::link_exists(ctx, meta_group_.id(), key))
    h5::check(H5Ldelete(meta_group_.id(), key.c_str(), H5P_DEFAULT), ctx, "H5Ldelete", key);
  h5::write_string_dataset(ctx, meta_group_.id(), key, value);
}

void CheckpointWriter::write_shard() {
  TS_CHECK(!shard_written_, "write_shard() called twice");
  const h5::Ctx ctx = file_.ctx();
  tensors_group_.close(ctx, "H5Gclose", "tensors");
  meta_group_.close(ctx, "H5Gclose", "meta");
  file_.close();
  fsync_file(shard_path_);
  shard_written_ = true;
}

std::string CheckpointWriter::finalize(int keep) {
  TS_CHECK(rank_ == 0, "finalize() on rank {}: rank 0 commits", rank_);
  TS_CHECK(shard_written_, "finalize() before write_shard()");
  return finalize_checkpoint(root_dir_, step_, world_, keep);
}

std::string CheckpointWriter::commit(int keep) {
  TS_CHECK(world_ == 1,
           "commit() with world {}: call write_shard() on every rank, barrier, "
           "then finalize() on rank 0",
           world_);
  write_shard();
  return finalize(keep);
}

std::string finalize_checkpoint(const std::string& root_dir, int64_t step, int world, int keep) {
  const std::string ck_dir = checkpoints_dir(root_dir);
  const std::string temp = temp_dir_for(root_dir, step);
  std::set<std::string> expected;
  for (int r = 0; r < world; ++r) {
    const std::string name = shard_file_name(r, world);
    const std::string path = join_path(temp, name);
    std::error_code ec;
    if (!fs::is_regular_file(path, ec))
      TS_SYSTEM_ERROR(
          "committing checkpoint step {}: shard {} is missing; every rank must finish "
          "write_shard() before rank 0 finalizes, on a file system all ranks share",
          step, path);
    h5::File f = h5::File::open_read(path);
    expect_header(f, read_shard_header(f), step, r, world);
    f.close();
    expected.insert(name);
  }
  // Whatever else is here comes from an interrupted attempt (e.g. another world size).
  std::error_code ec;
  std::vector<std::string> stale;
  for (fs::directory_iterator it(temp, ec), end; !ec && it != end; it.increment(ec))
    if (!expected.count(it->path().filename().string())) stale.push_back(it->path().string());
  if (ec) TS_SYSTEM_ERROR("listing directory {}: {}", temp, ec.message());
  for (const std::string& p : stale) remove_tree(p);

  write_file_synced(join_path(temp, kCompleteMarker),
                    fmt::format("{}\nformat_version {}\nstep {}\nworld {}\n", kFormatTag,
                                kCheckpointFormatVersion, step, world));
  fsync_dir(temp);
  const std::string final_dir = join_path(ck_dir, step_dir_name(step));
  replace_dir(temp, final_dir, join_path(ck_dir, fmt::format("{}{}", kOldPrefix, step)));
  remove_leftovers(ck_dir, step);
  const std::vector<StepDir> all = list_step_dirs(ck_dir);
  if (!all.empty() && all.back().step > step && is_complete_checkpoint(all.back().path))
    log_warn(
        "checkpoint step {} written, but {} (an earlier run's) is newer: resume: latest "
        "would pick it",
        step, all.back().path);
  prune_impl(root_dir, keep, step);
  return final_dir;
}

std::vector<std::string> prune_checkpoints(const std::string& root_dir, int keep) {
  remove_leftovers(checkpoints_dir(root_dir), /*stale_temp_before=*/0);
  return prune_impl(root_dir, keep, /*protect_step=*/-1);
}

// ---------------------------------------------------------------------------------------------
// Discovery

bool is_complete_checkpoint(const std::string& step_dir) {
  std::error_code ec;
  return fs::is_regular_file(join_path(step_dir, kCompleteMarker), ec);
}

std::string latest_checkpoint(const std::string& root_dir) {
  const std::vector<StepDir> dirs = list_step_dirs(checkpoints_dir(root_dir));
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it)
    if (is_complete_checkpoint(it->path)) return it->path;
  return "";
}

std::string resolve_resume(const std::string& root_dir, const std::string& spec) {
  if (spec.empty()) return "";
  if (spec == "latest") {
    const std::string latest = latest_checkpoint(root_dir);
    if (latest.empty())
      log_info("checkpoint.resume: latest: no complete checkpoint under {}; starting fresh",
               checkpoints_dir(root_dir));
    else
      log_info("checkpoint.resume: latest: resuming from {}", latest);
    return latest;
  }
  std::error_code ec;
  if (!fs::exists(spec, ec))
    TS_USER_ERROR("checkpoint.resume: checkpoint directory '{}' does not exist", spec);
  if (!fs::is_directory(spec, ec))
    TS_USER_ERROR(
        "checkpoint.resume: '{}' is not a checkpoint directory (expected "
        "<run>/checkpoints/step_<N>)",
        spec);
  if (!is_complete_checkpoint(spec))
    TS_USER_ERROR(
        "checkpoint.resume: '{}' is not a complete checkpoint (no {} marker: an "
        "interrupted write, or not a step directory; 'latest' picks the newest "
        "complete one)",
        spec, kCompleteMarker);
  return spec;
}

// ---------------------------------------------------------------------------------------------
// Reader

CheckpointReader CheckpointReader::open(const std::string& step_dir) {
  std::error_code ec;
  if (!fs::exists(step_dir, ec)) TS_USER_ERROR("checkpoint {} does not exist", step_dir);
  if (!fs::is_directory(step_dir, ec))
    TS_USER_ERROR("checkpoint {} is not a directory (expected <run>/checkpoints/step_<N>)",
                  step_dir);
  const std::string marker = join_path(step_dir, kCompleteMarker);
  if (!is_complete_checkpoint(step_dir))
    TS_USER_ERROR(
        "{} is not a complete checkpoint: {} is missing (an interrupted write, or not a "
        "checkpoint directory)",
        step_dir, marker);

  CheckpointReader r;
  r.dir_ = step_dir;
  std::ifstream in(marker);
  if (!in) TS_SYSTEM_ERROR("cannot open {} for reading", marker);
  std::string tag, line;
  std::getline(in, tag);
  if (tag != kFormatTag) TS_USER_ERROR("{}: first line '{}' is not '{}'", marker, tag, kFormatTag);
  std::map<std::string, int64_t> fields;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key;
    int64_t value = 0;
    if (line.empty()) continue;
    if (!(ls >> key >> value)) TS_USER_ERROR("{}: malformed line '{}'", marker, line);
    fields[key] = value;
  }
  for (const char* key : {"format_version", "step", "world"})
    if (!fields.count(key)) TS_USER_ERROR("{}: field '{}' is missing", marker, key);
  if (fields["format_version"] < 1 || fields["format_version"] > kCheckpointFormatVersion)
    TS_USER_ERROR("{}: format_version {} is not readable by this build (reads 1 to {})", marker,
                  fields["format_version"], kCheckpointFormatVersion);
  if (fields["world"] < 1 || fields["world"] > (int64_t(1) << 24))
    TS_USER_ERROR("{}: world {} is not a valid number of shards", marker, fields["world"]);
  r.step_ = fields["step"];
  r.world_ = int(fields["world"]);
  r.files_.resize(size_t(r.world_));

  for (int shard_idx = 0; shard_idx < r.world_; ++shard_idx) {
    const std::string path = join_path(step_dir, shard_file_name(shard_idx, r.world_));
    r.shard_paths_.push_back(path);
    if (!fs::exists(path, ec))
      TS_USER_ERROR("checkpoint {}: shard file {} is missing ({} lists {} shards)", step_dir, path,
                    marker, r.world_);
    h5::File f = h5::File::open_read(path);
    const h5::Ctx& ctx = f.ctx();
    expect_header(f, read_shard_header(f), r.step_, shard_idx, r.world_);
    if (!h5::link_exists(ctx, f.id(), "tensors"))
      TS_USER_ERROR("{}: group /tensors is missing", path);
    h5::Handle group = h5::open_group(ctx, f.id(), "tensors");
    for (const std::string& name : h5::link_names(ctx, group.id())) {
      h5::Handle dset = h5::open_dataset(ctx, group.id(), name);
      for (const char* attr : {"dtype", "global_shape", "offset"})
        if (!h5::attr_exists(ctx, dset.id(), attr))
          TS_USER_ERROR("{}: tensor '{}' has no '{}' attribute", path, name, attr);
      const std::string dtype_text = h5::read_attr_string(ctx, dset.id(), "dtype");
      const DiskType* disk = find_disk_type(dtype_text);
      if (!disk) TS_USER_ERROR("{}: tensor '{}' has unknown dtype '{}'", path, name, dtype_text);
      Piece piece;
      piece.shard_idx = shard_idx;
      piece.offset = h5::read_attr_i64s(ctx, dset.id(), "offset");
      piece.shape = h5::dataset_dims(ctx, dset.id(), name);
      std::vector<int64_t> global = h5::read_attr_i64s(ctx, dset.id(), "global_shape");
      bool inside = piece.offset.size() == global.size() && piece.shape.size() == global.size();
      for (size_t d = 0; inside && d < global.size(); ++d)
        inside = piece.offset[d] >= 0 && piece.offset[d] + piece.shape[d] <= global[d];
      if (!inside)
        TS_USER_ERROR(
            "{}: tensor '{}': slice at offset {} of shape {} does not fit global shape "
            "{}",
            path, name, shape_text(piece.offset), shape_text(piece.shape), shape_text(global));
      auto [it, inserted] = r.entries_.try_emplace(name);
      Entry& e = it->second;
      if (inserted) {
        e.dtype = disk->dtype;
        e.global_shape = global;
      } else if (e.dtype != disk->dtype || e.global_shape != global) {
        TS_USER_ERROR("checkpoint {}: tensor '{}' is {} {} in {} but {} {} in an earlier shard",
                      step_dir, name, disk->name, shape_text(global), path,
                      find_disk_type(e.dtype)->name, shape_text(e.global_shape));
      }
      e.pieces.push_back(std::move(piece));
    }
    group.close(ctx, "H5Gclose", "tensors");
    if (shard_idx == 0 && h5::link_exists(ctx, f.id(), "meta")) {
      h5::Handle meta = h5::open_group(ctx, f.id(), "meta");
      r.meta_keys_ = h5::link_names(ctx, meta.id());
    }
    f.close();
  }

  // Overlapping slices would make a read's coverage count meaningless (and mean two shards
  // disagree about who owns an element).
  for (const auto& [name, e] : r.entries_) {
    for (size_t a = 0; a < e.pieces.size(); ++a) {
      for (size_t b = a + 1; b < e.pieces.size(); ++b) {
        const Piece &pa = e.pieces[a], &pb = e.pieces[b];
        bool overlap = product(pa.shape) > 0 && product(pb.shape) > 0;
        for (size_t d = 0; overlap && d < e.global_shape.size(); ++d)
          overlap = std::max(pa.offset[d], pb.offset[d]) <
                    std::min(pa.offset[d] + pa.shape[d], pb.offset[d] + pb.shape[d]);
        if (overlap)
          TS_USER_ERROR(
              "checkpoint {}: tensor '{}': the slices in {} (offset {}) and {} (offset "
              "{}) overlap",
              step_dir, name, r.shard_paths_[size_t(pa.shard_idx)], shape_text(pa.offset),
              r.shard_paths_[size_t(pb.shard_idx)], shape_text(pb.offset));
      }
    }
  }
  return r;
}

std::vector<std::string> CheckpointReader::tensor_names() const {
  std::vector<std::string> names;
  for (const auto& kv : entries_) names.push_back(kv.first);
  return names;
}

bool CheckpointReader::has_tensor(const std::string& name) const {
  return entries_.count(name) > 0;
}

const CheckpointReader::Entry& CheckpointReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) TS_USER_ERROR("checkpoint {} has no tensor '{}'", dir_, name);
  return it->second;
}

DType CheckpointReader::dtype(const std::string& name) const { return entry(name).dtype; }

const std::vector<int64_t>& CheckpointReader::global_shape(const std::string& name) const {
  return entry(name).global_shape;
}

int64_t CheckpointReader::numel(const std::string& name) const {
  return product(entry(name).global_shape);
}

h5::File& CheckpointReader::shard(int shard_idx) const {
  std::unique_ptr<h5::File>& f = files_[size_t(shard_idx)];
  if (!f) f = std::make_unique<h5::File>(h5::File::open_read(shard_paths_[size_t(shard_idx)]));
  return *f;
}

void CheckpointReader::read_slice(const std::string& name, const std::vector<int64_t>& offset,
                                  const std::vector<int64_t>& shape, void* out) const {
  const Entry& e = entry(name);
  const size_t ndim = e.global_shape.size();
  bool inside = offset.size() == ndim && shape.size() == ndim;
  for (size_t d = 0; inside && d < ndim; ++d)
    inside = offset[d] >= 0 && shape[d] >= 0 && offset[d] + shape[d] <= e.global_shape[d];
  if (!inside)
    TS_USER_ERROR(
        "checkpoint {}: tensor '{}' has global shape {}; the requested slice at offset "
        "{} of shape {} does not fit in it",
        dir_, name, shape_text(e.global_shape), shape_text(offset), shape_text(shape));
  const int64_t total = product(shape);
  if (total == 0) return;
  int64_t covered = 0;
  std::vector<int64_t> file_offset(ndim), count(ndim), mem_offset(ndim);
  for (const Piece& p : e.pieces) {
    bool hit = true;
    for (size_t d = 0; hit && d < ndim; ++d) {
      const int64_t lo = std::max(offset[d], p.offset[d]);
      const int64_t hi = std::min(offset[d] + shape[d], p.offset[d] + p.shape[d]);
      hit = lo < hi;
      file_offset[d] = lo - p.offset[d];
      count[d] = hi - lo;
      mem_offset[d] = lo - offset[d];
    }
    if (!hit) continue;
    h5::File& f = shard(p.shard_idx);
    h5::Handle group = h5::open_group(f.ctx(), f.id(), "tensors");
    h5::Handle dset = h5::open_dataset(f.ctx(), group.id(), name);
    h5::read_box(f.ctx(), dset.id(), mem_type_of(e.dtype), file_offset, count, out, shape,
                 mem_offset, name);
    covered += product(count);
  }
  if (covered != total) {
    std::string held;
    for (const Piece& p : e.pieces)
      held += fmt::format(" {}+{}", shape_text(p.offset), shape_text(p.shape));
    TS_USER_ERROR(
        "checkpoint {}: tensor '{}': {} of the {} elements at offset {} of shape {} are "
        "in no shard (shards hold offset+shape:{})",
        dir_, name, total - covered, total, shape_text(offset), shape_text(shape),
        held.empty() ? " nothing" : held);
  }
}

void CheckpointReader::read_full(const std::string& name, void* out) const {
  const Entry& e = entry(name);
  read_slice(name, std::vector<int64_t>(e.global_shape.size(), 0), e.global_shape, out);
}

bool CheckpointReader::has_meta(const std::string& key) const {
  return std::find(meta_keys_.begin(), meta_keys_.end(), key) != meta_keys_.end();
}

std::string CheckpointReader::meta(const std::string& key) const {
  if (!has_meta(key)) {
    std::string keys;
    for (const std::string& k : meta_keys_) keys += (keys.empty() ? "" : ", ") + k;
    TS_USER_ERROR("checkpoint {} has no metadata key '{}' (it has: {})", dir_, key,
                  keys.empty() ? "none" : keys);
  }
  h5::File& f = shard(0);
  h5::Handle group = h5::open_group(f.ctx(), f.id(), "meta");
  return h5::read_string_dataset(f.ctx(), group.id(), key);
}

std::vector<std::string> CheckpointReader::meta_keys() const { return meta_keys_; }

}  // namespace tessera::io
