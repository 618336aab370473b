// Opening the trainer's data: one dataset or a blend of several (sources per split, weights kept,
// one shared tokenizer or a user error naming both files), and the synthetic mock source.
#include "data/data_blend.h"

#include <gtest/gtest.h>

#include "core/sha256.h"
#include "data/dataset.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::ScratchDir;

// A dataset of one train and one val document, tokens 0, 1, ..., tokenized "by" `tokenizer`.
void write_dataset(const std::string& path, const std::string& tokenizer, int num_train) {
  TokenDatasetMeta m;
  m.tokenizer_json = tokenizer;
  m.tokenizer_hash = sha256_hex(tokenizer);
  m.vocab_size = 1000;
  m.eot_id = 999;
  m.split_rule = "test";
  TokenDatasetWriter w(path, m.vocab_size);
  std::vector<uint32_t> doc(static_cast<size_t>(num_train));
  for (size_t i = 0; i < doc.size(); ++i) doc[i] = uint32_t(i % 999);
  w.add_document(Split::train, doc);
  w.add_document(Split::val, std::vector<uint32_t>(doc.begin(), doc.begin() + 50));
  w.commit(m);
}

TEST(DataBlend, OpensEveryDatasetOfTheBlend) {
  ScratchDir dir;
  write_dataset(dir / "a.h5", "{\"tok\": 1}", 300);
  write_dataset(dir / "b.h5", "{\"tok\": 1}", 500);
  const DataBlend b = open_data_blend({{dir / "a.h5", 0.7}, {dir / "b.h5", 0.3}}, 1);
  EXPECT_EQ(b.tokenizer_hash, sha256_hex("{\"tok\": 1}"));
  EXPECT_EQ(b.tokenizer_json, "{\"tok\": 1}");
  EXPECT_EQ(b.vocab_size, 1000);
  ASSERT_EQ(b.train.size(), 2u);
  EXPECT_EQ(b.train[1].source->num_tokens(), 500);
  EXPECT_EQ(b.train[1].source->name(), dir / "b.h5" + " /train");
  EXPECT_EQ(b.val[0].source->num_tokens(), 50);
  EXPECT_DOUBLE_EQ(b.val[0].weight, 0.7);
  const Loader loader(b.train, {10, 10, 1, 0, 1});
  EXPECT_EQ(loader.schedule().period(), 10);
  EXPECT_EQ(loader.schedule().per_period(0), 7);
  b.check_tokenizer_hash(sha256_hex("{\"tok\": 1}"), "recipe");
  expect_user_error([&] { b.check_tokenizer_hash("beef", "data.tokenizer = gpt2"); },
                    {"a.h5", "b.h5", "beef", "data.tokenizer = gpt2"});
}

TEST(DataBlend, DatasetsMustShareOneTokenizer) {
  ScratchDir dir;
  write_dataset(dir / "a.h5", "{\"tok\": 1}", 300);
  write_dataset(dir / "c.h5", "{\"tok\": 2}", 300);
  expect_user_error(
      [&] {
        open_data_blend({{dir / "a.h5", 1}, {dir / "c.h5", 1}}, 1);
      },
      {dir / "a.h5", dir / "c.h5", sha256_hex("{\"tok\": 1}"), sha256_hex("{\"tok\": 2}"),
       "one tokenizer"});
  expect_user_error(
      [&] {
        open_data_blend({{dir / "a.h5", 1}, {dir / "nope.h5", 1}}, 1);
      },
      {"nope.h5"});
  expect_user_error([&] { open_data_blend({}, 1); }, {"no dataset"});
}

TEST(DataBlend, MockIsSyntheticAndAlone) {
  const DataBlend b = open_data_blend({{"mock", 1.0}}, 3, 50304);
  EXPECT_EQ(b.tokenizer_hash, "mock");
  EXPECT_EQ(b.vocab_size, 50304);
  EXPECT_EQ(b.train[0].source->num_tokens(), kMockTrainTokens);
  std::vector<int32_t> x(1000), y(1000);
  b.train[0].source->read(kMockTrainTokens - 1000, 1000, x.data());
  open_data_blend({{"mock", 1.0}}, 3, 50304)
      .train[0]
      .source->read(kMockTrainTokens - 1000, 1000, y.data());
  EXPECT_EQ(x, y);  // a pure function of (seed, index)
  for (int32_t t : x) EXPECT_LT(t, 50304);
  b.train[0].source->read(0, 1000, x.data());
  b.val[0].source->read(0, 1000, y.data());
  EXPECT_NE(x, y);  // train and val are different streams
  expect_user_error(
      [] {
        open_data_blend({{"mock", 1.0}, {"a.h5", 1.0}}, 1, 10);
      },
      {"mock", "blended"});
  expect_user_error([] { open_data_blend({{"mock", 1.0}}, 1, 0); }, {"mock", "vocab"});
}

}  // namespace
}  // namespace tessera
