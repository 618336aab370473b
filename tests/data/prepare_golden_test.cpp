// `tessera prepare`'s output is pinned: the sha256 of every token dataset and root attribute of a
// small synthetic corpus (six files: UTF-8, Latin-1, CRLF, a SOTU .json, one file of one long
// line) must equal what the single-threaded writer of d6ae971 produced, for any thread count.
// Hashes are of the stored bytes (datasets) and of the values (attributes), read with the raw HDF5
// C API so that no Tessera wrapper is under test here.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/sha256.h"
#include "data/prepare.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::ScratchDir;
using testing::write_all;

// Pseudo-random words (a few accented letters among them) in lines and paragraphs.
std::string synthetic_text(uint64_t seed, int num_words) {
  static const char* kSyllables[] = {"ka", "to", "re", "mi",       "su", "lo",        "ne", "va",
                                     "di", "pe", "qu", "\xc3\xa9", "th", "\xc3\xb8r", "an", "es"};
  const CounterRng rng(seed, "prepare_golden/text");
  std::string s;
  for (int w = 0; w < num_words; ++w) {
    const uint32_t r = rng.bits(uint64_t(w));
    for (uint32_t k = 0; k < 1 + r % 4; ++k) s += kSyllables[(r >> (4 + 4 * k)) % 16];
    const uint32_t sep = (r >> 24) % 64;
    s += sep == 0 ? "\n\n" : sep < 4 ? ".\n" : sep < 8 ? ", " : " ";
  }
  return s;
}

std::string to_latin1(const std::string& utf8) {  // only the é and ø of synthetic_text
  std::string out;
  for (size_t i = 0; i < utf8.size(); ++i) {
    const auto c = static_cast<unsigned char>(utf8[i]);
    if (c == 0xc3) {
      out += static_cast<char>(static_cast<unsigned char>(utf8[i + 1]) + 0x40);
      ++i;
    } else {
      out += utf8[i];
    }
  }
  return out;
}

std::string to_crlf(const std::string& text) {
  std::string out;
  for (const char c : text) out += c == '\n' ? std::string("\r\n") : std::string(1, c);
  return out;
}

void write_corpus(const std::string& dir) {
  std::filesystem::create_directories(dir);
  write_all(dir + "/a.txt", synthetic_text(1, 30000));
  write_all(dir + "/b.txt", to_latin1(synthetic_text(2, 12000)));
  write_all(dir + "/c.txt", to_crlf(synthetic_text(3, 9000)));
  write_all(dir + "/d.json", "{\"text\": \"" + std::string(5000, 'w') + " one line\"}");
  std::string one_line = synthetic_text(4, 8000);
  for (char& c : one_line) c = c == '\n' ? ' ' : c;
  write_all(dir + "/e.txt", one_line);
  write_all(dir + "/f.txt", synthetic_text(5, 200));
}

std::string read_attr_text(hid_t obj, const char* name) {
  const hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
  const hid_t type = H5Aget_type(attr);
  const hid_t space = H5Aget_space(attr);
  const auto n = static_cast<size_t>(H5Sget_simple_extent_npoints(space));
  std::string text;
  if (H5Tget_class(type) == H5T_STRING && H5Tis_variable_str(type) > 0) {
    std::vector<char*> values(n, nullptr);
    const hid_t mem = H5Tcopy(H5T_C_S1);
    H5Tset_size(mem, H5T_VARIABLE);
    H5Tset_cset(mem, H5Tget_cset(type));
    EXPECT_GE(H5Aread(attr, mem, values.data()), 0) << name;
    for (char* v : values) text += std::string(v ? v : "") + "\n";
    H5Dvlen_reclaim(mem, space, H5P_DEFAULT, values.data());
    H5Tclose(mem);
  } else if (H5Tget_class(type) == H5T_STRING) {
    std::string raw(H5Tget_size(type) * n, '\0');
    EXPECT_GE(H5Aread(attr, type, raw.data()), 0) << name;
    text = raw;
  } else if (H5Tget_class(type) == H5T_INTEGER) {
    std::vector<long long> v(n);
    EXPECT_GE(H5Aread(attr, H5T_NATIVE_LLONG, v.data()), 0) << name;
    for (long long x : v) text += std::to_string(x) + "\n";
  } else {
    std::vector<double> v(n);
    EXPECT_GE(H5Aread(attr, H5T_NATIVE_DOUBLE, v.data()), 0) << name;
    for (double x : v) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g\n", x);
      text += buf;
    }
  }
  H5Sclose(space);
  H5Tclose(type);
  H5Aclose(attr);
  return text;
}

// The stored bytes of a dataset, read in its own (little-endian file) type.
std::string dataset_bytes(hid_t file, const char* name) {
  const hid_t dset = H5Dopen2(file, name, H5P_DEFAULT);
  const hid_t type = H5Dget_type(dset);
  const hid_t space = H5Dget_space(dset);
  std::string raw(H5Tget_size(type) * size_t(H5Sget_simple_extent_npoints(space)), '\0');
  if (!raw.empty()) {
    EXPECT_GE(H5Dread(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw.data()), 0) << name;
  }
  H5Sclose(space);
  H5Tclose(type);
  H5Dclose(dset);
  return raw;
}

// "<name> <sha256>" for the four datasets and every root attribute, by name.
std::map<std::string, std::string> content_hashes(const std::string& path) {
  std::map<std::string, std::string> out;
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(file, 0) << path;
  for (const char* d : {"/train/tokens", "/train/doc_offsets", "/val/tokens", "/val/doc_offsets"})
    out[d] = sha256_hex(dataset_bytes(file, d));
  const auto collect = [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    return 0;
  };
  std::vector<std::string> attrs;
  H5Aiterate2(file, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &attrs);
  for (const std::string& a : attrs) out["@" + a] = sha256_hex(read_attr_text(file, a.c_str()));
  H5Fclose(file);
  return out;
}

// Recorded from the writer of d6ae971 (whole dataset in memory, written once).
const std::map<std::string, std::string> kTrainedGolden = {
    {"/train/doc_offsets", "382df01eaf3ffe976df93d99da2686aea57ee7720d614e106eaba69ce9bffdf9"},
    {"/train/tokens", "5aef9e5c3b1f8d964c46469169da4665bba0a58e1950d0360f8bf491063a6c93"},
    {"/val/doc_offsets", "15b71c7135340cf8772921eca88a26074ec394dc74552d9ee3e5e7bde7d09659"},
    {"/val/tokens", "36d938d19165b3600580559db6a7e80b269ffdd57c13f861b15db81b8cab525c"},
    {"@created_by", "fbf7126b361ba7fc5239c65e8e74744c108fac482d0e07b74305a41bb55cbfc3"},
    {"@doc_chars", "1d8fa3c8ab49d50b30fccbbd901735d5896a5d7959a5ad7ccecb79c1c849cc66"},
    {"@eot_id", "864154b81b91ae782cd8fc7f265912aafa6c36078168f96951d452cab5d99dc7"},
    {"@format_version", "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865"},
    {"@source_files", "2ef0c4894b8e43656da65f3be28f87dba426ef09185db80ce72734ffef8e98cb"},
    {"@source_sha256", "e1f512d736cb922dd2294f0cc6ff18c2ce8517644b41d03f3a9eee4d31592732"},
    {"@split_rule", "a18c23082748e2bb9691c2e1d6fa67cdcf15ce14bf6b9a1d36cdbda81884be7d"},
    {"@tokenizer_hash", "851aaeb71fcc8c472e135dece74c0e0335c5ea19f1fe1907da7ea0904d824872"},
    {"@tokenizer_json", "b4f2e39f2abbb61443658f00212e00a037ca545070045094264c7c620685d8ec"},
    {"@val_fraction", "eb3245e53e5696d6a350647de6a508add628fbcf2eb83d2de3518a6cd560efec"},
    {"@vocab_size", "e4df891c484d7abb985dadf539fa1883a646dab6337af5cae4159c587b7050cc"},
};

const std::map<std::string, std::string> kQwen3Golden = {
    {"/train/doc_offsets", "384a07b7ce6ccb931d78a11a489905238dfa11763765e79087605122138b4894"},
    {"/train/tokens", "f22d46bfa747572b79765cd440fe1ddf5dce560eae7fa1beb52f592b7704806e"},
    {"/val/doc_offsets", "c11ea94e0c64b1c635d6b31231c2aea68abad8f45801eee830e171e7a2210599"},
    {"/val/tokens", "d75ad542d7e865c4e9e557ccdda13a467f6f049fb644229ba5656b429e020e67"},
    {"@created_by", "11b368dc54c4685e4f3563cc7d6553d2769850f232cf88e827707b85808b9f9e"},
    {"@doc_chars", "131e490ede5d344e5a8539d4a5335ccc70db7eacb397b876cffc72578b1331bf"},
    {"@eot_id", "382fc4de31d9c0b7a230e0f5339db70f8538a8fc1880d4d684b9baf077820928"},
    {"@format_version", "4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865"},
    {"@source_files", "2ef0c4894b8e43656da65f3be28f87dba426ef09185db80ce72734ffef8e98cb"},
    {"@source_sha256", "e1f512d736cb922dd2294f0cc6ff18c2ce8517644b41d03f3a9eee4d31592732"},
    {"@split_rule", "485b17502f35abec6a146a663be067902cde03053c7ee418b41a192a56c94419"},
    {"@tokenizer_hash", "ddf4964454e37c783052a006c5598d5033f6c8c5e9da61fc5060a44a5bf7a23c"},
    {"@tokenizer_json", "0a66a57a0bc239eb8215f417a2b0904371622480a5e228fde6bf991f2121935c"},
    {"@val_fraction", "42358b8b21a5db23104f90e0408f84ee6dc2d73ec9ab060c29e33afcc481c246"},
    {"@vocab_size", "0267aa15faa20df7052a92440efb3892668635e3b11744c75d1d2bd96989e288"},
};

void expect_pinned(const std::string& path, const std::map<std::string, std::string>& golden,
                   int threads) {
  const std::map<std::string, std::string> got = content_hashes(path);
  EXPECT_EQ(got.size(), golden.size());
  for (const auto& [name, hash] : golden) {
    const auto it = got.find(name);
    ASSERT_NE(it, got.end()) << name;
    EXPECT_EQ(it->second, hash) << name << " differs with " << threads << " thread(s)";
  }
}

TEST(PrepareGolden, TrainedTokenizerOutputIsPinned) {
  ScratchDir dir;
  write_corpus(dir.file("corpus"));
  for (int threads : {1, 3}) {
    PrepareOptions opt;
    opt.inputs = {dir.file("corpus")};
    opt.out = dir.file("out/ds.h5");
    opt.train_vocab = 400;  // 16-bit token storage
    opt.val_fraction = 0.2f;
    opt.doc_chars = 2000;
    opt.num_threads = threads;
    prepare_dataset(opt);
    expect_pinned(opt.out, kTrainedGolden, threads);
  }
}

// Needs scripts/fetch-data.sh (data/raw/tokenizer-qwen3), like the conformance tests.
TEST(PrepareGolden, Qwen3OutputIsPinned) {
  ScratchDir dir;
  write_corpus(dir.file("corpus"));
  for (int threads : {1, 2}) {
    PrepareOptions opt;
    opt.inputs = {dir.file("corpus")};
    opt.out = dir.file("out/q.h5");
    opt.tokenizer_spec = "qwen3";  // 32-bit token storage
    opt.num_threads = threads;
    prepare_dataset(opt);
    expect_pinned(opt.out, kQwen3Golden, threads);
  }
}

}  // namespace
}  // namespace tessera
