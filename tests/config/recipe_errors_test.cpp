// Recipe user errors: each names the key, the value, the expected type or valid choices, and the
// file and line (or the `--set` override the value came from).
#include <gtest/gtest.h>

#include "config/recipe.h"
#include "tests/config/recipe_test_util.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::kBaseRecipe;

// The base recipe with `line` inserted after line number `after` (1-based).
std::string with_line(int after, const std::string& line) {
  std::string text = kBaseRecipe;
  size_t pos = 0;
  for (int i = 0; i < after; ++i) pos = text.find('\n', pos) + 1;
  return text.insert(pos, line + "\n");
}

// The base recipe with the first occurrence of `from` replaced by `to`.
std::string replaced(const std::string& from, const std::string& to) {
  std::string text = kBaseRecipe;
  const size_t pos = text.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  return text.replace(pos, from.size(), to);
}

void expect_parse_error(const std::string& text, const std::vector<std::string>& fragments,
                        const std::vector<std::string>& overrides = {}) {
  expect_user_error([&] { parse_recipe(text, "t.yaml", overrides); }, fragments);
}

void expect_override_error(const std::string& override_text,
                           const std::vector<std::string>& fragments) {
  expect_parse_error(kBaseRecipe, fragments, {override_text});
}

TEST(RecipeErrors, UnknownKeyNamesKeyFileLineAndValidKeys) {
  expect_parse_error(with_line(13, "  stepz: 5"),
                     {"t.yaml:14", "unknown key 'train.stepz'", "did you mean 'train.steps'",
                      "valid keys of 'train'", "eval_every", "sample_prompt"});
  // Far from every key: no suggestion, still the list.
  const std::string msg = expect_user_error(
      [&] { parse_recipe(with_line(7, "  dropout: 0.1"), "t.yaml"); },
      {"t.yaml:8", "model.dropout", "valid keys of 'model'", "vocab_pad_multiple"});
  EXPECT_EQ(msg.find("did you mean"), std::string::npos) << msg;
}

TEST(RecipeErrors, UnknownSections) {
  expect_parse_error(std::string(kBaseRecipe) + "trian:\n  steps: 3\n",
                     {"t.yaml:15", "unknown section 'trian'", "did you mean 'train'",
                      "valid sections", "checkpoint"});
}

TEST(RecipeErrors, WrongTypesNameKeyValueTypeAndLine) {
  expect_parse_error(replaced("steps: 10", "steps: abc"),
                     {"t.yaml:13", "train.steps", "'abc'", "expected a positive integer"});
  expect_parse_error(replaced("steps: 10", "steps: [1, 2]"),
                     {"t.yaml:13", "train.steps", "a list", "positive integer"});
  expect_parse_error(replaced("steps: 10", "steps: 2.5"), {"train.steps", "'2.5'", "integer"});
  expect_parse_error(replaced("steps: 10", "steps: 1e3"), {"train.steps", "'1e3'", "integer"});
  expect_parse_error(replaced("steps: 10", "steps: -3"), {"train.steps", "'-3'", "positive"});
  expect_parse_error(replaced("steps: 10", "steps: 0"), {"train.steps", "'0'", "positive"});
  expect_parse_error(replaced("steps: 10", "steps: \"10\""),
                     {"train.steps", "the string '10'", "integer"});
  expect_parse_error(replaced("steps: 10", "steps:"), {"t.yaml:13", "train.steps", "nothing"});
  expect_parse_error(replaced("steps: 10", "steps: 99999999999"), {"train.steps", "99999999999"});
  expect_parse_error(replaced("hidden: 32", "hidden: {a: 1}"),
                     {"t.yaml:5", "model.hidden", "a mapping"});
  expect_parse_error(with_line(7, "  bias: yes please"),
                     {"t.yaml:8", "model.bias", "'yes please'", "true or false"});
  expect_parse_error(with_line(7, "  norm_eps: tiny"),
                     {"t.yaml:8", "model.norm_eps", "'tiny'", "positive number"});
  expect_parse_error(with_line(7, "  norm_eps: .nan"), {"model.norm_eps", "'.nan'"});
  expect_parse_error(with_line(7, "  init_std: 1e39"), {"model.init_std", "'1e39'"});
  expect_parse_error(replaced("vocab_size: 100", "vocab_size: lots"),
                     {"t.yaml:3", "model.vocab_size", "'lots'", "positive integer or auto"});
  expect_parse_error(replaced("path: data/x.h5", "path: [a, b]"),
                     {"t.yaml:9", "data.path[0]", "'a'", "a mapping {path: P, weight: W}"});
  expect_parse_error(replaced("path: data/x.h5", "path: {a: b}"),
                     {"t.yaml:9", "data.path", "a string", "a list of {path, weight}"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  beta2: 1.0\n",
                     {"t.yaml:16", "optim.beta2", "'1.0'", "[0, 1)"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  decay_fraction: 0\n",
                     {"optim.decay_fraction", "(0, 1]"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  no_decay: norms\n",
                     {"optim.no_decay", "'norms'", "a list of"});
  expect_parse_error(std::string(kBaseRecipe) + "parallel:\n  zero: 2\n",
                     {"parallel.zero", "'2'", "[0, 1]"});
  expect_parse_error(std::string(kBaseRecipe) + "checkpoint:\n  keep: 0\n",
                     {"checkpoint.keep", "'0'", "positive"});
  expect_parse_error(std::string(kBaseRecipe) + "train:\n  seed: -1\n", {"duplicate key 'train'"});
  expect_parse_error(replaced("out_dir: runs/t", "out_dir: runs/t\n  seed: -1"),
                     {"train.seed", "'-1'", "non-negative 64-bit integer"});
}

TEST(RecipeErrors, BadEnumsListTheChoices) {
  expect_parse_error(replaced("family: gpt2", "family: gpt3"),
                     {"t.yaml:2", "model.family", "'gpt3'", "gpt2, llama"});
  expect_parse_error(with_line(7, "  norm: batchnorm"),
                     {"t.yaml:8", "model.norm", "'batchnorm'", "layernorm, rmsnorm"});
  expect_parse_error(with_line(7, "  position: alibi"), {"model.position", "learned, rope"});
  expect_parse_error(with_line(7, "  activation: relu"), {"model.activation", "gelu, swiglu"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  schedule: step\n",
                     {"optim.schedule", "'step'", "cosine, linear, constant, wsd"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  no_decay: [norms, weights]\n",
                     {"optim.no_decay[1]", "'weights'", "norms, biases, embeddings"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  no_decay: [norms, norms]\n",
                     {"optim.no_decay", "'norms' is listed twice"});
  expect_parse_error(std::string(kBaseRecipe) + "parallel:\n  schedule: zb\n",
                     {"parallel.schedule", "gpipe, 1f1b"});
  expect_parse_error(std::string(kBaseRecipe) + "precision:\n  compute: int8\n",
                     {"precision.compute", "fp32, bf16, fp16, fp8"});
  expect_parse_error(replaced("out_dir: runs/t", "out_dir: runs/t\n  device: tpu"),
                     {"train.device", "'tpu'", "cpu, cuda, auto"});
  expect_parse_error(std::string(kBaseRecipe) + "logging:\n  level: loud\n",
                     {"logging.level", "debug, info, warn, error"});
}

TEST(RecipeErrors, InconsistentValuesNameBothSides) {
  expect_parse_error(with_line(7, "  num_kv_heads: 3"),
                     {"t.yaml", "model.num_heads = 4 (line 6)", "model.num_kv_heads = 3 (line 8)"});
  expect_parse_error(replaced("  seq_len: 16", "  seq_len: 32"),
                     {"t.yaml", "data.seq_len = 32 (line 10)", "model.max_seq_len = 16 (line 7)"});
  expect_parse_error(replaced("hidden: 32", "hidden: 30"),
                     {"model.hidden = 30 (line 5)", "model.num_heads = 4 (line 6)", "head_dim"});
  // With head_dim given, hidden need not divide by num_heads.
  EXPECT_EQ(
      parse_recipe(replaced("hidden: 32", "hidden: 30\n  head_dim: 10"), "t.yaml").model.head_dim,
      10);
  expect_parse_error(with_line(7, "  position: rope\n  head_dim: 7"),
                     {"model.head_dim = 7 (line 9)", "model.position = rope (line 8)", "even"});
  expect_parse_error(with_line(7, "  padded_vocab_size: 64"),
                     {"model.padded_vocab_size = 64 (line 8)", "model.vocab_size = 100 (line 3)"});
  expect_parse_error(with_line(7, "  padded_vocab_size: 130\n  vocab_pad_multiple: 64"),
                     {"model.padded_vocab_size = 130", "model.vocab_pad_multiple = 64"});
  expect_parse_error(std::string(kBaseRecipe) + "parallel:\n  tp: 3\n",
                     {"model.num_heads = 4 (line 6)", "parallel.tp = 3 (line 16)"});
  expect_parse_error(with_line(7, "  num_kv_heads: 2") + "parallel:\n  tp: 4\n",
                     {"model.num_kv_heads = 2", "parallel.tp = 4"});
  expect_parse_error(std::string(kBaseRecipe) + "parallel:\n  pp: 3\n",
                     {"model.num_layers = 2 (line 4)", "parallel.pp = 3 (line 16)"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  lr: 1e-4\n  min_lr: 1e-3\n",
                     {"optim.min_lr = 0.001 (line 17)", "optim.lr = 0.0001 (line 16)"});
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  warmup_steps: 11\n",
                     {"optim.warmup_steps = 11 (line 16)", "train.steps = 10 (line 13)"});
  // A default on one side is named as such.
  expect_parse_error(std::string(kBaseRecipe) + "optim:\n  min_lr: 1.0\n",
                     {"optim.min_lr = 1 (line 16)", "optim.lr = 0.0003 (default)"});
}

TEST(RecipeErrors, RequiredKeys) {
  expect_parse_error(replaced("  hidden: 32\n", ""), {"t.yaml", "model.hidden is required"});
  expect_parse_error(replaced("  path: data/x.h5\n", ""), {"t.yaml", "data.path is required"});
  expect_parse_error(replaced("path: data/x.h5", "path: \"\""), {"data.path is required"});
  expect_parse_error(replaced("  out_dir: runs/t\n", ""), {"train.out_dir is required"});
  expect_parse_error(replaced("  steps: 10\n", ""), {"train.steps is required"});
  expect_parse_error(replaced("family: gpt2", "family: llama"),
                     {"model.ffn_hidden is required", "llama"});
}

TEST(RecipeErrors, MalformedDocuments) {
  expect_parse_error("", {"t.yaml", "empty"});
  expect_parse_error("- a\n- b\n", {"t.yaml", "mapping"});
  expect_parse_error("model: [1, 2\n", {"t.yaml:", "invalid YAML"});
  expect_parse_error("train: 5\n", {"t.yaml:1", "'train' must be a mapping", "'5'"});
  expect_parse_error(with_line(13, "  steps: 11"),
                     {"t.yaml:14", "duplicate key 'train.steps'", "t.yaml:13"});
}

TEST(RecipeErrors, OverridesNameTheOverride) {
  expect_override_error("train.stepz=5", {"--set train.stepz=5", "unknown key 'train.stepz'",
                                          "did you mean 'train.steps'"});
  expect_override_error("train.steps=abc", {"--set train.steps=abc", "train.steps", "'abc'"});
  expect_override_error("train.steps=[1,2]", {"--set train.steps=[1,2]", "a list"});
  expect_override_error("trian.steps=5", {"--set trian.steps=5", "unknown section 'trian'"});
  expect_override_error("qat.bits=8", {"--set qat.bits=8", "unknown key 'qat.bits'"});
  expect_override_error("train.steps", {"--set train.steps", "section.key=value"});
  expect_override_error("steps=5", {"--set steps=5", "section.key=value"});
  expect_override_error("train.a.b=5", {"--set train.a.b=5", "section.key=value"});
  expect_override_error("train.steps=[1,", {"--set train.steps=[1,", "invalid YAML"});
  expect_override_error("model.num_kv_heads=3",
                        {"model.num_heads = 4 (line 6)", "model.num_kv_heads = 3 (--set "});
}

TEST(RecipeErrors, PrometheusPortOutOfRange) {
  expect_parse_error(std::string(kBaseRecipe) + "logging:\n  prometheus_port: 70000\n",
                     {"t.yaml:16", "logging.prometheus_port", "'70000'", "[0, 65535]"});
  expect_parse_error(std::string(kBaseRecipe) + "logging:\n  prometheus_port: -1\n",
                     {"t.yaml:16", "logging.prometheus_port", "'-1'", "[0, 65535]"});
  expect_override_error("logging.prometheus_port=65536",
                        {"--set logging.prometheus_port=65536", "'65536'", "[0, 65535]"});
  EXPECT_EQ(parse_recipe(kBaseRecipe, "t.yaml").logging.prometheus_port, 0);  // off by default
  EXPECT_EQ(parse_recipe(kBaseRecipe, "t.yaml", {"logging.prometheus_port=65535"})
                .logging.prometheus_port,
            65535);
}

TEST(RecipeErrors, MissingFileNamesThePath) {
  expect_user_error([] { load_recipe("/nonexistent/dir/recipe.yaml"); },
                    {"/nonexistent/dir/recipe.yaml"});
}

}  // namespace
}  // namespace tessera
