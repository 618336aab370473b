// The teacher cache file (data/teacher_cache.h): rows written in window order read back exactly
// into any row of a micro-batch, the checks against the dataset, the temperature lookup, a
// missing window, atomic writes, and files that are not caches.
#include "data/teacher_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <random>

#include "core/sha256.h"
#include "data/dataset.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

constexpr int kT = 5, kK = 3, kVocab = 40;

// A token dataset of 101 train tokens (20 windows of 5) and its metadata.
std::string write_dataset(const testing::ScratchDir& dir, const std::string& name,
                          const std::string& split_rule = "rule") {
  TokenDatasetMeta m;
  m.tokenizer_json = R"({"model": {"type": "BPE"}})";
  m.tokenizer_hash = sha256_hex(m.tokenizer_json);
  m.vocab_size = kVocab;
  m.eot_id = kVocab - 1;
  m.sources = {{"a.txt", std::string(64, 'a')}};
  m.val_fraction = 0.1;
  m.doc_chars = 100;
  m.split_rule = split_rule;
  m.created_by = "teacher_cache_test";
  TokenSplit train, val;
  for (int i = 0; i < 101; ++i) train.tokens.push_back(uint32_t(i % kVocab));
  train.doc_offsets = {0, 101};
  val.tokens = {1, 2, 3};
  val.doc_offsets = {0, 3};
  const std::string path = dir / name;
  write_token_dataset(path, m, train, val);
  return path;
}

TeacherCacheMeta cache_meta(const TokenDataset& d) {
  TeacherCacheMeta m;
  m.top_k = kK;
  m.seq_len = kT;
  m.vocab_size = kVocab;
  m.dataset_windows = (d.num_tokens("train") - 1) / kT;
  m.temperatures = {1.0f, 2.0f};
  m.tokenizer_hash = d.tokenizer_hash();
  m.dataset_key = d.content_key();
  m.dataset = d.path();
  m.teacher = "runs/t/checkpoints/step_1";
  m.teacher_precision = "fp32";
  m.created_by = "teacher_cache_test";
  return m;
}

// Row values that identify (window, position, slot): logits w + p/10 + j/100, ids (w+p+j) % V,
// lse[i][h] = w + 10 p + 100 (2i + h).
float logit(int64_t w, int p, int j) { return float(w) + p / 10.0f + j / 100.0f; }
int32_t id(int64_t w, int p, int j) { return int32_t((w + p + j) % kVocab); }
float lse(int64_t w, int p, int i, int h) { return float(w + 10 * p + 100 * (2 * i + h)); }

TeacherRows rows_for(const std::vector<int64_t>& windows, int nT) {
  const int B = int(windows.size());
  TeacherRows r;
  for (int b = 0; b < B; ++b)
    for (int p = 0; p < kT; ++p)
      for (int j = 0; j < kK; ++j) {
        r.topk_logits.push_back(logit(windows[b], p, j));
        r.topk_ids.push_back(id(windows[b], p, j));
      }
  r.lse.resize(size_t(nT) * 2 * B * kT);
  for (int i = 0; i < nT; ++i)
    for (int h = 0; h < 2; ++h)
      for (int b = 0; b < B; ++b)
        for (int p = 0; p < kT; ++p)
          r.lse[((size_t(i) * 2 + h) * B + b) * kT + p] = lse(windows[b], p, i, h);
  return r;
}

std::string write_cache(const testing::ScratchDir& dir, const TeacherCacheMeta& m,
                        const std::vector<int64_t>& windows) {
  const std::string path = dir / "cache.h5";
  TeacherCacheWriter w(path, m, windows);
  // Two batches of uneven size.
  const std::vector<int64_t> a(windows.begin(), windows.begin() + 2),
      b(windows.begin() + 2, windows.end());
  w.write(2, rows_for(a, 2));
  w.write(int64_t(b.size()), rows_for(b, 2));
  w.commit();
  return path;
}

TEST(TeacherCache, RowsReadBackIntoAnyRowOfAMicroBatch) {
  testing::ScratchDir dir;
  const TokenDataset d = TokenDataset::open(write_dataset(dir, "d.h5"));
  const std::vector<int64_t> windows = {0, 3, 7, 19};
  const TeacherCache c = TeacherCache::open(write_cache(dir, cache_meta(d), windows));
  EXPECT_EQ(c.num_windows(), 4);
  EXPECT_EQ(c.meta().dataset_windows, 20);
  EXPECT_EQ(c.meta().teacher, "runs/t/checkpoints/step_1");
  c.check_dataset(d, kT, "distill.teacher_cache");
  EXPECT_EQ(c.temperature_index(2.0f), 1);
  EXPECT_EQ(c.temperature_index(1.0f), 0);
  EXPECT_EQ(c.temperature_index(1.5f), -1);
  // A micro-batch of 3 rows: windows 19, 0, 7 (the order the loader picks).
  TeacherRows got;
  TeacherCache::resize(got, c.meta(), 3);
  const std::vector<int64_t> order = {19, 0, 7};
  for (int b = 0; b < 3; ++b) c.read(order[b], b, 3, got, "test");
  const TeacherRows want = rows_for(order, 2);
  EXPECT_EQ(got.topk_logits, want.topk_logits);
  EXPECT_EQ(got.topk_ids, want.topk_ids);
  EXPECT_EQ(got.lse, want.lse);
  testing::expect_user_error([&] { c.read(5, 0, 3, got, "recipe.yaml: step 4"); },
                             {"recipe.yaml: step 4", "window 5", "lacks", "4 of the dataset's 20"});
}

TEST(TeacherCache, MustMatchTheDatasetAndSeqLen) {
  testing::ScratchDir dir;
  const TokenDataset d = TokenDataset::open(write_dataset(dir, "d.h5"));
  const TokenDataset other = TokenDataset::open(write_dataset(dir, "other.h5", "another rule"));
  const TeacherCache c = TeacherCache::open(write_cache(dir, cache_meta(d), {0, 1, 2}));
  testing::expect_user_error([&] { c.check_dataset(other, kT, "r.yaml: distill.teacher_cache"); },
                             {"r.yaml: distill.teacher_cache", "another dataset", "other.h5"});
  testing::expect_user_error([&] { c.check_dataset(d, 4, "key"); },
                             {"seq_len 5", "the run reads 4"});
}

TEST(TeacherCache, WritesAreAtomicAndBadFilesAreUserErrors) {
  testing::ScratchDir dir;
  const TokenDataset d = TokenDataset::open(write_dataset(dir, "d.h5"));
  {
    TeacherCacheWriter w(dir / "partial.h5", cache_meta(d), {0, 1, 2});
    w.write(2, rows_for({0, 1}, 2));
  }  // never committed: no file, no temporary left
  EXPECT_FALSE(std::filesystem::exists(dir / "partial.h5"));
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().string().find(".tmp-"), std::string::npos) << e.path();
  testing::expect_user_error([&] { TeacherCache::open(dir / "d.h5"); }, {"d.h5"});
  testing::expect_user_error([&] { TeacherCache::open(dir / "missing.h5"); }, {"missing.h5"});
}

}  // namespace
}  // namespace tessera
