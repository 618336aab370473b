// Recipe fields for 3D parallelism and the batch terms: parallel.stage_layers, recompute_stages,
// bucket_mb, order and data.global_batch parse (from the file and from --set), round-trip through
// recipe_to_yaml, take part in equality, and bad values name key, value and file:line.
#include <gtest/gtest.h>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::kBaseRecipe;

// The base recipe (model 1..7, data 8..11, train 12..14) followed by `extra` from line 15 on.
std::string base_plus(const std::string& extra) { return std::string(kBaseRecipe) + extra; }

// The base recipe with its data section's micro_batch line (line 11) replaced by `line`.
std::string with_data_line(const std::string& line) {
  std::string text = kBaseRecipe;
  const std::string from = "  micro_batch: 2\n";
  return text.replace(text.find(from), from.size(), line.empty() ? "" : line + "\n");
}

Recipe parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return parse_recipe(text, "t.yaml", overrides);
}

void expect_round_trip(const Recipe& r) {
  const std::string yaml = recipe_to_yaml(r);
  const Recipe back = parse_recipe(yaml, r.file);
  EXPECT_EQ(back, r) << yaml;
  EXPECT_EQ(recipe_to_yaml(back), yaml);
}

TEST(RecipeParallel, DefaultsOfTheNewFields) {
  const Recipe r = parse(kBaseRecipe);
  EXPECT_TRUE(r.parallel.stage_layers.empty());
  EXPECT_TRUE(r.parallel.recompute_stages.empty());
  EXPECT_FLOAT_EQ(r.parallel.bucket_mb, 25.0f);
  EXPECT_EQ(r.parallel.bucket_bytes(), 25'000'000);
  EXPECT_EQ(r.parallel.order, RankOrder::tp_dp_pp);
  EXPECT_EQ(r.data.global_batch, 0);
  EXPECT_EQ(r.micro_batches_per_step(), 1);
  EXPECT_EQ(r.global_batch(), 2);
}

TEST(RecipeParallel, FieldsParseFromTheFile) {
  const Recipe r = parse(with_data_line("  micro_batch: 2\n  grad_accum: 3\n  global_batch: 24") +
                         "parallel:\n  dp: 2\n  pp: 2\n  microbatches: 2\n  schedule: 1f1b\n"
                         "  stage_layers: [1, 1]\n  recompute_stages: [1]\n  bucket_mb: 0.5\n"
                         "  order: dp-tp-pp\n");
  EXPECT_EQ(r.parallel.stage_layers, (std::vector<int>{1, 1}));
  EXPECT_EQ(r.parallel.recompute_stages, (std::vector<int>{1}));
  EXPECT_FLOAT_EQ(r.parallel.bucket_mb, 0.5f);
  EXPECT_EQ(r.parallel.bucket_bytes(), 500'000);
  EXPECT_EQ(r.parallel.order, RankOrder::dp_tp_pp);
  EXPECT_EQ(r.data.global_batch, 24);
  EXPECT_EQ(r.data.micro_batch, 2);
  EXPECT_EQ(r.micro_batches_per_step(), 6);  // grad_accum 3 x microbatches 2
  EXPECT_EQ(r.global_batch(), 24);           // 2 x 6 x dp 2
  EXPECT_EQ(r.tokens_per_step(), 24 * 16);
  expect_round_trip(r);
}

TEST(RecipeParallel, BlockListsParseToo) {
  const Recipe r = parse(base_plus("parallel:\n  pp: 2\n  stage_layers:\n    - 1\n    - 1\n"));
  EXPECT_EQ(r.parallel.stage_layers, (std::vector<int>{1, 1}));
}

TEST(RecipeParallel, FieldsParseFromOverrides) {
  const Recipe r = parse(kBaseRecipe, {"parallel.pp=2", "parallel.stage_layers=[1, 1]",
                                       "parallel.recompute_stages=[0,1]", "parallel.bucket_mb=4",
                                       "parallel.order=pp-dp-tp", "data.global_batch=2"});
  EXPECT_EQ(r.parallel.stage_layers, (std::vector<int>{1, 1}));
  EXPECT_EQ(r.parallel.recompute_stages, (std::vector<int>{0, 1}));
  EXPECT_FLOAT_EQ(r.parallel.bucket_mb, 4.0f);
  EXPECT_EQ(r.parallel.order, RankOrder::pp_dp_tp);
  EXPECT_EQ(r.data.global_batch, 2);
  expect_round_trip(r);
  // An empty list given explicitly is the default.
  EXPECT_EQ(parse(kBaseRecipe, {"parallel.stage_layers=[]"}), parse(kBaseRecipe));
}

TEST(RecipeParallel, EqualityIncludesEveryNewField) {
  const Recipe base = parse(kBaseRecipe);
  for (const char* o : {"parallel.pp=2", "parallel.recompute_stages=[0]", "parallel.bucket_mb=26",
                        "parallel.order=dp-tp-pp", "data.global_batch=2"}) {
    EXPECT_NE(parse(kBaseRecipe, {o}), base) << o;
  }
  Recipe r = base;
  r.parallel.stage_layers = {2};
  EXPECT_NE(r, base);
}

TEST(RecipeParallel, ResolvedYamlListsTheNewFields) {
  const Recipe r = parse(kBaseRecipe, {"parallel.pp=2", "parallel.stage_layers=[1,1]"});
  const std::string yaml = recipe_to_yaml(r);
  size_t last = 0;
  for (const char* line :
       {"parallel:", "  zero: 0\n", "  stage_layers: [1, 1]\n", "  recompute_stages: []\n",
        "  bucket_mb: 25\n", "  order: tp-dp-pp\n", "data:", "  grad_accum: 1\n",
        "  global_batch: auto\n", "  tokenizer:"}) {
    const size_t at = yaml.find(line, last);
    ASSERT_NE(at, std::string::npos) << line << " missing or out of order in\n" << yaml;
    last = at;
  }
}

TEST(RecipeParallel, GlobalBatchDerivesMicroBatch) {
  const std::string no_micro =
      with_data_line("  global_batch: 48") + "parallel:\n  dp: 2\n  microbatches: 4\n";
  const Recipe r = parse(no_micro);
  EXPECT_EQ(r.data.micro_batch, 6);  // 48 / (dp 2 x grad_accum 1 x microbatches 4)
  EXPECT_EQ(r.global_batch(), 48);
  expect_round_trip(r);
  // The layout may change under the same global batch: micro_batch follows.
  EXPECT_EQ(parse(no_micro, {"parallel.dp=4"}).data.micro_batch, 3);
  EXPECT_EQ(parse(no_micro, {"data.grad_accum=3"}).data.micro_batch, 2);
  // micro_batch 0 or `auto` is the same as leaving it out.
  EXPECT_EQ(parse(no_micro, {"data.micro_batch=0"}), r);
  EXPECT_EQ(parse(no_micro, {"data.micro_batch=auto"}), r);
  // `auto` and 0 both mean "derive the global batch".
  EXPECT_EQ(parse(kBaseRecipe, {"data.global_batch=auto"}).data.global_batch, 0);
  EXPECT_EQ(parse(kBaseRecipe, {"data.global_batch=0"}), parse(kBaseRecipe));
}

TEST(RecipeParallel, GlobalBatchErrorsNameEveryFactor) {
  const std::string no_micro =
      with_data_line("  global_batch: 50") + "parallel:\n  dp: 2\n  microbatches: 4\n";
  expect_user_error(
      [&] { parse(no_micro); },
      {"t.yaml", "global batch not divisible by dp x microbatches",
       "data.global_batch = 50 (line 11)", "parallel.dp = 2 (line 16)",
       "parallel.microbatches = 4 (line 17)", "data.grad_accum = 1 (default)", "= 8"});
  expect_user_error([&] { parse(kBaseRecipe, {"data.global_batch=3"}); },
                    {"t.yaml", "data.global_batch = 3 (--set data.global_batch=3)",
                     "data.micro_batch = 2 (line 11)", "disagrees"});
  // micro_batch 2 x dp 2 = 4 sequences, not 6.
  expect_user_error(
      [&] {
        parse(kBaseRecipe, {"data.global_batch=6", "parallel.dp=2"});
      },
      {"data.global_batch = 6", "data.micro_batch = 2", "6 / (2 x 1 x 1) = 3"});
  // Too many micro-batches per step: reported (not overflowed) even while deriving micro_batch.
  expect_user_error(
      [&] {
        parse(with_data_line("  global_batch: 4"),
              {"data.grad_accum=65536", "parallel.microbatches=65536"});
      },
      {"data.grad_accum = 65536 (--set", "parallel.microbatches = 65536 (--set", "4294967296"});
  expect_user_error([&] { parse(with_data_line("")); },
                    {"t.yaml", "data.micro_batch is required", "data.global_batch"});
  expect_user_error([&] { parse(kBaseRecipe, {"data.micro_batch=0"}); },
                    {"t.yaml", "data.micro_batch is required", "data.global_batch"});
  expect_user_error([&] { parse(kBaseRecipe, {"data.micro_batch=-1"}); },
                    {"--set data.micro_batch=-1", "'-1'", "non-negative integer or auto"});
  expect_user_error([&] { parse(with_data_line("  global_batch: -4")); },
                    {"t.yaml:11", "data.global_batch", "'-4'", "non-negative integer or auto"});
  expect_user_error([&] { parse(with_data_line("  global_batch: many")); },
                    {"t.yaml:11", "data.global_batch", "'many'"});
}

// The hang watchdog's timeout: 600 s by default, 0 turns it off, negative is an error.
TEST(RecipeParallel, TimeoutParsesAndRejectsNegative) {
  EXPECT_FLOAT_EQ(parse(kBaseRecipe).parallel.timeout_s, 600.0f);
  const Recipe r = parse(kBaseRecipe, {"parallel.timeout_s=0"});
  EXPECT_FLOAT_EQ(r.parallel.timeout_s, 0.0f);
  expect_round_trip(r);
  EXPECT_FLOAT_EQ(parse(base_plus("parallel:\n  timeout_s: 2.5\n")).parallel.timeout_s, 2.5f);
  expect_user_error([&] { parse(base_plus("parallel:\n  timeout_s: -1\n")); },
                    {"t.yaml", "parallel.timeout_s", "non-negative", "'-1'"});
  expect_user_error([&] { parse(kBaseRecipe, {"parallel.timeout_s=-1"}); },
                    {"--set parallel.timeout_s=-1", "non-negative", "'-1'"});
  expect_user_error([&] { parse(base_plus("parallel:\n  timeout_s: soon\n")); },
                    {"t.yaml", "parallel.timeout_s", "'soon'"});
}

TEST(RecipeParallel, BadListsNameKeyValueAndLine) {
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  stage_layers: 2\n")); },
                    {"t.yaml:17", "parallel.stage_layers", "a list of positive integers", "2"});
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  stage_layers: [2, 0]\n")); },
                    {"t.yaml:17", "parallel.stage_layers[1]", "'0'", "positive integer"});
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  stage_layers: [1, x]\n")); },
                    {"t.yaml:17", "parallel.stage_layers[1]", "'x'"});
  expect_user_error([&] { parse(base_plus("parallel:\n  recompute_stages: [-1]\n")); },
                    {"t.yaml:16", "parallel.recompute_stages[0]", "'-1'", "non-negative"});
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  recompute_stages: [1, 1]\n")); },
                    {"t.yaml:17", "parallel.recompute_stages", "1 is listed twice"});
  expect_user_error(
      [&] { parse(kBaseRecipe, {"parallel.stage_layers={a: 1}"}); },
      {"--set parallel.stage_layers={a: 1}", "a list of positive integers", "a mapping"});
}

TEST(RecipeParallel, BadScalarsNameKeyValueAndLine) {
  expect_user_error([&] { parse(base_plus("parallel:\n  bucket_mb: 0\n")); },
                    {"t.yaml:16", "parallel.bucket_mb", "'0'", "positive number"});
  expect_user_error([&] { parse(base_plus("parallel:\n  bucket_mb: -3\n")); },
                    {"t.yaml:16", "parallel.bucket_mb", "'-3'"});
  expect_user_error([&] { parse(base_plus("parallel:\n  bucket_mb: 1.0e-7\n")); },
                    {"t.yaml:16", "parallel.bucket_mb = 1e-07", "at least one byte"});
  expect_user_error([&] { parse(base_plus("parallel:\n  order: tp-dp\n")); },
                    {"t.yaml:16", "parallel.order", "'tp-dp'", "tp-dp-pp, tp-pp-dp"});
  expect_user_error([&] { parse(kBaseRecipe, {"parallel.order=tp-tp-pp"}); },
                    {"--set parallel.order=tp-tp-pp", "'tp-tp-pp'", "pp-dp-tp"});
}

TEST(RecipeParallel, LayoutMismatchesNameBothSidesWithLines) {
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  stage_layers: [1, 1, 1]\n")); },
                    {"t.yaml", "parallel.stage_layers = [1, 1, 1] (line 17)",
                     "parallel.pp = 2 (line 16)", "3 entries"});
  expect_user_error([&] { parse(base_plus("parallel:\n  pp: 2\n  stage_layers: [2, 1]\n")); },
                    {"t.yaml", "parallel.stage_layers = [2, 1] (line 17)", "sums to 3",
                     "model.num_layers = 2 (line 4)"});
  expect_user_error([&] { parse(base_plus("parallel:\n  recompute_stages: [1]\n")); },
                    {"t.yaml", "parallel.recompute_stages = [1] (line 16)", "stage index 1",
                     "[0, 1)", "parallel.pp = 1 (default)"});
  // tp 4 divides the 4 heads but not ffn_hidden 102.
  expect_user_error([&] { parse(base_plus("parallel:\n  tp: 4\n"), {"model.ffn_hidden=102"}); },
                    {"t.yaml", "model.ffn_hidden = 102 (--set model.ffn_hidden=102)",
                     "parallel.tp = 4 (line 16)"});
}

}  // namespace
}  // namespace tessera
