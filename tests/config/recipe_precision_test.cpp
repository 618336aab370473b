// The precision section: defaults, high_precision, the fp16 loss_scale and fp8 sub-sections, their
// round trip through recipe_to_yaml, and every user error (bad values, unknown keys, a
// sub-section given with the wrong compute dtype, min/initial/max out of order).
#include <gtest/gtest.h>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::kBaseRecipe;

// The base recipe (14 lines) followed by a precision section starting at line 15.
std::string with_precision(const std::string& section) {
  return std::string(kBaseRecipe) + "precision:\n" + section;
}

Recipe parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return parse_recipe(text, "t.yaml", overrides);
}

void expect_error(const std::string& section, const std::vector<std::string>& fragments) {
  SCOPED_TRACE(section);
  expect_user_error([&] { parse(with_precision(section)); }, fragments);
}

// Parses, writes back, parses again: both equal, and the text is a fixed point.
void expect_round_trip(const Recipe& r) {
  const std::string yaml = recipe_to_yaml(r);
  const Recipe back = parse_recipe(yaml, r.file);
  EXPECT_EQ(back, r) << yaml;
  EXPECT_EQ(recipe_to_yaml(back), yaml);
}

TEST(RecipePrecision, Defaults) {
  const Recipe r = parse(kBaseRecipe);
  EXPECT_EQ(r.precision.compute, Compute::fp32);
  EXPECT_TRUE(r.precision.high_precision.empty());
  const LossScalerConfig& ls = r.precision.loss_scale;
  EXPECT_EQ(ls.initial, 65536.0f);
  EXPECT_EQ(ls.growth_factor, 2.0f);
  EXPECT_EQ(ls.backoff_factor, 0.5f);
  EXPECT_EQ(ls.growth_interval, 1000);
  EXPECT_EQ(ls.hysteresis, 2);
  EXPECT_EQ(ls.min, 1.0f);
  EXPECT_EQ(ls.max, 16777216.0f);
  EXPECT_EQ(ls.max_overflows_at_min, 10);
  EXPECT_EQ(r.precision.fp8.amax_history_len, 1024);
  EXPECT_EQ(r.precision.fp8.amax_compute, AmaxCompute::max);
  EXPECT_EQ(r.precision.fp8.margin, 0);
  // fp8 keeps no layer wide unless the recipe says so.
  EXPECT_TRUE(parse(with_precision("  compute: fp8\n")).precision.high_precision.empty());
}

TEST(RecipePrecision, Fp16LossScaleSection) {
  const Recipe r = parse(with_precision(R"(  compute: fp16
  loss_scale:
    initial: 1024
    growth_factor: 1.5
    backoff_factor: 0.25
    growth_interval: 200
    hysteresis: 3
    min: 0.5
    max: 4096
    max_overflows_at_min: 4
)"));
  const LossScalerConfig& ls = r.precision.loss_scale;
  EXPECT_EQ(ls, (LossScalerConfig{1024.0f, 1.5f, 0.25f, 200, 3, 0.5f, 4096.0f, 4}));
  expect_round_trip(r);
}

TEST(RecipePrecision, PartialLossScaleKeepsTheOtherDefaults) {
  const Recipe r = parse(with_precision("  loss_scale:\n    hysteresis: 1\n  compute: fp16\n"));
  LossScalerConfig expected;
  expected.hysteresis = 1;
  EXPECT_EQ(r.precision.loss_scale, expected);
  // An empty section is all defaults.
  EXPECT_EQ(parse(with_precision("  compute: fp16\n  loss_scale:\n")).precision.loss_scale,
            LossScalerConfig{});
}

TEST(RecipePrecision, Fp8Section) {
  const Recipe r = parse(with_precision(R"(  compute: fp8
  high_precision: [lm_head, embedding]
  fp8:
    amax_history_len: 16
    amax_compute: most_recent
    margin: 2
)"));
  EXPECT_EQ(r.precision.fp8, (Fp8Config{16, AmaxCompute::most_recent, 2}));
  EXPECT_EQ(r.precision.high_precision,
            (std::vector<HighPrecisionLayer>{HighPrecisionLayer::lm_head,
                                             HighPrecisionLayer::embedding}));
  expect_round_trip(r);
}

TEST(RecipePrecision, HighPrecisionLayers) {
  const Recipe r = parse(with_precision("  compute: bf16\n  high_precision: [lm_head]\n"));
  EXPECT_TRUE(r.precision.keeps_high_precision(HighPrecisionLayer::lm_head));
  EXPECT_FALSE(r.precision.keeps_high_precision(HighPrecisionLayer::embedding));
  expect_round_trip(r);
  EXPECT_TRUE(parse(with_precision("  compute: bf16\n  high_precision: []\n"))
                  .precision.high_precision.empty());
}

TEST(RecipePrecision, ResolvedYamlHasTheSubSectionOfItsComputeDtypeOnly) {
  const std::string fp16 = recipe_to_yaml(parse(kBaseRecipe, {"precision.compute=fp16"}));
  EXPECT_NE(fp16.find("precision:\n  compute: fp16\n  high_precision: []\n  grad_reduce: fp32\n"
                      "  loss_scale:\n    initial: 65536\n"),
            std::string::npos)
      << fp16;
  EXPECT_NE(fp16.find("    max_overflows_at_min: 10\noptim:\n"), std::string::npos) << fp16;
  EXPECT_EQ(fp16.find("fp8:"), std::string::npos) << fp16;
  const std::string fp8 = recipe_to_yaml(parse(kBaseRecipe, {"precision.compute=fp8"}));
  EXPECT_NE(fp8.find("  fp8:\n    amax_history_len: 1024\n    amax_compute: max\n"
                     "    margin: 0\noptim:\n"),
            std::string::npos)
      << fp8;
  EXPECT_EQ(fp8.find("loss_scale:"), std::string::npos) << fp8;
  for (const char* compute : {"fp32", "bf16"}) {
    const Recipe r = parse(kBaseRecipe, {fmt::format("precision.compute={}", compute)});
    const std::string yaml = recipe_to_yaml(r);
    EXPECT_EQ(yaml.find("loss_scale:"), std::string::npos) << yaml;
    EXPECT_EQ(yaml.find("fp8:"), std::string::npos) << yaml;
    expect_round_trip(r);
  }
}

TEST(RecipePrecision, OverridesSetTheSubSectionsAsMappings) {
  const Recipe r =
      parse(kBaseRecipe, {"precision.compute=fp16", "precision.loss_scale={initial: 256, max: 512}",
                          "precision.high_precision=[embedding]"});
  EXPECT_EQ(r.precision.loss_scale.initial, 256.0f);
  EXPECT_EQ(r.precision.loss_scale.max, 512.0f);
  EXPECT_EQ(r.precision.loss_scale.hysteresis, 2);
  EXPECT_EQ(r.precision.high_precision,
            std::vector<HighPrecisionLayer>{HighPrecisionLayer::embedding});
  expect_round_trip(r);
  // Errors inside an overridden mapping name the override.
  expect_user_error(
      [&] {
        parse(kBaseRecipe, {"precision.compute=fp16", "precision.loss_scale={hysteresis: 0}"});
      },
      {"--set precision.loss_scale={hysteresis: 0}", "precision.loss_scale.hysteresis", "'0'"});
}

TEST(RecipePrecision, BadLossScaleValues) {
  const std::string fp16 = "  compute: fp16\n  loss_scale:\n";
  struct Case {
    const char* line;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases = {
      {"initial: 0", {"precision.loss_scale.initial", "'0'", "positive number"}},
      {"initial: -8", {"precision.loss_scale.initial", "'-8'", "positive number"}},
      {"initial: big", {"precision.loss_scale.initial", "'big'"}},
      {"initial: 1e39", {"precision.loss_scale.initial", "'1e39'"}},  // beyond float
      {"growth_factor: 1", {"precision.loss_scale.growth_factor", "'1'", "> 1"}},
      {"growth_factor: 0.5", {"precision.loss_scale.growth_factor", "'0.5'", "> 1"}},
      {"backoff_factor: 0", {"precision.loss_scale.backoff_factor", "'0'", "(0, 1)"}},
      {"backoff_factor: 1", {"precision.loss_scale.backoff_factor", "'1'", "(0, 1)"}},
      {"backoff_factor: 2", {"precision.loss_scale.backoff_factor", "'2'", "(0, 1)"}},
      {"growth_interval: 0", {"precision.loss_scale.growth_interval", "'0'", "positive"}},
      {"growth_interval: 2.5", {"precision.loss_scale.growth_interval", "'2.5'", "integer"}},
      {"hysteresis: 0", {"precision.loss_scale.hysteresis", "'0'", "positive"}},
      {"min: 0", {"precision.loss_scale.min", "'0'", "positive number"}},
      {"max: -1", {"precision.loss_scale.max", "'-1'", "positive number"}},
      {"max_overflows_at_min: 0", {"precision.loss_scale.max_overflows_at_min", "'0'"}},
      {"intial: 5",
       {"t.yaml:18", "unknown key 'precision.loss_scale.intial'",
        "did you mean 'precision.loss_scale.initial'", "hysteresis"}},
  };
  for (const Case& c : cases) {
    std::vector<std::string> fragments = c.fragments;
    fragments.push_back("t.yaml:18");  // the value's own line
    expect_error(fp16 + "    " + c.line + "\n", fragments);
  }
  expect_error("  compute: fp16\n  loss_scale: 1024\n",
               {"t.yaml:17", "'precision.loss_scale' must be a mapping", "1024"});
}

TEST(RecipePrecision, BadFp8Values) {
  const std::string fp8 = "  compute: fp8\n  fp8:\n";
  expect_error(fp8 + "    amax_history_len: 0\n",
               {"t.yaml:18", "precision.fp8.amax_history_len", "'0'", "positive"});
  expect_error(fp8 + "    amax_compute: mean\n",
               {"t.yaml:18", "precision.fp8.amax_compute", "'mean'", "max", "most_recent"});
  expect_error(fp8 + "    margin: -1\n", {"t.yaml:18", "precision.fp8.margin", "'-1'"});
  expect_error(fp8 + "    margin: 0.5\n", {"t.yaml:18", "precision.fp8.margin", "'0.5'"});
  expect_error(fp8 + "    margin: 65\n", {"t.yaml:18", "precision.fp8.margin", "'65'"});
  EXPECT_EQ(parse(with_precision(fp8 + "    margin: 64\n")).precision.fp8.margin, 64);
  expect_error(fp8 + "    history: 4\n",
               {"t.yaml:18", "unknown key 'precision.fp8.history'", "amax_history_len"});
}

TEST(RecipePrecision, BadHighPrecisionLists) {
  expect_error("  compute: bf16\n  high_precision: [embedding, router]\n",
               {"t.yaml", "precision.high_precision = [embedding, router]",
                "'router' belongs to MoE layers", "moe.num_experts is 0"});
  expect_error("  compute: bf16\n  high_precision: [attention]\n",
               {"t.yaml:17", "precision.high_precision[0]", "'attention'", "embedding", "lm_head"});
  expect_error("  compute: bf16\n  high_precision: [lm_head, lm_head]\n",
               {"precision.high_precision", "'lm_head' is listed twice"});
  expect_error("  compute: bf16\n  high_precision: lm_head\n",
               {"precision.high_precision", "a list"});
  expect_error("  high_precision: [embedding]\n",
               {"precision.high_precision = [embedding] (line 16)", "no effect",
                "precision.compute = fp32 (default)"});
}

TEST(RecipePrecision, SubSectionsOnlyWithTheirComputeDtype) {
  for (const char* compute : {"fp32", "bf16", "fp8"}) {
    expect_error(fmt::format("  compute: {}\n  loss_scale:\n    initial: 8\n", compute),
                 {"precision.loss_scale is given (line 17)",
                  fmt::format("precision.compute = {} (line 16)", compute), "fp16"});
  }
  for (const char* compute : {"fp32", "bf16", "fp16"}) {
    expect_error(fmt::format("  compute: {}\n  fp8:\n    margin: 1\n", compute),
                 {"precision.fp8 is given (line 17)",
                  fmt::format("precision.compute = {} (line 16)", compute)});
  }
  // The default compute (fp32) and a --set that changes compute away from fp16 are named too.
  expect_error("  loss_scale: {}\n",
               {"precision.loss_scale is given (line 16)", "precision.compute = fp32 (default)"});
  expect_user_error(
      [&] {
        parse(with_precision("  compute: fp16\n  loss_scale: {min: 2}\n"),
              {"precision.compute=bf16"});
      },
      {"precision.compute = bf16 (--set precision.compute=bf16)"});
}

TEST(RecipePrecision, LossScaleBoundsOutOfOrderNameBothFields) {
  expect_error("  compute: fp16\n  loss_scale:\n    initial: 4\n    min: 8\n",
               {"t.yaml", "precision.loss_scale.min = 8 (line 19)",
                "precision.loss_scale.initial = 4 (line 18)"});
  expect_error("  compute: fp16\n  loss_scale:\n    max: 1024\n",
               {"precision.loss_scale.max = 1024 (line 18)",
                "precision.loss_scale.initial = 65536 (default)"});
  // Equal bounds are allowed (a constant scale).
  const Recipe r =
      parse(with_precision("  compute: fp16\n  loss_scale: {initial: 128, min: 128, max: 128}\n"));
  EXPECT_EQ(r.precision.loss_scale.min, r.precision.loss_scale.max);
}

}  // namespace
}  // namespace tessera
