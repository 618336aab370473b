// The HDF5 token dataset: round trips (uint16 and uint32 storage, empty splits, a large tokenizer
// attribute), atomic replacement, and every way a file can be wrong (missing, not HDF5, truncated,
// corrupted chunk, bad ids, bad offsets, wrong version, edited hash) -> user errors naming the
// file. Token arrays are written directly; no tokenizer is involved.
#include "data/dataset.h"

#include <gtest/gtest.h>
#include <hdf5.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "core/sha256.h"
#include "io/h5.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::ScratchDir;
using testing::write_all;
namespace h5 = io::h5;

TokenSplit random_split(int64_t num_docs, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenSplit s;
  s.doc_offsets.push_back(0);
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t len = static_cast<int64_t>(rng() % 50);  // empty documents allowed
    for (int64_t i = 0; i < len; ++i) s.tokens.push_back(static_cast<uint32_t>(rng() % vocab));
    s.doc_offsets.push_back(static_cast<int64_t>(s.tokens.size()));
  }
  return s;
}

TokenDatasetMeta make_meta(int64_t vocab, std::string json = R"({"model": {"type": "BPE"}})") {
  TokenDatasetMeta m;
  m.tokenizer_hash = sha256_hex(json);
  m.tokenizer_json = std::move(json);
  m.vocab_size = vocab;
  m.eot_id = vocab - 1;
  m.sources = {{"a.txt", std::string(64, 'a')}, {"b.json", std::string(64, 'b')}};
  m.val_fraction = 0.05;
  m.doc_chars = 8192;
  m.split_rule = "test rule";
  m.created_by = "dataset_test";
  return m;
}

size_t stored_token_bytes(const std::string& path) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t d = H5Dopen2(f, "/train/tokens", H5P_DEFAULT);
  const hid_t t = H5Dget_type(d);
  const size_t size = H5Tget_size(t);
  H5Tclose(t);
  H5Dclose(d);
  H5Fclose(f);
  return size;
}

void expect_same(const TokenSplit& a, const TokenSplit& b) {
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.doc_offsets, b.doc_offsets);
}

// Opens a written file read-write and lets `edit` change it (to fabricate bad files).
void edit_file(const std::string& path, const std::function<void(const h5::Ctx&, hid_t)>& edit) {
  const h5::Ctx ctx{path, h5::Blame::system};
  h5::Handle file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose);
  ASSERT_TRUE(file.valid());
  edit(ctx, file.id());
  file.close(ctx, "H5Fclose");
}

void overwrite_element(const h5::Ctx& ctx, hid_t file, const std::string& dset_name, hsize_t index,
                       int64_t value) {
  h5::Handle dset = h5::open_dataset(ctx, file, dset_name);
  h5::Handle space(H5Dget_space(dset.id()), H5Sclose);
  ASSERT_GE(H5Sselect_elements(space.id(), H5S_SELECT_SET, 1, &index), 0);
  const hsize_t one = 1;
  h5::Handle mem(H5Screate_simple(1, &one, nullptr), H5Sclose);
  ASSERT_GE(H5Dwrite(dset.id(), H5T_NATIVE_INT64, mem.id(), space.id(), H5P_DEFAULT, &value), 0);
}

TEST(TokenDataset, RoundTripUint16) {
  ScratchDir dir;
  const std::string path = dir.file("ds.h5");
  const TokenDatasetMeta meta = make_meta(1000);
  const TokenSplit train = random_split(40, 1000, 1), val = random_split(5, 1000, 2);
  write_token_dataset(path, meta, train, val);
  EXPECT_EQ(stored_token_bytes(path), 2u);

  const TokenDataset ds = TokenDataset::open(path);
  expect_same(ds.read_split("train"), train);
  expect_same(ds.read_split("val"), val);
  EXPECT_EQ(ds.num_tokens("train"), int64_t(train.tokens.size()));
  EXPECT_EQ(ds.num_docs("val"), val.num_docs());
  EXPECT_EQ(ds.path(), path);
  EXPECT_EQ(ds.vocab_size(), 1000);
  EXPECT_EQ(ds.meta().eot_id, 999);
  EXPECT_EQ(ds.tokenizer_json(), meta.tokenizer_json);
  EXPECT_EQ(ds.tokenizer_hash(), meta.tokenizer_hash);
  ASSERT_EQ(ds.meta().sources.size(), 2u);
  EXPECT_EQ(ds.meta().sources[1].name, "b.json");
  EXPECT_EQ(ds.meta().sources[1].sha256, std::string(64, 'b'));
  EXPECT_DOUBLE_EQ(ds.meta().val_fraction, 0.05);
  EXPECT_EQ(ds.meta().doc_chars, 8192);
  EXPECT_EQ(ds.meta().split_rule, "test rule");
  EXPECT_EQ(ds.meta().created_by, "dataset_test");
  expect_user_error([&] { ds.source("test"); }, {path, "'test'"});
}

TEST(TokenDataset, RoundTripUint32EmptyValAndLargeTokenizer) {
  ScratchDir dir;
  const std::string path = dir.file("big.h5");
  // A Qwen-sized vocabulary forces uint32 storage; a multi-megabyte tokenizer.json must fit.
  std::string json = "{\"vocab\": \"";
  json.append(3 << 20, 'x');
  json += "\"}";
  TokenDatasetMeta meta = make_meta(151669, json);
  meta.sources.clear();  // empty string-list attributes must round trip too
  TokenSplit train = random_split(20, 151669, 3);
  train.tokens.push_back(151668);  // the largest id survives
  train.doc_offsets.back() += 1;
  TokenSplit val;
  val.doc_offsets = {0};
  write_token_dataset(path, meta, train, val);
  EXPECT_EQ(stored_token_bytes(path), 4u);
  const TokenDataset ds = TokenDataset::open(path);
  expect_same(ds.read_split("train"), train);
  EXPECT_TRUE(ds.read_split("val").tokens.empty());
  EXPECT_EQ(ds.read_split("val").num_docs(), 0);
  EXPECT_EQ(ds.num_docs("val"), 0);
  EXPECT_EQ(ds.tokenizer_json().size(), json.size());
  EXPECT_TRUE(ds.meta().sources.empty());
}

TEST(TokenDataset, StreamedWriterAndSourceReadsAcrossChunks) {
  // Documents of awkward sizes streamed past several stored chunks; reads of any range (across
  // chunk boundaries, at the end) give back exactly the ids written, in both stored dtypes.
  ScratchDir dir;
  for (const int64_t vocab : {int64_t(60000), int64_t(100000)}) {
    const std::string path = dir.file("s" + std::to_string(vocab) + ".h5");
    std::mt19937_64 rng{uint64_t(vocab)};
    std::vector<uint32_t> all;
    {
      TokenDatasetWriter writer(path, vocab);
      for (int d = 0; d < 40; ++d) {
        std::vector<uint32_t> doc(size_t(rng() % 9000));
        for (uint32_t& t : doc) t = uint32_t(rng() % uint64_t(vocab));
        writer.add_document(Split::train, doc);
        all.insert(all.end(), doc.begin(), doc.end());
      }
      writer.add_document(Split::val, std::vector<uint32_t>{uint32_t(vocab - 1)});
      EXPECT_EQ(writer.num_tokens(Split::train), int64_t(all.size()));
      EXPECT_EQ(writer.num_docs(Split::train), 40);
      EXPECT_FALSE(std::filesystem::exists(path));  // nothing visible before commit
      writer.commit(make_meta(vocab));
    }
    ASSERT_GT(all.size(), size_t(2 * kTokenChunkElements));
    EXPECT_EQ(stored_token_bytes(path), vocab <= 65536 ? 2u : 4u);
    const TokenDataset ds = TokenDataset::open(path);
    const auto src = ds.source("train");
    EXPECT_EQ(src->num_tokens(), int64_t(all.size()));
    EXPECT_EQ(src->name(), path + " /train");
    const int64_t n = int64_t(all.size());
    for (const auto& [begin, len] :
         std::vector<std::pair<int64_t, int64_t>>{{0, 1},
                                                  {kTokenChunkElements - 3, 7},
                                                  {n - 129, 129},
                                                  {12345, 2 * kTokenChunkElements}}) {
      std::vector<int32_t> got(static_cast<size_t>(len));
      src->read(begin, len, got.data());
      for (int64_t i = 0; i < len; ++i) ASSERT_EQ(uint32_t(got[size_t(i)]), all[size_t(begin + i)]);
    }
    EXPECT_EQ(ds.read_split("train").tokens, all);
    EXPECT_EQ(ds.read_split("val").tokens, std::vector<uint32_t>{uint32_t(vocab - 1)});
  }
}

TEST(TokenDataset, UncommittedWriterLeavesNothing) {
  ScratchDir dir;
  {
    TokenDatasetWriter writer(dir.file("x.h5"), 100);
    writer.add_document(Split::train, std::vector<uint32_t>{1, 2, 3});
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(TokenDataset, AtomicReplaceLeavesNoTemporary) {
  ScratchDir dir;
  const std::string path = dir.file("ds.h5");
  write_token_dataset(path, make_meta(50), random_split(3, 50, 4), random_split(1, 50, 5));
  const TokenSplit second = random_split(7, 50, 6);
  write_token_dataset(path, make_meta(50), second, random_split(1, 50, 7));
  expect_same(TokenDataset::open(path).read_split("train"), second);
  int num_entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().filename(), "ds.h5");
    ++num_entries;
  }
  EXPECT_EQ(num_entries, 1);
}

TEST(TokenDataset, SameContentsGiveIdenticalBytes) {
  ScratchDir dir;
  const auto read_all = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const TokenSplit train = random_split(30, 500, 20), val = random_split(4, 500, 21);
  write_token_dataset(dir.file("one.h5"), make_meta(500), train, val);
  write_token_dataset(dir.file("two.h5"), make_meta(500), train, val);
  EXPECT_EQ(read_all(dir.file("one.h5")), read_all(dir.file("two.h5")));
  // Timestamps have one-second resolution, so two quick writes could agree by luck: check that
  // no object records a time at all.
  h5::Handle f(H5Fopen(dir.file("one.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  for (const char* obj : {"/", "/train", "/train/tokens", "/val/doc_offsets"}) {
#if H5_VERSION_GE(1, 12, 0)
    H5O_info2_t info;
    ASSERT_GE(H5Oget_info_by_name3(f.id(), obj, &info, H5O_INFO_TIME, H5P_DEFAULT), 0);
#else
    H5O_info_t info;
    ASSERT_GE(H5Oget_info_by_name2(f.id(), obj, &info, H5O_INFO_TIME, H5P_DEFAULT), 0);
#endif
    EXPECT_EQ(info.mtime, 0) << obj;
    EXPECT_EQ(info.ctime, 0) << obj;
  }
}

TEST(TokenDataset, WriterRejectsIdsOutsideVocabAsBug) {
  ScratchDir dir;
  TokenSplit bad = random_split(2, 10, 8);
  bad.tokens.push_back(10);
  bad.doc_offsets.back() += 1;
  testing::expect_error([&] { write_token_dataset(dir.file("x.h5"), make_meta(10), bad, bad); },
                        ErrorKind::bug, {"token id 10"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.h5")));
}

TEST(TokenDataset, MissingNotHdf5AndTruncatedFiles) {
  ScratchDir dir;
  expect_user_error([&] { TokenDataset::open(dir.file("nope.h5")); }, {"nope.h5"});

  std::mt19937_64 rng(9);
  std::string junk(4096, '\0');
  for (char& c : junk) c = static_cast<char>(rng());
  write_all(dir.file("junk.h5"), junk);
  expect_user_error([&] { TokenDataset::open(dir.file("junk.h5")); },
                    {"junk.h5", "not an HDF5 file"});
  write_all(dir.file("empty.h5"), "");
  expect_user_error([&] { TokenDataset::open(dir.file("empty.h5")); }, {"empty.h5"});

  const std::string path = dir.file("cut.h5");
  write_token_dataset(path, make_meta(1000), random_split(400, 1000, 10),
                      random_split(20, 1000, 11));
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size / 2);
  expect_user_error([&] { TokenDataset::open(path); }, {"cut.h5", "truncated"});
}

TEST(TokenDataset, CorruptedChunkIsAUserError) {
  ScratchDir dir;
  const std::string path = dir.file("rot.h5");
  write_token_dataset(path, make_meta(1000), random_split(400, 1000, 12),
                      random_split(2, 1000, 13));
  // Find the stored bytes of the train tokens' only chunk and flip some in its middle.
  haddr_t addr = 0;
  hsize_t chunk_bytes = 0;
  {
    h5::Handle f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    h5::Handle d(H5Dopen2(f.id(), "/train/tokens", H5P_DEFAULT), H5Dclose);
    h5::Handle space(H5Dget_space(d.id()), H5Sclose);
    hsize_t offset[1];
    unsigned filter_mask = 0;
    ASSERT_GE(H5Dget_chunk_info(d.id(), space.id(), 0, offset, &filter_mask, &addr, &chunk_bytes),
              0);
  }
  ASSERT_GT(chunk_bytes, 16u);
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  io.seekp(static_cast<std::streamoff>(addr + chunk_bytes / 2));
  io.write("\xDE\xAD\xBE\xEF\xDE\xAD\xBE\xEF", 8);
  io.close();
  // Opening reads no tokens; reading the damaged chunk fails its checksum, naming file and dataset.
  const TokenDataset ds = TokenDataset::open(path);
  std::vector<int32_t> window(64);
  expect_user_error([&] { ds.source("train")->read(0, 64, window.data()); },
                    {"rot.h5", "/train/tokens", "corrupt"});
  expect_user_error([&] { ds.read_split("train"); }, {"rot.h5", "/train/tokens"});
}

TEST(TokenDataset, InvalidContentsAreUserErrors) {
  ScratchDir dir;
  const std::string path = dir.file("bad.h5");
  const auto fresh = [&] {
    write_token_dataset(path, make_meta(1000), random_split(30, 1000, 14),
                        random_split(3, 1000, 15));
  };

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    overwrite_element(ctx, f, "/val/tokens", 1, 1000);
  });
  // Ids are checked as they are read: by a window read and by a whole-split read.
  std::vector<int32_t> ids(4);
  expect_user_error([&] { TokenDataset::open(path).source("val")->read(0, 4, ids.data()); },
                    {"bad.h5 /val", "token id 1000 at index 1", "vocab_size 1000"});
  expect_user_error([&] { TokenDataset::open(path).read_split("val"); },
                    {"bad.h5 /val", "token id 1000 at index 1", "vocab_size 1000"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    overwrite_element(ctx, f, "/train/doc_offsets", 2, 0);
  });
  expect_user_error([&] { TokenDataset::open(path).read_split("train"); },
                    {"bad.h5", "doc_offsets decreases"});

  fresh();  // the last offset is checked on open (two reads, whatever the split's size)
  edit_file(path, [](const auto& ctx, const auto& f) {
    const int64_t n = h5::dataset_dims(ctx, h5::open_dataset(ctx, f, "/train/doc_offsets").id(),
                                       "doc_offsets")[0];
    overwrite_element(ctx, f, "/train/doc_offsets", hsize_t(n - 1), 3);
  });
  expect_user_error([&] { TokenDataset::open(path); },
                    {"bad.h5", "'train'", "doc_offsets runs from 0 to 3"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    h5::write_attr_i64(ctx, f, "format_version", 7);
  });
  expect_user_error([&] { TokenDataset::open(path); }, {"bad.h5", "format_version is 7"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    h5::write_attr_string(ctx, f, "tokenizer_json", "{}", h5::StrType::vlen);
  });
  expect_user_error([&] { TokenDataset::open(path); }, {"bad.h5", "tokenizer_hash"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) { ASSERT_GE(H5Adelete(f, "vocab_size"), 0); });
  expect_user_error([&] { TokenDataset::open(path); },
                    {"bad.h5", "missing attribute 'vocab_size'"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    ASSERT_GE(H5Ldelete(f, "/train/doc_offsets", H5P_DEFAULT), 0);
  });
  expect_user_error([&] { TokenDataset::open(path); },
                    {"bad.h5", "missing dataset '/train/doc_offsets'"});

  fresh();
  edit_file(path, [](const auto& ctx, const auto& f) {
    ASSERT_GE(H5Ldelete(f, "/val", H5P_DEFAULT), 0);
  });
  expect_user_error([&] { TokenDataset::open(path); }, {"bad.h5", "missing group 'val'"});
}

TEST(TokenDataset, TokenizerHashMismatchNamesBoth) {
  ScratchDir dir;
  const std::string path = dir.file("ds.h5");
  const TokenDatasetMeta meta = make_meta(100);
  write_token_dataset(path, meta, random_split(3, 100, 16), random_split(1, 100, 17));
  const TokenDataset ds = TokenDataset::open(path);
  ds.check_tokenizer_hash(meta.tokenizer_hash, "recipe tokenizer");  // matching: no error
  const std::string other = sha256_hex("another tokenizer");
  expect_user_error([&] { ds.check_tokenizer_hash(other, "my/tokenizer.json"); },
                    {"ds.h5", meta.tokenizer_hash, other, "my/tokenizer.json"});
}

}  // namespace
}  // namespace tessera
