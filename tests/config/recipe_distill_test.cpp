// The `distill` section and its curriculum: defaults (the seed's three phases), parsing of phase
// lists with their origins, the resolved YAML round trip, the values at and around phase
// boundaries and along linear and cosine ramps, when the teacher is still needed, the hidden-state
// pairs and their weight beta (auto, explicit 0, ramps), and the errors.
#include <gtest/gtest.h>

#include <cmath>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera::testing {
namespace {

// kBaseRecipe (train.steps 10, lines 12..14) plus a distill section.
Recipe parse_distill(const std::string& distill, const std::string& extra = "") {
  return parse_recipe(std::string(kBaseRecipe) + extra + "distill:\n" + distill, "t.yaml");
}
void expect_distill_error(const std::string& distill, const std::vector<std::string>& fragments,
                          const std::string& extra = "") {
  expect_user_error([&] { parse_distill(distill, extra); }, fragments);
}

DistillConfig with_phases(const Curriculum& c) {
  DistillConfig d;
  d.teacher = std::string("t");  // not = "t": GCC 12 warns falsely (-Wrestrict) on that here
  d.curriculum = c;
  return d;
}

TEST(RecipeDistill, OffByDefaultAndEmittedAsOneKey) {
  const Recipe r = parse_recipe(kBaseRecipe, "t.yaml");
  EXPECT_FALSE(r.distill.enabled());
  const std::string yaml = recipe_to_yaml(r);
  EXPECT_NE(yaml.find("distill:\n  teacher: \"\""), std::string::npos) << yaml;
  EXPECT_EQ(yaml.find("curriculum"), std::string::npos);  // not applicable: left out
  EXPECT_EQ(parse_recipe(yaml, "t.yaml"), r);
}

TEST(RecipeDistill, DefaultsAreTheSeedCurriculum) {
  const Recipe r = parse_distill("  teacher: runs/teacher\n");
  const DistillConfig& d = r.distill;
  EXPECT_EQ(d.teacher_precision, TeacherPrecision::bf16);
  EXPECT_EQ(d.temperature, 2.0f);
  EXPECT_FALSE(d.reverse_kl);
  ASSERT_EQ(d.curriculum.size(), 3u);
  EXPECT_EQ(curriculum_ends(d, 9), (std::vector<int64_t>{3, 6, 9}));
  const float alphas[] = {1.0f, 1.0f, 1.0f, 0.7f, 0.7f, 0.7f, 0.0f, 0.0f, 0.0f};
  for (int64_t s = 0; s < 9; ++s) {
    EXPECT_EQ(curriculum_at(d, s, 9).alpha, alphas[s]) << "step " << s;
    EXPECT_EQ(curriculum_at(d, s, 9).temperature, 2.0f);
  }
  EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
}

TEST(RecipeDistill, PhasesParseAndRoundTrip) {
  const Recipe r = parse_distill(
      "  teacher: runs/teacher\n"
      "  teacher_precision: fp32\n"
      "  reverse_kl: true\n"
      "  temperature: 4\n"
      "  curriculum:\n"
      "    - {end_step: 4, alpha: 0.9, temperature: 1.5}\n"
      "    - {end_fraction: 0.8, alpha: 0.5, ramp: cosine, ramp_steps: 2}\n"
      "    - {alpha: 0.1, temperature: auto}\n");
  const DistillConfig& d = r.distill;
  EXPECT_EQ(d.teacher_precision, TeacherPrecision::fp32);
  EXPECT_TRUE(d.reverse_kl);
  ASSERT_EQ(d.curriculum.size(), 3u);
  EXPECT_EQ(d.curriculum[1].ramp, CurriculumRamp::cosine);
  EXPECT_EQ(d.curriculum[2].temperature, 0.0f);  // auto: distill.temperature
  EXPECT_EQ(curriculum_ends(d, 10), (std::vector<int64_t>{4, 8, 10}));
  EXPECT_EQ(curriculum_at(d, 9, 10), (DistillWeights{0.1f, 4.0f}));
  const std::string yaml = recipe_to_yaml(r);
  // Each phase lists the fields that differ from a phase's defaults.
  EXPECT_NE(yaml.find("{end_fraction: 0.8, alpha: 0.5, ramp: cosine, ramp_steps: 2}"),
            std::string::npos)
      << yaml;
  EXPECT_EQ(parse_recipe(yaml, "t.yaml"), r);
  // An override replaces the whole list.
  const Recipe o = parse_recipe(std::string(kBaseRecipe) + "distill:\n  teacher: x\n", "t.yaml",
                                {"distill.curriculum=[{alpha: 0.5}]"});
  ASSERT_EQ(o.distill.curriculum.size(), 1u);
  EXPECT_EQ(curriculum_at(o.distill, 7, 10).alpha, 0.5f);
}

TEST(Curriculum, BoundariesAreExclusiveEnds) {
  CurriculumPhase a, b, c;
  a.end_step = 2;
  a.alpha = 1.0f;
  b.end_step = 5;
  b.alpha = 0.5f;
  b.temperature = 3.0f;
  c.alpha = 0.0f;
  const DistillConfig d = with_phases({a, b, c});
  EXPECT_EQ(curriculum_at(d, 1, 8).alpha, 1.0f);
  EXPECT_EQ(curriculum_at(d, 2, 8), (DistillWeights{0.5f, 3.0f}));
  EXPECT_EQ(curriculum_at(d, 4, 8).alpha, 0.5f);
  EXPECT_EQ(curriculum_at(d, 5, 8), (DistillWeights{0.0f, 2.0f}));
  EXPECT_EQ(curriculum_at(d, 100, 8).alpha, 0.0f);  // past the end: the last phase holds
}

TEST(Curriculum, LinearAndCosineRampsStartFromThePreviousPhase) {
  CurriculumPhase a, b;
  a.end_step = 4;
  a.alpha = 1.0f;
  a.temperature = 1.0f;
  b.alpha = 0.0f;
  b.temperature = 5.0f;
  b.ramp = CurriculumRamp::linear;
  b.ramp_steps = 4;
  DistillConfig d = with_phases({a, b});
  const float want_alpha[] = {1.0f, 0.75f, 0.5f, 0.25f, 0.0f, 0.0f};
  for (int i = 0; i < 6; ++i) {
    const DistillWeights w = curriculum_at(d, 4 + i, 20);
    EXPECT_FLOAT_EQ(w.alpha, want_alpha[i]) << "step " << 4 + i;
    EXPECT_FLOAT_EQ(w.temperature, 1.0f + 4.0f * (1.0f - want_alpha[i])) << "step " << 4 + i;
  }
  d.curriculum[1].ramp = CurriculumRamp::cosine;
  EXPECT_FLOAT_EQ(curriculum_at(d, 4, 20).alpha, 1.0f);
  EXPECT_NEAR(curriculum_at(d, 5, 20).alpha, 0.5 + 0.5 * std::cos(M_PI / 4), 1e-6);
  EXPECT_NEAR(curriculum_at(d, 6, 20).alpha, 0.5, 1e-6);
  EXPECT_EQ(curriculum_at(d, 8, 20).alpha, 0.0f);
}

TEST(Curriculum, TeacherNeededWhileSomeLaterStepHasAlpha) {
  DistillConfig d = with_phases(default_curriculum());
  EXPECT_TRUE(teacher_needed_from(d, 0, 9));
  EXPECT_TRUE(teacher_needed_from(d, 5, 9));
  EXPECT_FALSE(teacher_needed_from(d, 6, 9));
  // A ramp down to 0 still needs it until the ramp ends.
  d.curriculum[2].ramp = CurriculumRamp::linear;
  d.curriculum[2].ramp_steps = 2;
  EXPECT_TRUE(teacher_needed_from(d, 7, 9));
  EXPECT_FALSE(teacher_needed_from(d, 8, 9));
  // A later phase with alpha > 0 keeps it through a phase with 0.
  CurriculumPhase off, on;
  off.end_step = 3;
  off.alpha = 0.0f;
  on.alpha = 0.2f;
  EXPECT_TRUE(teacher_needed_from(with_phases({off, on}), 0, 9));
  EXPECT_FALSE(teacher_needed_from(DistillConfig{}, 0, 9));  // no teacher at all
}

TEST(RecipeDistill, HiddenPairsAndTheirWeightParseAndRoundTrip) {
  // Without pairs: beta is 0 in every phase, and the resolved YAML lists no hidden_weight.
  const Recipe none = parse_distill("  teacher: runs/teacher\n");
  EXPECT_TRUE(none.distill.hidden_pairs.empty());
  EXPECT_FALSE(none.distill.has_hidden_loss());
  EXPECT_EQ(curriculum_at(none.distill, 0, 10).hidden_weight, 0.0f);
  const std::string none_yaml = recipe_to_yaml(none);
  EXPECT_NE(none_yaml.find("  hidden_pairs: []\n"), std::string::npos) << none_yaml;
  EXPECT_EQ(none_yaml.find("hidden_weight"), std::string::npos) << none_yaml;
  EXPECT_EQ(parse_recipe(none_yaml, "t.yaml"), none);

  const Recipe r = parse_distill(
      "  teacher: runs/teacher\n"
      "  hidden_pairs: [{student: 1, teacher: 2}, {student: 2, teacher: 4}]\n"
      "  hidden_weight: 0.5\n"
      "  curriculum:\n"
      "    - {end_step: 4, alpha: 1}\n"
      "    - {end_step: 8, alpha: 0.5, hidden_weight: 2}\n"
      "    - {alpha: 0, hidden_weight: 0, ramp: linear, ramp_steps: 2}\n");
  const DistillConfig& d = r.distill;
  ASSERT_EQ(d.hidden_pairs.size(), 2u);
  EXPECT_EQ(d.hidden_pairs[1].student, 2);
  EXPECT_EQ(d.hidden_pairs[1].teacher, 4);
  EXPECT_TRUE(d.has_hidden_loss());
  EXPECT_EQ(d.curriculum[0].hidden_weight, -1.0f);  // auto: distill.hidden_weight
  EXPECT_EQ(curriculum_at(d, 0, 10), (DistillWeights{1.0f, 2.0f, 0.5f}));
  EXPECT_EQ(curriculum_at(d, 4, 10), (DistillWeights{0.5f, 2.0f, 2.0f}));
  // The last phase ramps alpha and beta down together; an explicit 0 is not auto.
  EXPECT_EQ(curriculum_at(d, 8, 10), (DistillWeights{0.5f, 2.0f, 2.0f}));
  EXPECT_EQ(curriculum_at(d, 9, 10), (DistillWeights{0.25f, 2.0f, 1.0f}));
  EXPECT_EQ(curriculum_at(d, 10, 10), (DistillWeights{0.0f, 2.0f, 0.0f}));
  const std::string yaml = recipe_to_yaml(r);
  EXPECT_NE(yaml.find("hidden_pairs: [{student: 1, teacher: 2}, {student: 2, teacher: 4}]"),
            std::string::npos)
      << yaml;
  EXPECT_NE(yaml.find("{alpha: 0, ramp: linear, ramp_steps: 2, hidden_weight: 0}"),
            std::string::npos)
      << yaml;
  EXPECT_EQ(parse_recipe(yaml, "t.yaml"), r);
  // `auto` reads as the default, and an override replaces the pair list.
  const Recipe o = parse_recipe(std::string(kBaseRecipe) + "distill:\n  teacher: x\n", "t.yaml",
                                {"distill.hidden_pairs=[{student: 2, teacher: 1}]",
                                 "distill.curriculum=[{alpha: 0.5, hidden_weight: auto}]"});
  ASSERT_EQ(o.distill.hidden_pairs.size(), 1u);
  EXPECT_EQ(curriculum_at(o.distill, 3, 10), (DistillWeights{0.5f, 2.0f, 1.0f}));
}

TEST(Curriculum, TeacherNeededWhileSomeLaterStepHasAlphaOrBeta) {
  CurriculumPhase soft, hard;
  soft.end_step = 4;
  soft.alpha = 1.0f;
  hard.alpha = 0.0f;
  DistillConfig d = with_phases({soft, hard});
  EXPECT_FALSE(teacher_needed_from(d, 4, 9));
  // With hidden pairs, the hard phase's auto beta (distill.hidden_weight 1) keeps the teacher...
  d.hidden_pairs.push_back(DistillHiddenPair{2, 4});
  EXPECT_TRUE(teacher_needed_from(d, 4, 9));
  EXPECT_TRUE(teacher_needed_from(d, 8, 9));
  // ... a beta of 0 there frees it, after a ramp down has run its course.
  d.curriculum[1].hidden_weight = 0.0f;
  EXPECT_FALSE(teacher_needed_from(d, 4, 9));
  d.curriculum[1].ramp = CurriculumRamp::cosine;
  d.curriculum[1].ramp_steps = 3;
  EXPECT_TRUE(teacher_needed_from(d, 6, 9));
  EXPECT_FALSE(teacher_needed_from(d, 7, 9));
  // distill.hidden_weight 0 makes auto phases 0 too.
  d.curriculum[1] = hard;
  d.hidden_weight = 0.0f;
  EXPECT_FALSE(teacher_needed_from(d, 4, 9));
  // A phase with alpha 0 and beta > 0 needs it (hidden loss alone).
  CurriculumPhase hidden_only;
  hidden_only.alpha = 0.0f;
  hidden_only.hidden_weight = 0.3f;
  EXPECT_FALSE(teacher_needed_from(with_phases({hidden_only}), 0, 9));  // no pairs: beta 0
  DistillConfig h = with_phases({hidden_only});
  h.hidden_pairs.push_back(DistillHiddenPair{1, 1});
  EXPECT_TRUE(teacher_needed_from(h, 0, 9));
  EXPECT_EQ(curriculum_at(h, 5, 9), (DistillWeights{0.0f, 2.0f, 0.3f}));
}

TEST(RecipeDistill, HiddenPairErrors) {
  expect_distill_error("  teacher: t\n  hidden_pairs: [{student: 3, teacher: 1}]\n",
                       {"t.yaml", "distill.hidden_pairs[0].student = 3",
                        "past the student's last block", "model.num_layers = 2 (line 4)"});
  expect_distill_error("  teacher: t\n  hidden_pairs: [{student: 0, teacher: 1}]\n",
                       {"distill.hidden_pairs[0].student", "0"});
  expect_distill_error("  teacher: t\n  hidden_pairs: [{student: 1}]\n",
                       {"distill.hidden_pairs[0].teacher is required"});
  expect_distill_error("  teacher: t\n  hidden_pairs: [{student: 1, teacher: 2, layer: 3}]\n",
                       {"distill.hidden_pairs[0].layer"});
  expect_distill_error("  teacher: t\n  hidden_pairs: {student: 1, teacher: 2}\n",
                       {"distill.hidden_pairs", "expected a list of mappings"});
  expect_distill_error(
      "  teacher: t\n  hidden_pairs: [{student: 1, teacher: 2}, {student: 2, teacher: 2}, "
      "{student: 1, teacher: 2}]\n",
      {"distill.hidden_pairs[2]", "repeats distill.hidden_pairs[0] = {student: 1, teacher: 2}"});
  expect_distill_error(
      "  teacher: t\n  hidden_pairs: [{student: 1, teacher: 2}]\n  hidden_weight: -1\n",
      {"distill.hidden_weight", "-1"});
  expect_distill_error(
      "  teacher: t\n  hidden_pairs: [{student: 1, teacher: 2}]\n  curriculum: [{hidden_weight: "
      "-0.5}]\n",
      {"distill.curriculum[0].hidden_weight", "-0.5"});
  // Weights of a loss that is not there.
  expect_distill_error("  teacher: t\n  hidden_weight: 2\n",
                       {"distill.hidden_weight is given", "distill.hidden_pairs = []",
                        "only when distill.hidden_pairs is given"});
  expect_distill_error(
      "  teacher: t\n  curriculum: [{end_step: 5}, {alpha: 0, hidden_weight: 0}]\n",
      {"distill.curriculum[1].hidden_weight is given", "hidden_pairs is empty"});
  expect_distill_error(
      "  hidden_pairs: [{student: 1, teacher: 2}]\n",
      {"distill.hidden_pairs", "only when distill.teacher or distill.teacher_cache is set"});
}

TEST(RecipeDistill, Fp8TeacherParsesAndRoundTrips) {
  // Beside any student precision; the teacher's scaling knobs are precision.fp8's (defaults
  // unless the student is FP8), so the section adds none.
  for (const char* compute : {"fp32", "bf16", "fp8"}) {
    SCOPED_TRACE(compute);
    const Recipe r = parse_distill("  teacher: runs/teacher\n  teacher_precision: fp8\n",
                                   std::string("precision:\n  compute: ") + compute + "\n");
    EXPECT_EQ(r.distill.teacher_precision, TeacherPrecision::fp8);
    EXPECT_EQ(parse_recipe(recipe_to_yaml(r), "t.yaml"), r);
  }
  expect_distill_error("  teacher: t\n  teacher_precision: fp16\n",
                       {"distill.teacher_precision", "fp16"});
}

TEST(RecipeDistill, Errors) {
  expect_distill_error(
      "  temperature: 3\n",
      {"distill.temperature", "only when distill.teacher or distill.teacher_cache is set"});
  expect_distill_error("  teacher: t\n  teacher_cache: c.h5\n",
                       {"distill.teacher = t", "distill.teacher_cache = c.h5", "give one teacher"});
  expect_distill_error("  teacher_cache: c.h5\n  hidden_pairs: [{student: 1, teacher: 1}]\n",
                       {"distill.hidden_pairs", "needs the online teacher"});
  expect_distill_error("  teacher: t\n  curriculum: []\n",
                       {"distill.curriculum", "non-empty list"});
  expect_distill_error("  teacher: t\n  curriculum: [{alpha: 1.5}]\n",
                       {"distill.curriculum[0].alpha", "1.5"});
  expect_distill_error("  teacher: t\n  curriculum: [{alpha: 1, bogus: 2}]\n",
                       {"distill.curriculum[0].bogus"});
  expect_distill_error("  teacher: t\n  curriculum: [{alpha: 1}, {alpha: 0}]\n",
                       {"distill.curriculum[0] needs end_step or end_fraction"});
  expect_distill_error("  teacher: t\n  curriculum: [{end_step: 5, alpha: 1}, {end_step: 5}]\n",
                       {"distill.curriculum[1] ends at step 5", "in order"});
  expect_distill_error("  teacher: t\n  curriculum: [{end_step: 11, alpha: 1}, {alpha: 0}]\n",
                       {"distill.curriculum[0] ends at step 11", "train.steps = 10"});
  expect_distill_error("  teacher: t\n  curriculum: [{end_step: 2, end_fraction: 0.5}, {}]\n",
                       {"end_step = 2", "end_fraction = 0.5", "one end"});
  expect_distill_error("  teacher: t\n  curriculum: [{alpha: 1, ramp: linear, ramp_steps: 2}]\n",
                       {"distill.curriculum[0].ramp = linear", "first phase"});
  expect_distill_error(
      "  teacher: t\n  curriculum: [{end_step: 5}, {alpha: 0, ramp: cosine, ramp_steps: 6}]\n",
      {"distill.curriculum[1].ramp_steps = 6", "1 to 5 steps"});
  expect_distill_error("  teacher: t\n  curriculum: [{end_step: 5}, {alpha: 0, ramp_steps: 3}]\n",
                       {"ramp_steps = 3", "choose ramp linear or cosine"});
}

}  // namespace
}  // namespace tessera::testing
