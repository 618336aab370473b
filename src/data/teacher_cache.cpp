// The teacher cache file: its writer (atomic, window rows in order) and its reader (checks, then
// one window at a time).
#include "data/teacher_cache.h"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "data/dataset.h"
#include "io/fs_util.h"

namespace tessera {

namespace h5 = io::h5;

// read() copies stored little-endian chunks as they are.
static_assert(std::endian::native == std::endian::little, "teacher cache reads need little-endian");

namespace {

int64_t nT(const TeacherCacheMeta& m) { return int64_t(m.temperatures.size()); }

void write_meta(const h5::Ctx& ctx, hid_t root, const TeacherCacheMeta& m) {
  h5::write_attr_i64(ctx, root, "format_version", kTeacherCacheFormatVersion);
  h5::write_attr_i64(ctx, root, "top_k", m.top_k);
  h5::write_attr_i64(ctx, root, "seq_len", m.seq_len);
  h5::write_attr_i64(ctx, root, "vocab_size", m.vocab_size);
  h5::write_attr_i64(ctx, root, "dataset_windows", m.dataset_windows);
  h5::write_attr_string(ctx, root, "tokenizer_hash", m.tokenizer_hash);
  h5::write_attr_string(ctx, root, "dataset_key", m.dataset_key);
  h5::write_attr_string(ctx, root, "dataset", m.dataset, h5::StrType::vlen);
  h5::write_attr_string(ctx, root, "teacher", m.teacher, h5::StrType::vlen);
  h5::write_attr_string(ctx, root, "teacher_precision", m.teacher_precision);
  h5::write_attr_string(ctx, root, "created_by", m.created_by, h5::StrType::vlen);
}

TeacherCacheMeta read_meta(const h5::Ctx& ctx, hid_t root) {
  const int64_t version = h5::read_attr_i64(ctx, root, "format_version");
  if (version != kTeacherCacheFormatVersion)
    h5::fail_content(ctx, fmt::format("format_version {} (this build reads {})", version,
                                      kTeacherCacheFormatVersion));
  TeacherCacheMeta m;
  m.top_k = int(h5::read_attr_i64(ctx, root, "top_k"));
  m.seq_len = int(h5::read_attr_i64(ctx, root, "seq_len"));
  m.vocab_size = int(h5::read_attr_i64(ctx, root, "vocab_size"));
  m.dataset_windows = h5::read_attr_i64(ctx, root, "dataset_windows");
  m.tokenizer_hash = h5::read_attr_string(ctx, root, "tokenizer_hash");
  m.dataset_key = h5::read_attr_string(ctx, root, "dataset_key");
  m.dataset = h5::read_attr_string(ctx, root, "dataset");
  m.teacher = h5::read_attr_string(ctx, root, "teacher");
  m.teacher_precision = h5::read_attr_string(ctx, root, "teacher_precision");
  m.created_by = h5::read_attr_string(ctx, root, "created_by");
  if (m.top_k < 1 || m.seq_len < 1 || m.vocab_size < m.top_k || m.dataset_windows < 1)
    h5::fail_content(ctx, fmt::format("top_k {}, seq_len {}, vocab_size {}, dataset_windows {}",
                                      m.top_k, m.seq_len, m.vocab_size, m.dataset_windows));
  return m;
}

// The (W, T, K) datasets' and the (nT, 2, W, T) lse's shapes.
std::vector<int64_t> rows_dims(const TeacherCacheMeta& m, int64_t W) {
  return {W, m.seq_len, m.top_k};
}
std::vector<int64_t> lse_dims(const TeacherCacheMeta& m, int64_t W) {
  return {nT(m), 2, W, m.seq_len};
}

}  // namespace

// --- writer -------------------------------------------------------------------------------------

TeacherCacheWriter::TeacherCacheWriter(const std::string& path, const TeacherCacheMeta& meta,
                                       std::vector<int64_t> windows)
    : temp_(path),
      path_(path),
      meta_(meta),
      num_windows_(int64_t(windows.size())),
      file_(h5::File::create(temp_.path)) {
  TS_CHECK(!windows.empty() && std::is_sorted(windows.begin(), windows.end()) &&
               std::adjacent_find(windows.begin(), windows.end()) == windows.end() &&
               windows.front() >= 0 && windows.back() < meta.dataset_windows,
           "teacher cache {}: the window list must be increasing, within [0, {})", path,
           meta.dataset_windows);
  TS_CHECK(!meta.temperatures.empty() &&
               std::is_sorted(meta.temperatures.begin(), meta.temperatures.end()),
           "teacher cache {}: temperatures", path);
  const h5::Ctx& ctx = file_.ctx();
  const int64_t W = num_windows_;
  h5::Handle w = h5::create_dataset(ctx, file_.id(), "windows", H5T_STD_I64LE, {W}, 8, true);
  h5::write_dataset(ctx, w.id(), H5T_NATIVE_INT64, windows.data(), "windows");
  w.close(ctx, "H5Dclose", "windows");
  h5::Handle t =
      h5::create_dataset(ctx, file_.id(), "temperatures", H5T_IEEE_F32LE, {nT(meta)}, 4, false);
  h5::write_dataset(ctx, t.id(), H5T_NATIVE_FLOAT, meta.temperatures.data(), "temperatures");
  t.close(ctx, "H5Dclose", "temperatures");
  const std::vector<int64_t> rd = rows_dims(meta, W), ld = lse_dims(meta, W);
  // Raw chunks (no checksum): training reads each window's chunk whole, at random, with
  // read_chunk; the cache is derived data that distill-cache rebuilds.
  logits_ = h5::create_chunked(ctx, file_.id(), "topk_logits", H5T_IEEE_F32LE, rd,
                               {1, rd[1], rd[2]}, false);
  ids_ =
      h5::create_chunked(ctx, file_.id(), "topk_ids", H5T_STD_I32LE, rd, {1, rd[1], rd[2]}, false);
  lse_ =
      h5::create_chunked(ctx, file_.id(), "lse", H5T_IEEE_F32LE, ld, {ld[0], 2, 1, ld[3]}, false);
}

TeacherCacheWriter::~TeacherCacheWriter() = default;

void TeacherCacheWriter::write(int64_t count, const TeacherRows& rows) {
  const TeacherCacheMeta& m = meta_;
  TS_CHECK(written_ + count <= num_windows_, "teacher cache {}: {} rows past {}", path_, count,
           num_windows_);
  const int64_t TK = int64_t(m.seq_len) * m.top_k;
  TS_CHECK(int64_t(rows.topk_logits.size()) >= count * TK &&
               int64_t(rows.topk_ids.size()) >= count * TK &&
               int64_t(rows.lse.size()) == nT(m) * 2 * count * m.seq_len,
           "teacher cache {}: rows sized for another batch", path_);
  const h5::Ctx& ctx = file_.ctx();
  h5::write_box(ctx, logits_.id(), H5T_NATIVE_FLOAT, {written_, 0, 0}, {count, m.seq_len, m.top_k},
                rows.topk_logits.data(), "topk_logits");
  h5::write_box(ctx, ids_.id(), H5T_NATIVE_INT32, {written_, 0, 0}, {count, m.seq_len, m.top_k},
                rows.topk_ids.data(), "topk_ids");
  h5::write_box(ctx, lse_.id(), H5T_NATIVE_FLOAT, {0, 0, written_, 0}, {nT(m), 2, count, m.seq_len},
                rows.lse.data(), "lse");
  written_ += count;
}

void TeacherCacheWriter::commit() {
  TS_CHECK(!temp_.committed && written_ == num_windows_,
           "teacher cache {}: commit after {} of {} windows", path_, written_, num_windows_);
  const h5::Ctx ctx = file_.ctx();
  logits_.close(ctx, "H5Dclose", "topk_logits");
  ids_.close(ctx, "H5Dclose", "topk_ids");
  lse_.close(ctx, "H5Dclose", "lse");
  write_meta(ctx, file_.id(), meta_);
  file_.close();
  io::fsync_file(temp_.path);
  io::rename_path(temp_.path, path_);
  temp_.committed = true;
  const std::string dir = std::filesystem::path(path_).parent_path().string();
  io::fsync_dir(dir.empty() ? "." : dir);
}

// --- reader -------------------------------------------------------------------------------------

TeacherCache TeacherCache::open(const std::string& path) {
  TeacherCache c;
  c.path_ = path;
  c.file_ = h5::File::open_read(path);
  const h5::Ctx& ctx = c.file_.ctx();
  c.meta_ = read_meta(ctx, c.file_.id());
  TeacherCacheMeta& m = c.meta_;
  h5::Handle t = h5::open_dataset(ctx, c.file_.id(), "temperatures");
  const std::vector<int64_t> td = h5::dataset_dims(ctx, t.id(), "temperatures");
  if (td.size() != 1 || td[0] < 1) h5::fail_content(ctx, "'temperatures' is not a 1-D list");
  m.temperatures.resize(size_t(td[0]));
  h5::read_box(ctx, t.id(), H5T_NATIVE_FLOAT, {0}, td, m.temperatures.data(), td, {0},
               "temperatures");
  h5::Handle w = h5::open_dataset(ctx, c.file_.id(), "windows");
  const std::vector<int64_t> wd = h5::dataset_dims(ctx, w.id(), "windows");
  if (wd.size() != 1 || wd[0] < 1) h5::fail_content(ctx, "'windows' is not a 1-D list");
  c.windows_.resize(size_t(wd[0]));
  h5::read_box(ctx, w.id(), H5T_NATIVE_INT64, {0}, wd, c.windows_.data(), wd, {0}, "windows");
  const auto& ws = c.windows_;
  if (!std::is_sorted(ws.begin(), ws.end()) ||
      std::adjacent_find(ws.begin(), ws.end()) != ws.end() || ws.front() < 0 ||
      ws.back() >= m.dataset_windows)
    h5::fail_content(
        ctx, fmt::format("'windows' is not an increasing list in [0, {})", m.dataset_windows));
  const int64_t W = c.num_windows();
  const auto open_checked = [&](const char* name, const std::vector<int64_t>& want) {
    h5::Handle d = h5::open_dataset(ctx, c.file_.id(), name);
    if (h5::dataset_dims(ctx, d.id(), name) != want)
      h5::fail_content(ctx, fmt::format("'{}' has another shape than top_k {}, seq_len {}, {} "
                                        "windows and {} temperatures",
                                        name, m.top_k, m.seq_len, W, m.temperatures.size()));
    return d;
  };
  c.logits_ = open_checked("topk_logits", rows_dims(m, W));
  c.ids_ = open_checked("topk_ids", rows_dims(m, W));
  c.lse_ = open_checked("lse", lse_dims(m, W));
  return c;
}

void TeacherCache::check_dataset(const TokenDataset& dataset, int seq_len,
                                 const std::string& who) const {
  const TeacherCacheMeta& m = meta_;
  const auto mismatch = [&](const std::string& what) {
    TS_USER_ERROR(
        "{} = {}: {}; rebuild it with tessera distill-cache --data {} (it was made from {} by "
        "teacher {})",
        who, path_, what, dataset.path(), m.dataset, m.teacher);
  };
  if (m.tokenizer_hash != dataset.tokenizer_hash())
    mismatch(fmt::format("the cache's tokenizer {} is not the dataset's {}", m.tokenizer_hash,
                         dataset.tokenizer_hash()));
  if (m.dataset_key != dataset.content_key())
    mismatch(fmt::format("it was made for another dataset (content key {}; {} has {})",
                         m.dataset_key, dataset.path(), dataset.content_key()));
  if (m.seq_len != seq_len)
    mismatch(fmt::format("it holds windows of seq_len {}, the run reads {}", m.seq_len, seq_len));
  const int64_t windows = (dataset.num_tokens("train") - 1) / seq_len;
  if (m.dataset_windows != windows)
    mismatch(
        fmt::format("it counts {} train windows, the dataset has {}", m.dataset_windows, windows));
}

int TeacherCache::temperature_index(float temperature) const {
  for (size_t i = 0; i < meta_.temperatures.size(); ++i)
    if (std::abs(meta_.temperatures[i] - temperature) <= 1e-6f * temperature) return int(i);
  return -1;
}

void TeacherCache::resize(TeacherRows& rows, const TeacherCacheMeta& m, int B) {
  const size_t n = size_t(B) * m.seq_len;
  rows.topk_logits.resize(n * m.top_k);
  rows.topk_ids.resize(n * m.top_k);
  rows.lse.resize(n * 2 * m.temperatures.size());
}

void TeacherCache::read(int64_t window, int b, int B, TeacherRows& rows,
                        const std::string& context) const {
  const TeacherCacheMeta& m = meta_;
  const auto it = std::lower_bound(windows_.begin(), windows_.end(), window);
  if (it == windows_.end() || *it != window)
    TS_USER_ERROR(
        "{}: {} reads train window {}, which the teacher cache {} lacks (it holds {} of the "
        "dataset's {} windows); rebuild it for this run (tessera distill-cache --windows-of "
        "RECIPE) or for every window",
        context, context.empty() ? "the run" : "it", window, path_, windows_.size(),
        m.dataset_windows);
  const int64_t row = it - windows_.begin(), T = m.seq_len, K = m.top_k, nt = nT(m);
  const h5::Ctx& ctx = file_.ctx();
  const size_t TK = size_t(T * K);
  h5::read_chunk(ctx, logits_.id(), {row, 0, 0}, rows.topk_logits.data() + b * TK, 4 * TK,
                 "topk_logits");
  h5::read_chunk(ctx, ids_.id(), {row, 0, 0}, rows.topk_ids.data() + b * TK, 4 * TK, "topk_ids");
  // The chunk is (nT, 2, 1, T); the rows (nT, 2, B, T).
  std::vector<float> lse(size_t(nt * 2 * T));
  h5::read_chunk(ctx, lse_.id(), {0, 0, row, 0}, lse.data(), 4 * lse.size(), "lse");
  for (int64_t i = 0; i < nt * 2; ++i)
    std::copy_n(lse.begin() + i * T, T, rows.lse.begin() + (i * B + b) * T);
}

}  // namespace tessera
