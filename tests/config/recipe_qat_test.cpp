// The `qat` section: off by default (and then every other key is an error), the defaults of an
// int8 and an int4 run (group_size auto: 0 and 32), the resolved YAML round trip, overrides, and
// the errors, each naming the key, its value and the file.
#include <gtest/gtest.h>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera::testing {
namespace {

// kBaseRecipe (train.steps 10, lines 12..14) plus a qat section from line 15.
Recipe parse_qat(const std::string& qat, const std::string& extra = "") {
  return parse_recipe(std::string(kBaseRecipe) + extra + "qat:\n" + qat, "t.yaml");
}
void expect_qat_error(const std::string& qat, const std::vector<std::string>& fragments,
                      const std::string& extra = "") {
  expect_user_error([&] { parse_qat(qat, extra); }, fragments);
}

TEST(RecipeQat, OffByDefaultAndEmittedAsOneKey) {
  const Recipe r = parse_recipe(kBaseRecipe, "t.yaml");
  EXPECT_FALSE(r.qat.enabled());
  EXPECT_FALSE(r.qat.active_at(100));
  const std::string yaml = recipe_to_yaml(r);
  EXPECT_NE(yaml.find("qat:\n  weights: none"), std::string::npos) << yaml;
  EXPECT_EQ(yaml.find("group_size"), std::string::npos) << yaml;  // not applicable: left out
  EXPECT_EQ(parse_recipe(yaml, "t.yaml"), r);
}

TEST(RecipeQat, Int8DefaultsToPerChannelScalesOnEveryBlockLinear) {
  const Recipe r = parse_qat("  weights: int8\n");
  const QatConfig& q = r.qat;
  EXPECT_EQ(q.weights, QatBits::int8);
  EXPECT_EQ(q.group_size, 0);
  EXPECT_EQ(q.group_for(768), 768);
  EXPECT_EQ(q.activations, QatActivations::none);
  EXPECT_EQ(q.layers, default_qat_layers());
  EXPECT_TRUE(q.quantizes(QatLayer::attention) && q.quantizes(QatLayer::mlp) &&
              q.quantizes(QatLayer::experts) && q.quantizes(QatLayer::shared_experts));
  EXPECT_FALSE(q.quantizes(QatLayer::lm_head) || q.quantizes(QatLayer::embedding));
  EXPECT_EQ(q.start_step, 0);
  EXPECT_TRUE(q.active_at(0));
  EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
}

TEST(RecipeQat, Int4DefaultsToGroupsOf32AndKeysRoundTrip) {
  EXPECT_EQ(parse_qat("  weights: int4\n").qat.group_size, 32);
  EXPECT_EQ(parse_qat("  weights: int4\n  group_size: auto\n").qat.group_size, 32);
  const Recipe r = parse_qat(
      "  weights: int4\n"
      "  group_size: 128\n"
      "  activations: int8\n"
      "  layers: [mlp, experts]\n"
      "  start_step: 4\n");
  const QatConfig& q = r.qat;
  EXPECT_EQ(q.group_size, 128);
  EXPECT_EQ(q.group_for(768), 128);
  EXPECT_EQ(q.activations, QatActivations::int8);
  EXPECT_EQ(q.layers, (std::vector<QatLayer>{QatLayer::mlp, QatLayer::experts}));
  EXPECT_FALSE(q.active_at(3));
  EXPECT_TRUE(q.active_at(4));
  EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
  const Recipe o = parse_recipe(kBaseRecipe, "t.yaml", {"qat.weights=int8", "qat.group_size=32"});
  EXPECT_EQ(o.qat.group_size, 32);
}

TEST(RecipeQat, Errors) {
  expect_qat_error("  group_size: 32\n",
                   {"t.yaml", "qat.group_size is given (line 16)", "qat.weights = none"});
  expect_qat_error("  weights: int3\n", {"t.yaml:16", "qat.weights", "'int3'", "int8", "int4"});
  expect_qat_error("  weights: int8\n  group_size: 48\n",
                   {"t.yaml", "qat.group_size = 48 (line 17)", "32, 64 or 128"});
  expect_qat_error("  weights: int8\n  group_size: 256\n", {"qat.group_size", "'256'"});
  expect_qat_error("  weights: int4\n  group_size: 0\n",
                   {"t.yaml", "qat.group_size = 0 (line 17)", "qat.weights = int4", "int8 only"});
  expect_qat_error("  weights: int8\n  layers: [mlp, lm_head]\n",
                   {"t.yaml", "qat.layers (line 17)", "'lm_head'", "not built yet"});
  expect_qat_error("  weights: int8\n  layers: [embedding]\n", {"'embedding'", "not built yet"});
  expect_qat_error("  weights: int8\n  layers: []\n", {"t.yaml", "qat.layers", "is empty"});
  expect_qat_error("  weights: int8\n  start_step: 10\n",
                   {"t.yaml", "qat.start_step = 10 (line 17)", "train.steps = 10", "never begin"});
  expect_qat_error(
      "  weights: int4\n",
      {"t.yaml", "qat.weights = int4", "precision.compute = fp8", "compute bf16, fp16 or fp32"},
      "precision:\n  compute: fp8\n");
  expect_qat_error("  weights: int8\n  activations: int4\n", {"qat.activations", "'int4'"});
}

}  // namespace
}  // namespace tessera::testing
