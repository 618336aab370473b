// Recipe parsing that succeeds: defaults, family defaults and explicit switches, `--set`
// overrides, the YAML round trip (parse(to_yaml(r)) == r) and finalize_model_vocab.
#include <gtest/gtest.h>

#include <cstdint>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera {
namespace {

using testing::base_recipe_blend;
using testing::expect_user_error;
using testing::kBaseRecipe;

Recipe parse_base(const std::vector<std::string>& overrides = {}) {
  return parse_recipe(kBaseRecipe, "t.yaml", overrides);
}

TEST(Recipe, MinimalRecipeFillsDefaults) {
  const Recipe r = parse_base();
  EXPECT_EQ(r.file, "t.yaml");
  EXPECT_EQ(r.model.vocab_size, 100);
  EXPECT_EQ(r.model.padded_vocab_size, 100);  // vocab_pad_multiple defaults to 1
  EXPECT_EQ(r.model.num_kv_heads, 4);         // = num_heads
  EXPECT_EQ(r.model.head_dim, 8);             // = hidden / num_heads
  EXPECT_EQ(r.model.ffn_hidden, 128);         // gpt2: 4 * hidden
  EXPECT_EQ(r.model.norm, NormKind::layernorm);
  EXPECT_EQ(r.model.position, PositionKind::learned);
  EXPECT_EQ(r.model.activation, ActivationKind::gelu);
  EXPECT_TRUE(r.model.bias);
  EXPECT_TRUE(r.model.tied_embeddings);
  EXPECT_FALSE(r.model.qk_norm);
  EXPECT_FLOAT_EQ(r.model.norm_eps, 1e-5f);
  EXPECT_EQ(r.parallel, ParallelConfig{});
  EXPECT_EQ(r.optim, OptimConfig{});
  EXPECT_EQ(r.checkpoint, CheckpointConfig{});
  EXPECT_EQ(r.logging, LoggingConfig{});
  EXPECT_EQ(r.data.path, (DataSources{{"data/x.h5", 1.0f}}));
  EXPECT_EQ(r.data.grad_accum, 1);
  EXPECT_EQ(r.train.steps, 10);
  EXPECT_EQ(r.train.device, DeviceChoice::auto_);
  EXPECT_EQ(r.tokens_per_step(), 2 * 16);
}

TEST(Recipe, LlamaFamilyDefaults) {
  const Recipe r = parse_base({"model.family=llama", "model.ffn_hidden=96"});
  EXPECT_EQ(r.model.norm, NormKind::rmsnorm);
  EXPECT_EQ(r.model.position, PositionKind::rope);
  EXPECT_EQ(r.model.activation, ActivationKind::swiglu);
  EXPECT_FALSE(r.model.bias);
  EXPECT_FALSE(r.model.tied_embeddings);
  EXPECT_FALSE(r.model.qk_norm);
  EXPECT_FLOAT_EQ(r.model.norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(r.model.rope_theta, 10000.0f);
  EXPECT_EQ(r.model.ffn_hidden, 96);
}

TEST(Recipe, ExplicitSwitchesBeatFamilyDefaultsWhateverTheOrder) {
  // `family` comes after the switches in the text; its defaults still apply first.
  const std::string text = R"(model:
  norm: layernorm
  tied_embeddings: true
  norm_eps: 1.0e-3
  family: llama
  vocab_size: 100
  num_layers: 2
  hidden: 32
  num_heads: 4
  num_kv_heads: 2
  ffn_hidden: 64
  max_seq_len: 16
  qk_norm: true
data: {path: d.h5, seq_len: 16, micro_batch: 1}
train: {steps: 5, out_dir: o}
)";
  const Recipe r = parse_recipe(text, "s.yaml");
  EXPECT_EQ(r.model.norm, NormKind::layernorm);
  EXPECT_TRUE(r.model.tied_embeddings);
  EXPECT_FLOAT_EQ(r.model.norm_eps, 1e-3f);
  EXPECT_EQ(r.model.position, PositionKind::rope);  // still the family default
  EXPECT_EQ(r.model.num_kv_heads, 2);
  EXPECT_TRUE(r.model.qk_norm);
}

TEST(Recipe, VocabPaddingRoundsUp) {
  const Recipe r = parse_base({"model.vocab_pad_multiple=64"});
  EXPECT_EQ(r.model.padded_vocab_size, 128);
  const Recipe explicit_padded = parse_base({"model.padded_vocab_size=200"});
  EXPECT_EQ(explicit_padded.model.padded_vocab_size, 200);
}

TEST(Recipe, OverridesReplaceAndAddKeys) {
  const Recipe r = parse_base({"train.steps=20", "optim.no_decay=[norms, biases]",
                               "checkpoint.keep=5", "optim.lr=1e-3", "train.device=cpu",
                               "train.steps=30", "train.sample_prompt=Once upon a time"});
  EXPECT_EQ(r.train.steps, 30);  // the last override of a key wins
  EXPECT_EQ(r.optim.no_decay, (std::vector<DecayExempt>{DecayExempt::norms, DecayExempt::biases}));
  EXPECT_EQ(r.checkpoint.keep, 5);  // section absent from the file
  EXPECT_FLOAT_EQ(r.optim.lr, 1e-3f);
  EXPECT_EQ(r.train.device, DeviceChoice::cpu);
  EXPECT_EQ(r.train.sample_prompt, "Once upon a time");
  EXPECT_TRUE(parse_base({"optim.no_decay=[]"}).optim.no_decay.empty());
}

TEST(Recipe, OverridesApplyBeforeValidation) {
  // seq_len 32 exceeds max_seq_len 16 on its own; raising max_seq_len in the same call is fine.
  const Recipe r = parse_base({"data.seq_len=32", "model.max_seq_len=32"});
  EXPECT_EQ(r.data.seq_len, 32);
}

TEST(Recipe, RoundTripIsExact) {
  const Recipe r = parse_base({"train.sample_prompt=He said \"hi\"\\n\ttab", "optim.lr=3e-4",
                               "optim.beta2=0.999", "train.seed=18446744073709551615",
                               "model.init_std=0.1", "checkpoint.resume=latest",
                               "optim.no_decay=[embeddings]", "parallel.schedule=1f1b"});
  EXPECT_EQ(r.train.seed, UINT64_MAX);
  const std::string yaml = recipe_to_yaml(r);
  const Recipe back = parse_recipe(yaml, r.file);
  EXPECT_EQ(back, r) << yaml;
  EXPECT_EQ(recipe_to_yaml(back), yaml);
}

TEST(Recipe, RoundTripOfStringsThatLookLikeOtherTypes) {
  for (const std::string prompt :
       {"true", "123", "~", "null", "a: b", "- x", "#c", "[1]", "\x01", "caf\xc3\xa9"}) {
    Recipe r = parse_base();
    r.train.sample_prompt = prompt;
    const Recipe back = parse_recipe(recipe_to_yaml(r), r.file);
    EXPECT_EQ(back.train.sample_prompt, prompt);
  }
}

TEST(Recipe, RoundTripKeepsAutoVocab) {
  const Recipe r = parse_base({"model.vocab_size=auto", "model.vocab_pad_multiple=64"});
  EXPECT_EQ(r.model.vocab_size, 0);
  EXPECT_EQ(r.model.padded_vocab_size, 0);
  const std::string yaml = recipe_to_yaml(r);
  EXPECT_NE(yaml.find("vocab_size: auto"), std::string::npos) << yaml;
  EXPECT_EQ(parse_recipe(yaml, r.file), r);
}

TEST(Recipe, ResolvedYamlListsEveryFieldInOrder) {
  const std::string yaml = recipe_to_yaml(parse_base());
  size_t last = 0;
  for (const char* key :
       {"model:", "  family:", "  init_std:", "parallel:", "  zero:", "precision:",
        "  grad_reduce:", "optim:", "  grad_clip:", "data:", "train:", "  recompute:",
        "  attention:", "  sample_prompt:", "checkpoint:", "  resume:", "logging:", "  level:"}) {
    const size_t at = yaml.find(key, last);
    ASSERT_NE(at, std::string::npos) << key << " missing or out of order in\n" << yaml;
    last = at;
  }
}

TEST(Recipe, FinalizeVocabFromDataset) {
  Recipe r = parse_base({"model.vocab_size=auto", "model.vocab_pad_multiple=64"});
  finalize_model_vocab(r.model, 4000, r.file);
  EXPECT_EQ(r.model.vocab_size, 4000);
  EXPECT_EQ(r.model.padded_vocab_size, 4032);

  Recipe given = parse_base({"model.vocab_size=auto", "model.padded_vocab_size=4096"});
  finalize_model_vocab(given.model, 4000, given.file);
  EXPECT_EQ(given.model.padded_vocab_size, 4096);

  Recipe same = parse_base();
  finalize_model_vocab(same.model, 100, same.file);  // explicit and equal: unchanged
  EXPECT_EQ(same.model, parse_base().model);
}

TEST(Recipe, FinalizeVocabRejectsInconsistentSizes) {
  Recipe small = parse_base({"model.vocab_size=auto", "model.padded_vocab_size=256"});
  expect_user_error(
      [&] { finalize_model_vocab(small.model, 300, "t.yaml"); },
      {"t.yaml", "model.padded_vocab_size = 256", "model.vocab_size = 300", "from the dataset"});
  Recipe explicit_vocab = parse_base();
  expect_user_error([&] { finalize_model_vocab(explicit_vocab.model, 101, "t.yaml"); },
                    {"t.yaml", "model.vocab_size = 100", "101"});
  expect_user_error([&] { finalize_model_vocab(small.model, 0, "t.yaml"); }, {"t.yaml", "0"});
}

}  // namespace
}  // namespace tessera

namespace tessera {
namespace {

TEST(Recipe, DataPathTakesABlend) {
  const Recipe r = parse_recipe(base_recipe_blend(), "t.yaml");
  ASSERT_EQ(r.data.path.size(), 2u);
  EXPECT_EQ(r.data.path[0], (DataSource{"a.h5", 0.7f}));
  EXPECT_EQ(r.data.path[1], (DataSource{"b.h5", 1.0f}));  // weight defaults to 1
  EXPECT_FALSE(r.data.mock());
  const std::string yaml = recipe_to_yaml(r);
  EXPECT_NE(yaml.find("path: [{path: \"a.h5\", weight: 0.7}, {path: \"b.h5\", weight: 1}]"),
            std::string::npos)
      << yaml;
  EXPECT_EQ(parse_recipe(yaml, r.file), r);
  testing::expect_user_error(
      [] { parse_recipe(base_recipe_blend(), "t.yaml", {"data.path=[{path: a.h5, weight: 0}]"}); },
      {"data.path[0].weight", "'0'"});
  testing::expect_user_error(
      [] { parse_recipe(base_recipe_blend(), "t.yaml", {"data.path=[{weight: 2}]"}); },
      {"data.path[0].path is required"});
  testing::expect_user_error(
      [] { parse_recipe(base_recipe_blend(), "t.yaml", {"data.path=[{path: a.h5, wieght: 2}]"}); },
      {"data.path[0].wieght"});
  testing::expect_user_error(
      [] {
        parse_recipe(base_recipe_blend(), "t.yaml", {"data.path=[{path: mock}, {path: b.h5}]"});
      },
      {"'mock' cannot be part of a blend"});
}

}  // namespace
}  // namespace tessera
