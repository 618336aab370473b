// HDF5 token dataset: the atomic writer and the validating reader (layout in dataset.h).
#include "data/dataset.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/sha256.h"
#include "data/tokenizer.h"
#include "io/h5.h"

namespace tessera {

namespace {

namespace h5 = io::h5;

constexpr int64_t kChunkElements = int64_t{1} << 20;  // 1 Mi tokens: 2-4 MiB per chunk
constexpr int64_t kMaxVocab = int64_t{1} << 32;       // ids are stored as uint32 at most

// The invariants of a split, as a message ("" when it is well formed). Shared by writer (where a
// violation is a bug) and reader (where it is a corrupt file).
std::string split_problem(const TokenSplit& split, int64_t vocab_size) {
  const auto& off = split.doc_offsets;
  const int64_t n = static_cast<int64_t>(split.tokens.size());
  if (off.empty()) return "doc_offsets is empty (it needs num_docs + 1 entries)";
  if (off.front() != 0) return fmt::format("doc_offsets[0] is {}, expected 0", off.front());
  for (size_t d = 1; d < off.size(); ++d) {
    if (off[d] < off[d - 1]) {
      return fmt::format("doc_offsets decreases at entry {} ({} after {})", d, off[d], off[d - 1]);
    }
  }
  if (off.back() != n) {
    return fmt::format("doc_offsets ends at {} but there are {} tokens", off.back(), n);
  }
  // Max first (a tight, vectorizable loop), then locate the culprit only when there is one.
  uint32_t max_id = 0;
  for (const uint32_t t : split.tokens) max_id = std::max(max_id, t);
  if (n > 0 && static_cast<int64_t>(max_id) >= vocab_size) {
    const auto it = std::find_if(split.tokens.begin(), split.tokens.end(),
                                 [&](uint32_t t) { return static_cast<int64_t>(t) >= vocab_size; });
    return fmt::format("token id {} at index {} is not below vocab_size {}", *it,
                       it - split.tokens.begin(), vocab_size);
  }
  return {};
}

void fsync_path(const std::string& path, bool is_dir) {
  const int fd = ::open(path.c_str(), (is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) TS_SYSTEM_ERROR("open({}) for fsync failed: {}", path, std::strerror(errno));
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    TS_SYSTEM_ERROR("fsync({}) failed: {}", path, std::strerror(err));
  }
  if (::close(fd) != 0) TS_SYSTEM_ERROR("close({}) failed: {}", path, std::strerror(errno));
}

// Removes the temporary file unless the write committed (an exception left it half written).
struct TempFileGuard {
  std::string path;
  bool committed = false;
  ~TempFileGuard() {
    if (!committed) ::unlink(path.c_str());
  }
};

void write_split(const h5::Ctx& ctx, hid_t file, const std::string& name, const TokenSplit& split,
                 int64_t vocab_size) {
  h5::Handle group = h5::create_group(ctx, file, name);
  const hid_t token_type = vocab_size <= 65536 ? H5T_STD_U16LE : H5T_STD_U32LE;
  h5::Handle tokens = h5::create_growable_1d(ctx, group.id(), "tokens", token_type, kChunkElements);
  h5::append_1d(ctx, tokens.id(), H5T_NATIVE_UINT32, split.tokens.data(),
                static_cast<int64_t>(split.tokens.size()), "tokens");
  tokens.close(ctx, "H5Dclose", "tokens");
  h5::Handle offsets =
      h5::create_growable_1d(ctx, group.id(), "doc_offsets", H5T_STD_I64LE, kChunkElements);
  h5::append_1d(ctx, offsets.id(), H5T_NATIVE_INT64, split.doc_offsets.data(),
                static_cast<int64_t>(split.doc_offsets.size()), "doc_offsets");
  offsets.close(ctx, "H5Dclose", "doc_offsets");
  group.close(ctx, "H5Gclose", name);
}

template <class T>
std::vector<T> read_whole_1d(const h5::Ctx& ctx, hid_t dset, hid_t mem_type,
                             const std::string& name) {
  const h5::IntegerInfo info = h5::integer_1d_info(ctx, dset, name);
  std::vector<T> out(static_cast<size_t>(info.length));
  h5::read_1d(ctx, dset, mem_type, 0, info.length, out.data(), name);
  return out;
}

TokenSplit read_split(const h5::Ctx& ctx, hid_t file, const std::string& name, int64_t vocab_size) {
  // Open the group first: a nested path is only safe to probe once its parent exists.
  h5::open_group(ctx, file, name);
  const std::string tokens_name = "/" + name + "/tokens";
  const std::string offsets_name = "/" + name + "/doc_offsets";
  h5::Handle tokens = h5::open_dataset(ctx, file, tokens_name);
  const h5::IntegerInfo info = h5::integer_1d_info(ctx, tokens.id(), tokens_name);
  const size_t need_bytes = vocab_size <= 65536 ? 2 : 4;
  if (info.is_signed || (info.size_bytes != 2 && info.size_bytes != 4) ||
      info.size_bytes < need_bytes) {
    TS_USER_ERROR(
        "{}: dataset {} is a {}-bit {} integer; expected uint16 (vocab_size <= 65536) "
        "or uint32 (vocab_size here is {})",
        ctx.path, tokens_name, info.size_bytes * 8, info.is_signed ? "signed" : "unsigned",
        vocab_size);
  }
  TokenSplit split;
  split.tokens = read_whole_1d<uint32_t>(ctx, tokens.id(), H5T_NATIVE_UINT32, tokens_name);
  h5::Handle offsets = h5::open_dataset(ctx, file, offsets_name);
  split.doc_offsets = read_whole_1d<int64_t>(ctx, offsets.id(), H5T_NATIVE_INT64, offsets_name);
  if (const std::string problem = split_problem(split, vocab_size); !problem.empty()) {
    TS_USER_ERROR("{}: split '{}' is invalid: {}", ctx.path, name, problem);
  }
  return split;
}

}  // namespace

void write_token_dataset(const std::string& path, const TokenDatasetMeta& meta,
                         const TokenSplit& train, const TokenSplit& val) {
  TS_CHECK(meta.vocab_size > 0 && meta.vocab_size <= kMaxVocab, "vocab_size {}", meta.vocab_size);
  TS_CHECK(meta.eot_id >= -1 && meta.eot_id < meta.vocab_size, "eot_id {}", meta.eot_id);
  for (const auto* s : {&train, &val}) {
    const std::string problem = split_problem(*s, meta.vocab_size);
    TS_CHECK(problem.empty(), "writing {}: {}", path, problem);
  }

  TempFileGuard tmp{fmt::format("{}.tmp-{}", path, static_cast<long>(::getpid()))};
  {
    h5::File file = h5::File::create(tmp.path);
    const h5::Ctx& ctx = file.ctx();
    const hid_t root = file.id();
    h5::write_attr_i64(ctx, root, "format_version", kTokenDatasetFormatVersion);
    h5::write_attr_string(ctx, root, "tokenizer_json", meta.tokenizer_json, h5::StrType::vlen);
    h5::write_attr_string(ctx, root, "tokenizer_hash", meta.tokenizer_hash, h5::StrType::vlen);
    h5::write_attr_i64(ctx, root, "vocab_size", meta.vocab_size);
    h5::write_attr_i64(ctx, root, "eot_id", meta.eot_id);
    std::vector<std::string> names, hashes;
    for (const auto& s : meta.sources) {
      names.push_back(s.name);
      hashes.push_back(s.sha256);
    }
    h5::write_attr_strings(ctx, root, "source_files", names);
    h5::write_attr_strings(ctx, root, "source_sha256", hashes);
    h5::write_attr_f64(ctx, root, "val_fraction", meta.val_fraction);
    h5::write_attr_i64(ctx, root, "doc_chars", meta.doc_chars);
    h5::write_attr_string(ctx, root, "split_rule", meta.split_rule, h5::StrType::vlen);
    h5::write_attr_string(ctx, root, "created_by", meta.created_by, h5::StrType::vlen);
    write_split(ctx, root, "train", train, meta.vocab_size);
    write_split(ctx, root, "val", val, meta.vocab_size);
    file.close();
  }
  fsync_path(tmp.path, /*is_dir=*/false);
  if (std::rename(tmp.path.c_str(), path.c_str()) != 0) {
    TS_SYSTEM_ERROR("rename({}, {}) failed: {}", tmp.path, path, std::strerror(errno));
  }
  tmp.committed = true;
  std::string dir = std::filesystem::path(path).parent_path().string();
  fsync_path(dir.empty() ? "." : dir, /*is_dir=*/true);
}

TokenDataset TokenDataset::open(const std::string& path) {
  const h5::File file = h5::File::open_read(path);
  const h5::Ctx& ctx = file.ctx();
  const hid_t root = file.id();
  TokenDataset ds;
  ds.path_ = path;
  const int64_t version = h5::read_attr_i64(ctx, root, "format_version");
  if (version != kTokenDatasetFormatVersion) {
    TS_USER_ERROR(
        "{}: format_version is {}; this build reads token datasets of format_version {} "
        "(re-run tessera prepare)",
        path, version, kTokenDatasetFormatVersion);
  }
  TokenDatasetMeta& m = ds.meta_;
  m.tokenizer_json = h5::read_attr_string(ctx, root, "tokenizer_json");
  m.tokenizer_hash = h5::read_attr_string(ctx, root, "tokenizer_hash");
  m.vocab_size = h5::read_attr_i64(ctx, root, "vocab_size");
  m.eot_id = h5::read_attr_i64(ctx, root, "eot_id");
  const std::vector<std::string> names = h5::read_attr_strings(ctx, root, "source_files");
  const std::vector<std::string> hashes = h5::read_attr_strings(ctx, root, "source_sha256");
  m.val_fraction = h5::read_attr_f64(ctx, root, "val_fraction");
  m.doc_chars = h5::read_attr_i64(ctx, root, "doc_chars");
  m.split_rule = h5::read_attr_string(ctx, root, "split_rule");
  m.created_by = h5::read_attr_string(ctx, root, "created_by");

  if (m.vocab_size <= 0 || m.vocab_size > kMaxVocab) {
    TS_USER_ERROR("{}: attribute vocab_size is {}, expected 1..{}", path, m.vocab_size, kMaxVocab);
  }
  if (m.eot_id < -1 || m.eot_id >= m.vocab_size) {
    TS_USER_ERROR("{}: attribute eot_id is {}, expected -1 or an id below vocab_size {}", path,
                  m.eot_id, m.vocab_size);
  }
  if (names.size() != hashes.size()) {
    TS_USER_ERROR(
        "{}: attributes source_files ({} entries) and source_sha256 ({} entries) differ "
        "in length",
        path, names.size(), hashes.size());
  }
  for (size_t i = 0; i < names.size(); ++i) m.sources.push_back({names[i], hashes[i]});
  if (!(m.val_fraction >= 0.0 && m.val_fraction < 1.0)) {
    TS_USER_ERROR("{}: attribute val_fraction is {}, expected a value in [0, 1)", path,
                  m.val_fraction);
  }
  // The stored hash must describe the stored JSON, or check_tokenizer would compare against a lie.
  if (const std::string actual = sha256_hex(m.tokenizer_json); actual != m.tokenizer_hash) {
    TS_USER_ERROR(
        "{}: attribute tokenizer_hash is {} but the stored tokenizer_json hashes to {} "
        "(the file is corrupt or was edited)",
        path, m.tokenizer_hash, actual);
  }
  ds.train_ = read_split(ctx, root, "train", m.vocab_size);
  ds.val_ = read_split(ctx, root, "val", m.vocab_size);
  return ds;
}

const TokenSplit& TokenDataset::split(std::string_view name) const {
  if (name == "train") return train_;
  if (name == "val") return val_;
  TS_USER_ERROR("{}: no split named '{}' (expected 'train' or 'val')", path_, name);
}

void TokenDataset::check_tokenizer(const Tokenizer& tokenizer,
                                   std::string_view tokenizer_source) const {
  check_tokenizer_hash(tokenizer.hash(), tokenizer_source);
}

void TokenDataset::check_tokenizer_hash(std::string_view hash,
                                        std::string_view tokenizer_source) const {
  if (hash == meta_.tokenizer_hash) return;
  TS_USER_ERROR(
      "tokenizer mismatch: dataset {} was tokenized with tokenizer hash {}, but the "
      "tokenizer from '{}' has hash {}; use the tokenizer the dataset was prepared with "
      "(its tokenizer.json is stored in the dataset's tokenizer_json attribute) or "
      "re-run tessera prepare",
      path_, meta_.tokenizer_hash, tokenizer_source, hash);
}

}  // namespace tessera
