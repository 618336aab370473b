// load_export_model: any shard layout merges to the same whole tensors, vocabulary padding is cut,
// optimizer state is left out, the tokenizer comes from the checkpoint or (older checkpoints) from
// the recipe's dataset, and bad paths are user errors naming them.
#include "export/export_model.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "tests/common/errors.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera::exporting {
namespace {

using testing::expect_user_error;
using testing::ScratchDir;

TEST(ExportModel, ShardLayoutsMergeToTheSameTensors) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(testing::kLlamaModel);
  const std::string one = testing::write_synthetic_checkpoint(dir / "one", r);
  testing::SyntheticOptions o;
  o.num_shards = 3;
  const std::string three = testing::write_synthetic_checkpoint(dir / "three", r, o);
  const ExportModel a = load_export_model(dir / "one");  // a run directory: its newest checkpoint
  const ExportModel b = load_export_model(three);
  EXPECT_EQ(a.checkpoint_dir, one);
  EXPECT_EQ(a.step, 5);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.has(name)) << name;
    EXPECT_EQ(t.shape, b.at(name).shape) << name;
    EXPECT_EQ(t.data, b.at(name).data) << name;  // bit for bit
    EXPECT_EQ(name.rfind("optim.", 0), std::string::npos) << name;
  }
  // The values are the checkpoint's, the padding rows (4096..4159) cut.
  std::map<std::string, std::vector<int64_t>> shapes;
  const auto values = testing::synthetic_values(r, 7, &shapes);
  for (const char* name : {"embed.wte", "lm_head.weight"}) {
    const ExportTensor& t = a.at(name);
    EXPECT_EQ(t.shape, (std::vector<int64_t>{4096, 64})) << name;
    const std::vector<float>& full = values.at(name);
    EXPECT_TRUE(std::equal(t.data.begin(), t.data.end(), full.begin())) << name;
  }
  EXPECT_EQ(a.at("layers.1.attn.wq.weight").data, values.at("layers.1.attn.wq.weight"));
  EXPECT_EQ(a.tokenizer_hash, testing::ci_tokens().tokenizer_hash());
  EXPECT_EQ(a.tokenizer_json, testing::ci_tokens().tokenizer_json());
  EXPECT_EQ(a.recipe.model, r.model);
}

TEST(ExportModel, OlderCheckpointsTakeTheTokenizerOfTheirDataset) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(testing::kGpt2Model);
  testing::SyntheticOptions o;
  o.tokenizer_json = false;
  const std::string ok = testing::write_synthetic_checkpoint(dir / "ok", r, o);
  EXPECT_EQ(load_export_model(ok).tokenizer_json, testing::ci_tokens().tokenizer_json());
  o.tokenizer_hash = std::string(64, 'a');
  const std::string other = testing::write_synthetic_checkpoint(dir / "other", r, o);
  expect_user_error([&] { load_export_model(other); }, {other, std::string(64, 'a')});
}

TEST(ExportModel, MockDataHasNoTokenizer) {
  ScratchDir dir;
  Recipe r = testing::export_recipe(testing::kGpt2Model);
  r.data.path = {{"mock", 1.0f}};
  testing::SyntheticOptions o;
  o.tokenizer_json = false;
  const std::string step = testing::write_synthetic_checkpoint(dir / "mock", r, o);
  expect_user_error([&] { load_export_model(step); }, {step, "mock"});
}

TEST(ExportModel, BadPathsAreUserErrorsNamingThem) {
  ScratchDir dir;
  expect_user_error([&] { load_export_model(dir / "absent"); }, {dir / "absent", "does not exist"});
  std::filesystem::create_directories(dir / "empty");
  expect_user_error([&] { load_export_model(dir / "empty"); }, {dir / "empty", "no complete"});
  std::filesystem::create_directories(dir / "run/checkpoints/step_3");
  expect_user_error([&] { load_export_model(dir / "run/checkpoints/step_3"); },
                    {"step_3", "not a complete checkpoint"});
}

}  // namespace
}  // namespace tessera::exporting
