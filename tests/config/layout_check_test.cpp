// validate_layout and its helpers without MPI: every bad layout is a user error naming both
// numbers and the recipe file; the pipeline split (even and uneven), per-stage recomputation,
// the rank orders against Topology, vocabulary padding for tp, and every recipe in recipes/.
#include "config/layout_check.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <numeric>

#include "config/recipe.h"
#include "parallel/topology.h"
#include "tests/config/recipe_test_util.h"

namespace tessera {
namespace {

namespace fs = std::filesystem;
using testing::expect_user_error;
using testing::kBaseRecipe;

// The base recipe (2 layers, 4 heads, hidden 32, ffn 128, vocab 100, micro_batch 2) with 8
// layers, so pipelines up to 8 stages fit; fields are then changed directly, as a recipe built
// in code (or read from a checkpoint) could be, bypassing the parser's own checks.
Recipe base(const std::vector<std::string>& overrides = {}) {
  std::vector<std::string> all = {"model.num_layers=8"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return parse_recipe(kBaseRecipe, "t.yaml", all);
}

int world_of(const Recipe& r) { return r.parallel.dp * r.parallel.tp * r.parallel.pp; }

void expect_layout_error(const Recipe& r, const std::vector<std::string>& fragments) {
  std::vector<std::string> all = {"t.yaml"};
  all.insert(all.end(), fragments.begin(), fragments.end());
  expect_user_error([&] { validate_layout(r, world_of(r)); }, all);
}

TEST(LayoutCheck, ConsistentLayoutsPass) {
  const Recipe r = base({"parallel.dp=2", "parallel.tp=2", "parallel.pp=4",
                         "parallel.microbatches=8", "parallel.schedule=1f1b"});
  EXPECT_NO_THROW(validate_layout(r, 16));
  EXPECT_NO_THROW(validate_layout(base(), 1));
}

TEST(LayoutCheck, WorldSizeMustBeTheProductOfTheSizes) {
  const Recipe r = base({"parallel.dp=2", "parallel.tp=2", "parallel.pp=2"});
  EXPECT_NO_THROW(validate_layout(r, 8));
  for (int world : {1, 6, 7, 9, 16}) {
    const std::string w = std::to_string(world);
    expect_user_error([&] { validate_layout(r, world); },
                      {"t.yaml", "world size " + w, "mpirun -np " + w, "parallel.dp 2",
                       "parallel.tp 2", "parallel.pp 2", "= 8", "-n 8"});
  }
}

TEST(LayoutCheck, TensorParallelSplitsNameBothNumbers) {
  Recipe heads = base();
  heads.parallel.tp = 3;
  expect_layout_error(heads, {"model.num_heads = 4", "parallel.tp = 3", "attention heads"});

  Recipe kv_heads = base({"model.num_kv_heads=2"});
  kv_heads.parallel.tp = 4;
  expect_layout_error(kv_heads, {"model.num_kv_heads = 2", "parallel.tp = 4"});

  Recipe ffn = base({"parallel.tp=2"});
  ffn.model.ffn_hidden = 131;
  expect_layout_error(ffn, {"model.ffn_hidden = 131", "parallel.tp = 2", "MLP"});

  // e.g. finalize_model_vocab called without tp: 100 rows do not split over 8 ranks.
  Recipe vocab = base({"model.num_heads=8", "model.num_kv_heads=8"});
  vocab.parallel.tp = 8;
  expect_layout_error(vocab, {"model.padded_vocab_size = 100", "parallel.tp = 8"});
  vocab.model.padded_vocab_size = 0;  // auto vocabulary not finalized yet: not checked
  EXPECT_NO_THROW(validate_layout(vocab, 8));
  vocab.model.padded_vocab_size = 104;
  EXPECT_NO_THROW(validate_layout(vocab, 8));
}

TEST(LayoutCheck, PipelineSplitsNameBothNumbers) {
  Recipe few_layers = base();
  few_layers.parallel.pp = 9;
  expect_layout_error(few_layers, {"model.num_layers = 8", "parallel.pp = 9"});

  Recipe length = base({"parallel.pp=2"});
  length.parallel.stage_layers = {4, 2, 2};
  expect_layout_error(length,
                      {"parallel.stage_layers = [4, 2, 2]", "3 entries", "parallel.pp = 2"});

  Recipe sum = base({"parallel.pp=3"});
  sum.parallel.stage_layers = {4, 2, 1};
  expect_layout_error(sum,
                      {"parallel.stage_layers = [4, 2, 1]", "sums to 7", "model.num_layers = 8"});

  Recipe empty_stage = base({"parallel.pp=2"});
  empty_stage.parallel.stage_layers = {8, 0};
  expect_layout_error(empty_stage, {"parallel.stage_layers = [8, 0]", "stage 1 has 0 layers"});

  Recipe recompute = base({"parallel.pp=4"});
  recompute.parallel.recompute_stages = {0, 4};
  expect_layout_error(recompute,
                      {"parallel.recompute_stages = [0, 4]", "stage index 4", "parallel.pp = 4"});
  recompute.parallel.recompute_stages = {2, 2};
  expect_layout_error(recompute, {"parallel.recompute_stages = [2, 2]", "listed twice"});

  Recipe microbatches = base({"parallel.pp=2", "parallel.schedule=1f1b"});
  microbatches.parallel.microbatches = 0;
  expect_layout_error(microbatches, {"parallel.microbatches = 0", ">= 1", "1f1b"});
  microbatches.parallel.schedule = PipelineSchedule::gpipe;
  expect_layout_error(microbatches, {"parallel.microbatches = 0", "gpipe"});
}

TEST(LayoutCheck, GlobalBatchNamesEveryFactor) {
  Recipe r = base({"parallel.dp=4", "parallel.microbatches=2", "data.grad_accum=3"});
  r.data.global_batch = 2 * 4 * 2 * 3;  // micro_batch 2: consistent
  EXPECT_NO_THROW(validate_layout(r, 4));
  r.data.global_batch = 36;
  expect_layout_error(
      r, {"global batch not divisible by dp x microbatches", "data.global_batch = 36",
          "parallel.dp = 4", "data.grad_accum = 3", "parallel.microbatches = 2", "= 24"});
  r.data.global_batch = 72;
  expect_layout_error(r, {"data.global_batch = 72", "data.micro_batch = 2", "= 3"});
}

TEST(LayoutCheck, OversizedBatchesAndSizes) {
  Recipe r = base();
  r.data.grad_accum = 1 << 16;
  r.parallel.microbatches = 1 << 16;
  expect_layout_error(r,
                      {"data.grad_accum = 65536", "parallel.microbatches = 65536", "4294967296"});
  r.parallel.microbatches = 1 << 14;
  r.data.micro_batch = 1 << 4;
  expect_layout_error(r, {"global batch", "data.micro_batch = 16", "2147483647"});

  Recipe zero_dp = base();
  zero_dp.parallel.dp = 0;
  expect_user_error([&] { validate_layout(zero_dp, 1); }, {"world size 1", "= 0"});
  // check_layout_fields alone (the parser's entry point) reports the size itself.
  expect_user_error(
      [&] {
        check_layout_fields(
            zero_dp, [](const std::string& k, const std::string& v) { return k + " = " + v; });
      },
      {"t.yaml", "parallel.dp = 0", ">= 1"});
}

TEST(LayoutCheck, OrderMustBeAPermutation) {
  expect_user_error([] { base({"parallel.order=tp-dp"}); },
                    {"parallel.order", "'tp-dp'", "tp-dp-pp", "pp-dp-tp"});
}

TEST(LayoutCheck, EveryAcceptedOrderBuildsATopology) {
  const std::vector<std::string> orders = enum_names<RankOrder>();
  EXPECT_EQ(orders.size(), 6u);
  std::vector<std::string> sorted = orders;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (const std::string& order : orders) {
    const Topology t(8, ParallelSizes{2, 2, 2}, order);
    EXPECT_EQ(t.order(), order);
    EXPECT_NO_THROW(validate_layout(
        base({"parallel.order=" + order, "parallel.dp=2", "parallel.tp=2", "parallel.pp=2"}), 8));
  }
}

TEST(StageLayers, EvenSplitsGiveTheRemainderToTheEarliestStages) {
  const auto split = [](int num_layers, int pp) {
    return resolve_stage_layers(base(
        {"model.num_layers=" + std::to_string(num_layers), "parallel.pp=" + std::to_string(pp)}));
  };
  EXPECT_EQ(split(8, 1), (std::vector<int>{8}));
  EXPECT_EQ(split(8, 2), (std::vector<int>{4, 4}));
  EXPECT_EQ(split(10, 4), (std::vector<int>{3, 3, 2, 2}));
  EXPECT_EQ(split(7, 7), (std::vector<int>(7, 1)));
  EXPECT_EQ(split(40, 6), (std::vector<int>{7, 7, 7, 7, 6, 6}));
  // Every split: pp entries, each >= 1, summing to num_layers, non-increasing, spread <= 1.
  for (int num_layers = 1; num_layers <= 40; ++num_layers) {
    for (int pp = 1; pp <= num_layers; ++pp) {
      const std::vector<int> c = split(num_layers, pp);
      ASSERT_EQ(int(c.size()), pp);
      EXPECT_EQ(std::accumulate(c.begin(), c.end(), 0), num_layers);
      EXPECT_GE(c.back(), 1);
      EXPECT_TRUE(std::is_sorted(c.rbegin(), c.rend())) << num_layers << " / " << pp;
      EXPECT_LE(c.front() - c.back(), 1);
    }
  }
}

TEST(StageLayers, UnevenSplitsAreKeptAsGiven) {
  const Recipe r = base({"parallel.pp=3", "parallel.stage_layers=[2, 5, 1]"});
  EXPECT_EQ(resolve_stage_layers(r), (std::vector<int>{2, 5, 1}));
  // Uneven splits are also what even splits cannot be: more blocks on a later stage.
  const Recipe later = base({"parallel.pp=2", "parallel.stage_layers=[3, 5]"});
  EXPECT_EQ(resolve_stage_layers(later), (std::vector<int>{3, 5}));
}

TEST(StageLayers, RecomputationPerStage) {
  const Recipe some = base({"parallel.pp=4", "parallel.recompute_stages=[3, 1]"});
  EXPECT_FALSE(stage_recomputes(some, 0));
  EXPECT_TRUE(stage_recomputes(some, 1));
  EXPECT_FALSE(stage_recomputes(some, 2));
  EXPECT_TRUE(stage_recomputes(some, 3));
  const Recipe all =
      base({"parallel.pp=4", "parallel.recompute_stages=[1]", "train.recompute=true"});
  for (int s = 0; s < 4; ++s) EXPECT_TRUE(stage_recomputes(all, s)) << s;
}

TEST(VocabPadding, FinalizeRoundsUpToAMultipleOfTpToo) {
  const Recipe r = base({"model.vocab_size=auto", "model.vocab_pad_multiple=64"});
  const auto padded = [&](int vocab_size, int tp) {
    ModelConfig m = r.model;
    finalize_model_vocab(m, vocab_size, r.file, tp);
    EXPECT_EQ(m.vocab_size, vocab_size);
    return m.padded_vocab_size;
  };
  EXPECT_EQ(padded(4000, 1), 4032);    // 63 x 64
  EXPECT_EQ(padded(4000, 8), 4032);    // lcm(64, 8) = 64
  EXPECT_EQ(padded(4000, 5), 4160);    // lcm(64, 5) = 320: 13 x 320
  EXPECT_EQ(padded(4000, 3), 4032);    // lcm(64, 3) = 192: 21 x 192
  EXPECT_EQ(padded(4033, 3), 4224);    // 22 x 192
  EXPECT_EQ(padded(50257, 6), 50304);  // lcm(64, 6) = 192: 262 x 192
  ModelConfig defaulted = r.model;
  finalize_model_vocab(defaulted, 4000, r.file);  // tp defaults to 1
  EXPECT_EQ(defaulted.padded_vocab_size, 4032);
}

TEST(VocabPadding, GivenPaddedSizeMustSplitOverTp) {
  const Recipe r = base({"model.vocab_size=auto", "model.padded_vocab_size=4096"});
  ModelConfig ok = r.model;
  finalize_model_vocab(ok, 4000, r.file, 8);
  EXPECT_EQ(ok.padded_vocab_size, 4096);
  ModelConfig bad = r.model;
  expect_user_error([&] { finalize_model_vocab(bad, 4000, r.file, 3); },
                    {"t.yaml", "model.padded_vocab_size = 4096", "parallel.tp = 3"});
}

TEST(VocabPadding, ParserPadsAGivenVocabularyForTp) {
  // Derived: vocab_size rounded up to lcm(vocab_pad_multiple, tp); given: tp must divide it.
  EXPECT_EQ(base({"parallel.tp=2", "model.vocab_size=101"}).model.padded_vocab_size, 102);
  EXPECT_EQ(base({"parallel.tp=4", "model.vocab_size=101"}).model.padded_vocab_size, 104);
  EXPECT_EQ(base({"parallel.tp=4", "model.vocab_pad_multiple=6"}).model.padded_vocab_size, 108);
  expect_user_error(
      [] {
        base({"parallel.tp=2", "model.padded_vocab_size=101"});
      },
      {"t.yaml", "model.padded_vocab_size = 101 (--set model.padded_vocab_size=101)",
       "parallel.tp = 2 (--set parallel.tp=2)"});
}

TEST(LayoutCheck, EveryRecipeFitsItsOwnLayout) {
  const fs::path dir = fs::path(TESSERA_SOURCE_DIR) / "recipes";
  int num_recipes = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    Recipe r = load_recipe(entry.path().string());
    if (r.model.vocab_size == 0) finalize_model_vocab(r.model, 4096, r.file, r.parallel.tp);
    EXPECT_NO_THROW(validate_layout(r, world_of(r)));
    const std::vector<int> stages = resolve_stage_layers(r);
    EXPECT_EQ(std::accumulate(stages.begin(), stages.end(), 0), r.model.num_layers);
    ++num_recipes;
  }
  EXPECT_GE(num_recipes, 4);
}

}  // namespace
}  // namespace tessera
