// HDF5 token dataset: the streaming atomic writer, the validating opener and the on-demand split
// reader (layout in dataset.h).
#include "data/dataset.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "core/error.h"
#include "core/sha256.h"
#include "data/tokenizer.h"

namespace tessera {

namespace {

namespace h5 = io::h5;

constexpr int64_t kMaxVocab = int64_t{1} << 32;  // ids are stored as uint32 at most
// Chunk cache of each open split: whole small datasets stay cached (the CI set's 3.4 M tokens in
// 1 Mi-token chunks of an earlier build take 8 MiB), big ones keep a bounded working set.
constexpr size_t kSourceCacheBytes = size_t(16) << 20;
// Tokens converted per read when a whole split is loaded (bounds the staging buffer).
constexpr int64_t kReadPieceTokens = int64_t(1) << 20;

hid_t stored_token_type(int64_t vocab_size) {
  return vocab_size <= 65536 ? H5T_STD_U16LE : H5T_STD_U32LE;
}

// The invariants of a split's offsets, as a message ("" when they hold). Shared by the writer's
// checks (a violation is a bug) and read_split (a corrupt file).
std::string offsets_problem(const std::vector<int64_t>& off, int64_t num_tokens) {
  if (off.empty()) return "doc_offsets is empty (it needs num_docs + 1 entries)";
  if (off.front() != 0) return fmt::format("doc_offsets[0] is {}, expected 0", off.front());
  for (size_t d = 1; d < off.size(); ++d) {
    if (off[d] < off[d - 1])
      return fmt::format("doc_offsets decreases at entry {} ({} after {})", d, off[d], off[d - 1]);
  }
  if (off.back() != num_tokens)
    return fmt::format("doc_offsets ends at {} but there are {} tokens", off.back(), num_tokens);
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

void write_meta(const h5::Ctx& ctx, hid_t root, const TokenDatasetMeta& meta) {
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
}

TokenDatasetMeta read_meta(const h5::Ctx& ctx, hid_t root) {
  const std::string& path = ctx.path;
  const int64_t version = h5::read_attr_i64(ctx, root, "format_version");
  if (version != kTokenDatasetFormatVersion) {
    TS_USER_ERROR(
        "{}: format_version is {}; this build reads token datasets of format_version {} "
        "(re-run tessera prepare)",
        path, version, kTokenDatasetFormatVersion);
  }
  TokenDatasetMeta m;
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
  if (names.size() != hashes.size()) {
    TS_USER_ERROR(
        "{}: attributes source_files ({} entries) and source_sha256 ({} entries) differ "
        "in length",
        path, names.size(), hashes.size());
  }
  for (size_t i = 0; i < names.size(); ++i) m.sources.push_back({names[i], hashes[i]});
  return m;
}

void check_meta(const std::string& path, const TokenDatasetMeta& m) {
  if (m.vocab_size <= 0 || m.vocab_size > kMaxVocab) {
    TS_USER_ERROR("{}: attribute vocab_size is {}, expected 1..{}", path, m.vocab_size, kMaxVocab);
  }
  if (m.eot_id < -1 || m.eot_id >= m.vocab_size) {
    TS_USER_ERROR("{}: attribute eot_id is {}, expected -1 or an id below vocab_size {}", path,
                  m.eot_id, m.vocab_size);
  }
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
}

std::string tokens_name(Split s) { return fmt::format("/{}/tokens", split_name(s)); }
std::string offsets_name(Split s) { return fmt::format("/{}/doc_offsets", split_name(s)); }

// The token dataset's element size, checked against the vocabulary.
size_t check_token_dataset(const h5::Ctx& ctx, hid_t dset, Split s, int64_t vocab_size,
                           int64_t* num_tokens) {
  const h5::IntegerInfo info = h5::integer_1d_info(ctx, dset, tokens_name(s));
  const size_t need_bytes = vocab_size <= 65536 ? 2 : 4;
  if (info.is_signed || (info.size_bytes != 2 && info.size_bytes != 4) ||
      info.size_bytes < need_bytes) {
    TS_USER_ERROR(
        "{}: dataset {} is a {}-bit {} integer; expected uint16 (vocab_size <= 65536) "
        "or uint32 (vocab_size here is {})",
        ctx.path, tokens_name(s), info.size_bytes * 8, info.is_signed ? "signed" : "unsigned",
        vocab_size);
  }
  *num_tokens = info.length;
  return info.size_bytes;
}

// The number of documents, after checking the first and last offsets (two reads, whatever the
// split's size; read_split checks every entry).
int64_t check_offsets_dataset(const h5::Ctx& ctx, hid_t dset, Split s, int64_t num_tokens) {
  const std::string name = offsets_name(s);
  const int64_t n = h5::integer_1d_info(ctx, dset, name).length;
  if (n < 1)
    TS_USER_ERROR("{}: split '{}' is invalid: doc_offsets is empty (it needs num_docs + 1 entries)",
                  ctx.path, split_name(s));
  int64_t first = 0, last = 0;
  h5::read_1d(ctx, dset, H5T_NATIVE_INT64, 0, 1, &first, name);
  h5::read_1d(ctx, dset, H5T_NATIVE_INT64, n - 1, 1, &last, name);
  if (first != 0 || last != num_tokens)
    TS_USER_ERROR(
        "{}: split '{}' is invalid: doc_offsets runs from {} to {}, expected 0 to the token "
        "count {}",
        ctx.path, split_name(s), first, last, num_tokens);
  return n - 1;
}

// One split of an open file, read on demand. HDF5 reads are serialized by a mutex (the library
// is not thread-safe in every build); ids are converted from the stored dtype and checked.
class H5TokenSource final : public TokenSource {
 public:
  H5TokenSource(const std::string& path, Split split, int64_t vocab_size, int64_t num_tokens,
                size_t token_bytes)
      : file_(h5::File::open_read(path)),
        name_(fmt::format("{} /{}", path, split_name(split))),
        dset_name_(tokens_name(split)),
        vocab_size_(vocab_size),
        num_tokens_(num_tokens),
        token_bytes_(token_bytes) {
    tokens_ = h5::open_dataset(file_.ctx(), file_.id(), dset_name_, kSourceCacheBytes);
  }
  const std::string& name() const override { return name_; }
  int64_t num_tokens() const override { return num_tokens_; }
  int64_t vocab_size() const override { return vocab_size_; }

  void read(int64_t begin, int64_t n, int32_t* out) const override {
    TS_CHECK(begin >= 0 && n >= 0 && begin <= num_tokens_ - n,
             "read of tokens [{}, {}) outside {} ({} tokens)", begin, begin + n, name_,
             num_tokens_);
    std::lock_guard<std::mutex> lock(mutex_);
    if (token_bytes_ == 2)
      convert<uint16_t>(begin, n, H5T_NATIVE_UINT16, out);
    else
      convert<uint32_t>(begin, n, H5T_NATIVE_UINT32, out);
  }

 private:
  template <class T>
  void convert(int64_t begin, int64_t n, hid_t mem_type, int32_t* out) const {
    staging_.resize(size_t(n) * sizeof(T));
    const T* ids = reinterpret_cast<const T*>(staging_.data());
    h5::quiet_errors();  // this thread may not be the one that opened the file
    h5::read_1d(file_.ctx(), tokens_.id(), mem_type, begin, n, staging_.data(), dset_name_);
    for (int64_t i = 0; i < n; ++i) {
      if (int64_t(ids[i]) >= vocab_size_)
        fail_token_out_of_vocab(name_, begin + i, int64_t(ids[i]), vocab_size_);
      out[i] = int32_t(ids[i]);
    }
  }

  h5::File file_;
  h5::Handle tokens_;
  std::string name_, dset_name_;
  int64_t vocab_size_, num_tokens_;
  size_t token_bytes_;
  mutable std::mutex mutex_;
  mutable std::vector<unsigned char> staging_;  // one read in the stored dtype
};

Split parse_split(std::string_view name, const std::string& path) {
  if (name == "train") return Split::train;
  if (name == "val") return Split::val;
  TS_USER_ERROR("{}: no split named '{}' (expected 'train' or 'val')", path, name);
}

}  // namespace

const char* split_name(Split split) { return split == Split::train ? "train" : "val"; }

// --- writer -------------------------------------------------------------------------------------

TokenDatasetWriter::TokenDatasetWriter(const std::string& path, int64_t vocab_size)
    : temp_(path), path_(path), vocab_size_(vocab_size), file_(h5::File::create(temp_.path)) {
  TS_CHECK(vocab_size > 0 && vocab_size <= kMaxVocab, "vocab_size {}", vocab_size);
  const h5::Ctx& ctx = file_.ctx();
  for (const Split s : kSplits) {
    Stream& st = streams_[int(s)];
    st.group = h5::create_group(ctx, file_.id(), split_name(s));
    st.tokens = h5::create_growable_1d(ctx, st.group.id(), "tokens", stored_token_type(vocab_size),
                                       kTokenChunkElements);
    st.offsets = h5::create_growable_1d(ctx, st.group.id(), "doc_offsets", H5T_STD_I64LE,
                                        kTokenChunkElements);
    st.offset_tail.push_back(0);
  }
}

TokenDatasetWriter::~TokenDatasetWriter() = default;

void TokenDatasetWriter::add_document(Split split, std::span<const uint32_t> tokens) {
  Stream& st = streams_[int(split)];
  for (const uint32_t id : tokens)
    TS_CHECK(int64_t(id) < vocab_size_, "writing {}: token id {} is not below vocab_size {}", path_,
             id, vocab_size_);
  st.token_tail.insert(st.token_tail.end(), tokens.begin(), tokens.end());
  st.num_tokens += int64_t(tokens.size());
  st.num_docs += 1;
  st.offset_tail.push_back(st.num_tokens);
  flush(st, /*all=*/false);
}

// Writes whole chunks of the tails (everything with `all`): each stored chunk is then written
// once, never read back and rewritten as it fills.
void TokenDatasetWriter::flush(Stream& st, bool all) {
  const h5::Ctx& ctx = file_.ctx();
  const auto write = [&](auto& tail, hid_t dset, hid_t mem_type, const char* name) {
    const size_t n = all ? tail.size() : tail.size() / kTokenChunkElements * kTokenChunkElements;
    if (n == 0) return;
    h5::append_1d(ctx, dset, mem_type, tail.data(), int64_t(n), name);
    tail.erase(tail.begin(), tail.begin() + std::ptrdiff_t(n));
  };
  write(st.token_tail, st.tokens.id(), H5T_NATIVE_UINT32, "tokens");
  write(st.offset_tail, st.offsets.id(), H5T_NATIVE_INT64, "doc_offsets");
}

void TokenDatasetWriter::commit(const TokenDatasetMeta& meta) {
  TS_CHECK(!temp_.committed, "{} committed twice", path_);
  TS_CHECK(meta.vocab_size == vocab_size_, "writing {}: meta vocab_size {} but the writer's is {}",
           path_, meta.vocab_size, vocab_size_);
  TS_CHECK(meta.eot_id >= -1 && meta.eot_id < meta.vocab_size, "eot_id {}", meta.eot_id);
  const h5::Ctx ctx = file_.ctx();
  for (Stream& st : streams_) {
    flush(st, /*all=*/true);
    st.tokens.close(ctx, "H5Dclose", "tokens");
    st.offsets.close(ctx, "H5Dclose", "doc_offsets");
    st.group.close(ctx, "H5Gclose");
  }
  write_meta(ctx, file_.id(), meta);
  file_.close();
  fsync_path(temp_.path, /*is_dir=*/false);
  if (std::rename(temp_.path.c_str(), path_.c_str()) != 0)
    TS_SYSTEM_ERROR("rename({}, {}) failed: {}", temp_.path, path_, std::strerror(errno));
  temp_.committed = true;
  const std::string dir = std::filesystem::path(path_).parent_path().string();
  fsync_path(dir.empty() ? "." : dir, /*is_dir=*/true);
}

void write_token_dataset(const std::string& path, const TokenDatasetMeta& meta,
                         const TokenSplit& train, const TokenSplit& val) {
  TS_CHECK(meta.vocab_size > 0 && meta.vocab_size <= kMaxVocab, "vocab_size {}", meta.vocab_size);
  for (const TokenSplit* s : {&train, &val}) {
    const std::string problem = offsets_problem(s->doc_offsets, int64_t(s->tokens.size()));
    TS_CHECK(problem.empty(), "writing {}: {}", path, problem);
  }
  TokenDatasetWriter writer(path, meta.vocab_size);
  for (const Split s : kSplits) {
    const TokenSplit& split = s == Split::train ? train : val;
    const std::span<const uint32_t> all(split.tokens);
    for (int64_t d = 0; d < split.num_docs(); ++d) {
      const int64_t b = split.doc_offsets[size_t(d)], e = split.doc_offsets[size_t(d) + 1];
      writer.add_document(s, all.subspan(size_t(b), size_t(e - b)));
    }
  }
  writer.commit(meta);
}

// --- reader -------------------------------------------------------------------------------------

TokenDataset TokenDataset::open(const std::string& path) {
  const h5::File file = h5::File::open_read(path);
  const h5::Ctx& ctx = file.ctx();
  TokenDataset ds;
  ds.path_ = path;
  ds.meta_ = read_meta(ctx, file.id());
  check_meta(path, ds.meta_);
  for (const Split s : kSplits) {
    // Open the group first: a nested path is only safe to probe once its parent exists.
    h5::open_group(ctx, file.id(), split_name(s));
    SplitInfo& info = ds.splits_[int(s)];
    h5::Handle tokens = h5::open_dataset(ctx, file.id(), tokens_name(s));
    info.token_bytes =
        check_token_dataset(ctx, tokens.id(), s, ds.meta_.vocab_size, &info.num_tokens);
    h5::Handle offsets = h5::open_dataset(ctx, file.id(), offsets_name(s));
    info.num_docs = check_offsets_dataset(ctx, offsets.id(), s, info.num_tokens);
  }
  return ds;
}

const TokenDataset::SplitInfo& TokenDataset::info(std::string_view split) const {
  return splits_[int(parse_split(split, path_))];
}

int64_t TokenDataset::num_tokens(std::string_view split) const { return info(split).num_tokens; }
int64_t TokenDataset::num_docs(std::string_view split) const { return info(split).num_docs; }

std::shared_ptr<const TokenSource> TokenDataset::source(std::string_view split) const {
  const SplitInfo& i = info(split);
  return std::make_shared<H5TokenSource>(path_, parse_split(split, path_), meta_.vocab_size,
                                         i.num_tokens, i.token_bytes);
}

TokenSplit TokenDataset::read_split(std::string_view split) const {
  const Split s = parse_split(split, path_);
  const std::shared_ptr<const TokenSource> src = source(split);
  TokenSplit out;
  out.tokens.resize(size_t(src->num_tokens()));
  std::vector<int32_t> piece;
  for (int64_t b = 0; b < src->num_tokens(); b += kReadPieceTokens) {
    const int64_t n = std::min(kReadPieceTokens, src->num_tokens() - b);
    piece.resize(size_t(n));
    src->read(b, n, piece.data());
    std::copy(piece.begin(), piece.end(), out.tokens.begin() + b);
  }
  const h5::File file = h5::File::open_read(path_);
  const h5::Handle offsets = h5::open_dataset(file.ctx(), file.id(), offsets_name(s));
  out.doc_offsets.resize(size_t(num_docs(split) + 1));
  h5::read_1d(file.ctx(), offsets.id(), H5T_NATIVE_INT64, 0, int64_t(out.doc_offsets.size()),
              out.doc_offsets.data(), offsets_name(s));
  if (const std::string p = offsets_problem(out.doc_offsets, int64_t(out.tokens.size()));
      !p.empty())
    TS_USER_ERROR("{}: split '{}' is invalid: {}", path_, split, p);
  return out;
}

std::string TokenDataset::content_key() const {
  std::string text = fmt::format("tessera token dataset v{}\ntokenizer {}\n",
                                 kTokenDatasetFormatVersion, meta_.tokenizer_hash);
  for (const SourceFile& f : meta_.sources) text += fmt::format("source {} {}\n", f.name, f.sha256);
  text += fmt::format("val_fraction {}\ndoc_chars {}\nsplit_rule {}\n", meta_.val_fraction,
                      meta_.doc_chars, meta_.split_rule);
  for (const Split s : kSplits)
    text += fmt::format("{} {} tokens {} docs\n", split_name(s), splits_[int(s)].num_tokens,
                        splits_[int(s)].num_docs);
  return sha256_hex(text);
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
