// The `moe` section: defaults and derived widths, the MoE layer pattern, the capacity, the
// router kept in FP32, and the errors (fields without experts, top-k, layer pattern, ep).
#include <gtest/gtest.h>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera::testing {
namespace {

// kBaseRecipe (model on lines 1..7, 32 wide, 2 layers, gpt2 with ffn 128) plus a moe section.
Recipe parse_moe(const std::string& moe, const std::string& extra = "") {
  return parse_recipe(std::string(kBaseRecipe) + "moe:\n" + moe + extra, "t.yaml");
}
void expect_moe_error(const std::string& moe, const std::vector<std::string>& fragments,
                      const std::string& extra = "") {
  expect_user_error([&] { parse_moe(moe, extra); }, fragments);
}

TEST(RecipeMoe, DenseByDefault) {
  const Recipe r = parse_recipe(kBaseRecipe, "t.yaml");
  EXPECT_FALSE(r.moe.enabled());
  EXPECT_FALSE(r.model.moe.enabled());
  EXPECT_EQ(recipe_to_yaml(r).find("topk"), std::string::npos);  // not applicable: left out
}

TEST(RecipeMoe, DefaultsDerivedWidthsAndTheModelCopy) {
  const Recipe r = parse_moe("  num_experts: 4\n");
  EXPECT_EQ(r.moe.topk, 2);
  EXPECT_EQ(r.moe.ffn_hidden, 128);  // model.ffn_hidden (gpt2: 4 x 32)
  EXPECT_EQ(r.moe.shared_ffn_hidden, 128);
  EXPECT_TRUE(r.moe.norm_topk_prob);
  EXPECT_EQ(r.model.moe, r.moe);
  EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
}

TEST(RecipeMoe, LayerPattern) {
  MoeConfig m;
  m.num_experts = 8;
  m.first_dense_layers = 1;
  m.every = 2;
  EXPECT_FALSE(m.is_moe_layer(0));
  EXPECT_TRUE(m.is_moe_layer(1));
  EXPECT_FALSE(m.is_moe_layer(2));
  EXPECT_TRUE(m.is_moe_layer(3));
  EXPECT_EQ(m.num_moe_layers(6), 3);
  m.num_experts = 0;
  EXPECT_FALSE(m.is_moe_layer(1));
}

TEST(RecipeMoe, CapacityIsGShardsCeiling) {
  MoeConfig m;
  m.num_experts = 8;
  m.topk = 2;
  EXPECT_EQ(m.capacity(100), 0);  // dropless
  m.capacity_factor = 1.0f;
  EXPECT_EQ(m.capacity(100), 25);  // 100 * 2 / 8
  m.capacity_factor = 1.25f;
  EXPECT_EQ(m.capacity(100), 32);  // ceil(31.25)
  m.capacity_factor = 0.01f;
  EXPECT_EQ(m.capacity(3), 1);  // at least one slot
}

TEST(RecipeMoe, RouterRunsInFp32AndTheResolvedListSaysSo) {
  const std::string bf16 = "precision:\n  compute: bf16\n";
  const Recipe r = parse_moe("  num_experts: 4\n", bf16);
  EXPECT_TRUE(r.precision.keeps_high_precision(HighPrecisionLayer::router));
  EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
  const Recipe listed =
      parse_moe("  num_experts: 4\n", bf16 + "  high_precision: [router, lm_head]\n");
  EXPECT_EQ(listed.precision.high_precision.size(), 2u);
  EXPECT_TRUE(parse_moe("  num_experts: 4\n").precision.high_precision.empty());  // fp32
}

TEST(RecipeMoe, FieldsWithoutExpertsAreErrors) {
  expect_moe_error("  topk: 2\n", {"t.yaml", "moe.topk is given (line 16)", "moe.num_experts = 0",
                                   "moe.num_experts > 0"});
  expect_moe_error("  num_experts: 0\n  capacity_factor: 1.0\n",
                   {"moe.capacity_factor is given", "moe.num_experts > 0"});
}

TEST(RecipeMoe, BadValues) {
  expect_moe_error("  num_experts: 4\n  topk: 5\n",
                   {"t.yaml", "moe.topk = 5 (line 17)", "moe.num_experts = 4 (line 16)"});
  expect_moe_error("  num_experts: 4\n  topk: 0\n", {"t.yaml:17", "moe.topk", "'0'"});
  expect_moe_error("  num_experts: -1\n", {"t.yaml:16", "moe.num_experts", "'-1'"});
  expect_moe_error("  num_experts: 4\n  capacity_factor: -0.5\n",
                   {"t.yaml:17", "moe.capacity_factor", "'-0.5'"});
  expect_moe_error("  num_experts: 4\n  first_dense_layers: 2\n",
                   {"moe.first_dense_layers = 2 (line 17)", "leaves no MoE layer",
                    "model.num_layers = 2 (line 4)"});
  expect_moe_error("  num_experts: 4\n  every: 0\n", {"t.yaml:17", "moe.every", "'0'"});
  expect_moe_error(
      "  num_experts: 4\n  capacity_facter: 2\n",
      {"t.yaml:17", "unknown key 'moe.capacity_facter'", "did you mean 'moe.capacity_factor'"});
}

TEST(RecipeMoe, SharedExpertsSplitOverTp) {
  const std::string tp = "parallel:\n  tp: 2\n";
  const Recipe r =
      parse_moe("  num_experts: 4\n  shared_experts: 1\n  shared_ffn_hidden: 64\n", tp);
  EXPECT_EQ(r.moe.shared_ffn_hidden, 64);
  expect_moe_error("  num_experts: 4\n  shared_experts: 1\n  shared_ffn_hidden: 63\n",
                   {"moe.shared_experts x moe.shared_ffn_hidden = 63", "parallel.tp = 2"}, tp);
}

TEST(RecipeMoe, ExpertParallelismDividesDpAndTheExperts) {
  const Recipe r = parse_moe("  num_experts: 4\n", "parallel:\n  dp: 4\n  ep: 2\n");
  EXPECT_EQ(r.parallel.ep, 2);
  expect_moe_error("  num_experts: 4\n", {"t.yaml", "parallel.ep = 4", "parallel.dp = 2"},
                   "parallel:\n  dp: 2\n  ep: 4\n");
  expect_moe_error("  num_experts: 6\n", {"parallel.ep = 4", "moe.num_experts = 6"},
                   "parallel:\n  dp: 4\n  ep: 4\n");
  expect_user_error(
      [] { parse_recipe(std::string(kBaseRecipe) + "parallel:\n  dp: 2\n  ep: 2\n", "t.yaml"); },
      {"t.yaml", "parallel.ep = 2", "mixture-of-experts"});
}

TEST(RecipeMoe, ParamCountsCountExpertsAndActiveOnes) {
  Recipe r = parse_moe("  num_experts: 4\n  topk: 1\n  ffn_hidden: 16\n");
  // gpt2, C 32, V 100, Tmax 16, 2 layers, both MoE, biases: per layer norms 2 x 64, attention
  // 4 x 32 x 32 + 4 x 32 biases, router 4 x 32, experts 4 x 2 x 32 x 16 (no biases).
  const int64_t layer = 128 + 4096 + 128 + 128 + 4096;
  EXPECT_EQ(r.model.num_params(), 100 * 32 + 16 * 32 + 2 * layer + 64);
  EXPECT_EQ(r.model.num_active_params(), r.model.num_params() - 2 * 3 * 2 * 32 * 16);
}

}  // namespace
}  // namespace tessera::testing
