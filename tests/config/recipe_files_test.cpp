// Every recipe in recipes/ loads, validates, round-trips through recipe_to_yaml and opens with a
// comment header; the named recipes have the architectures (and parameter counts) they claim.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "config/recipe.h"

namespace tessera {
namespace {

namespace fs = std::filesystem;

const fs::path kRecipeDir = fs::path(TESSERA_SOURCE_DIR) / "recipes";

std::vector<fs::path> recipe_files() {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(kRecipeDir))
    if (entry.path().extension() == ".yaml") files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  return files;
}

Recipe load(const std::string& name) { return load_recipe((kRecipeDir / name).string()); }

TEST(RecipeFiles, EveryRecipeLoadsValidatesAndRoundTrips) {
  const std::vector<fs::path> files = recipe_files();
  ASSERT_GE(files.size(), 4u) << "recipes in " << kRecipeDir;
  for (const fs::path& path : files) {
    SCOPED_TRACE(path.string());
    Recipe r;
    try {
      r = load_recipe(path.string());
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      continue;
    }
    EXPECT_EQ(r.file, path.string());
    const std::string yaml = recipe_to_yaml(r);
    EXPECT_EQ(parse_recipe(yaml, r.file), r) << yaml;
  }
}

TEST(RecipeFiles, EveryRecipeOpensWithACommentHeader) {
  for (const fs::path& path : recipe_files()) {
    std::ifstream in(path);
    std::string line;
    int num_comment_lines = 0;
    while (std::getline(in, line) && line.rfind("#", 0) == 0) ++num_comment_lines;
    EXPECT_GE(num_comment_lines, 2) << path;
    EXPECT_LE(num_comment_lines, 4) << path;
  }
}

TEST(RecipeFiles, CiTinyTakesItsVocabularyFromTheDataset) {
  Recipe r = load("ci-tiny.yaml");
  EXPECT_EQ(r.model.family, ModelFamily::gpt2);
  EXPECT_EQ(r.model.vocab_size, 0);
  EXPECT_EQ(r.train.device, DeviceChoice::cpu);
  EXPECT_EQ(r.data.path, (DataSources{{"data/gutenberg/gutenberg.h5", 1.0f}}));
  finalize_model_vocab(r.model, 4096, r.file);
  EXPECT_EQ(r.model.padded_vocab_size, 4096);
  ModelConfig odd = load("ci-tiny.yaml").model;
  finalize_model_vocab(odd, 4100, r.file);
  EXPECT_EQ(odd.padded_vocab_size, 4160);  // next multiple of 64
}

TEST(RecipeFiles, Gpt2Small) {
  const Recipe r = load("gpt2-124m.yaml");
  EXPECT_EQ(r.model.vocab_size, 50257);
  EXPECT_EQ(r.model.padded_vocab_size, 50304);
  EXPECT_EQ(r.model.ffn_hidden, 3072);
  EXPECT_EQ(r.model.head_dim, 64);
  EXPECT_EQ(r.precision.compute, Compute::bf16);
  EXPECT_EQ(r.model.num_params(), 124'475'904);  // derivation in model_config_test.cpp
}

TEST(RecipeFiles, Llama1b) {
  const Recipe r = load("llama-1b.yaml");
  EXPECT_EQ(r.model.norm, NormKind::rmsnorm);
  EXPECT_EQ(r.model.activation, ActivationKind::swiglu);
  EXPECT_TRUE(r.model.tied_embeddings);
  EXPECT_FLOAT_EQ(r.model.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(r.model.rope_theta, 500000.0f);
  EXPECT_EQ(r.model.num_params(), 1'235'814'400);
}

TEST(RecipeFiles, Qwen3_14b) {
  const Recipe r = load("qwen3-14b.yaml");
  EXPECT_TRUE(r.model.qk_norm);
  EXPECT_FALSE(r.model.tied_embeddings);
  EXPECT_EQ(r.model.padded_vocab_size, 151936);
  EXPECT_EQ(r.parallel.tp * r.parallel.pp * r.parallel.dp, 128);
  EXPECT_EQ(r.model.num_params(), 14'768'307'200);
}

TEST(RecipeFiles, CiTinyMoe) {
  Recipe r = load("ci-tiny-moe.yaml");
  EXPECT_EQ(r.moe.num_experts, 8);
  EXPECT_EQ(r.moe.topk, 2);
  EXPECT_EQ(r.moe.capacity_factor, 0.0f);
  EXPECT_FALSE(r.moe.is_moe_layer(0));  // the dense first block
  EXPECT_EQ(r.moe.num_moe_layers(r.model.num_layers), 3);
  EXPECT_EQ(r.train.device, DeviceChoice::cpu);
}

TEST(RecipeFiles, Moe16xTop2) {
  const Recipe r = load("moe-16x-top2.yaml");
  EXPECT_EQ(r.moe.num_experts, 16);
  EXPECT_EQ(r.moe.topk, 2);
  EXPECT_EQ(r.model.num_params(), 2'368'244'736);
  EXPECT_EQ(r.model.num_active_params(), 430'476'288);
}

// Qwen3-30B-A3B: 30.53B parameters, 3.35B active (Qwen's "30B-A3B").
TEST(RecipeFiles, Qwen3_30bA3b) {
  const Recipe r = load("qwen3-30b-a3b.yaml");
  EXPECT_EQ(r.model.num_layers, 48);
  EXPECT_EQ(r.model.hidden, 2048);
  EXPECT_EQ(r.model.num_heads, 32);
  EXPECT_EQ(r.model.num_kv_heads, 4);
  EXPECT_EQ(r.moe.num_experts, 128);
  EXPECT_EQ(r.moe.topk, 8);
  EXPECT_EQ(r.moe.ffn_hidden, 768);
  EXPECT_EQ(r.model.padded_vocab_size, 151936);
  EXPECT_EQ(r.moe.num_moe_layers(48), 48);
  EXPECT_EQ(r.model.num_params(), 30'532'122'624);
  EXPECT_EQ(r.model.num_active_params(), 3'353'032'704);
}

TEST(RecipeFiles, LoadEqualsParseOfTheText) {
  const fs::path path = kRecipeDir / "gpt2-124m.yaml";
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(load_recipe(path.string(), {"train.steps=700"}),
            parse_recipe(text.str(), path.string(), {"train.steps=700"}));
  EXPECT_EQ(load_recipe(path.string(), {"train.steps=700"}).train.steps, 700);
}

}  // namespace
}  // namespace tessera
