// Bad input gets a clear error and exit status 2 — never a crash or a hang: unknown key, wrong
// type, missing file, truncated/corrupt HDF5, a tokenizer that does not match the dataset, and
// layouts or precisions that are not built.
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/common/cli.h"

namespace tessera {
namespace {

using testing::run_cli;

// A minimal valid recipe around the CI dataset; `extra` is appended to the train section.
std::string recipe_text(const std::string& dataset, const std::string& out_dir) {
  return "model:\n  family: gpt2\n  vocab_size: auto\n  num_layers: 1\n  hidden: 16\n"
         "  num_heads: 2\n  max_seq_len: 16\n"
         "data:\n  path: " +
         dataset +
         "\n  seq_len: 16\n  micro_batch: 2\n"
         "train:\n  steps: 2\n  out_dir: " +
         out_dir + "\n  device: cpu\n  sample_tokens: 0\n";
}

void expect_user_error(const testing::CliResult& r, std::initializer_list<const char*> needles) {
  EXPECT_EQ(r.status, 2) << r.output;
  for (const char* n : needles)
    EXPECT_NE(r.output.find(n), std::string::npos) << "missing '" << n << "' in:\n" << r.output;
}

TEST(CliErrors, UnknownKeyNamesKeyFileAndLine) {
  const std::string dir = testing::fresh_dir("unknown_key");
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text("x.h5", dir + "/run") + "  stepz: 3\n");
  expect_user_error(run_cli("train " + path), {"train.stepz", "r.yaml", "17"});
}

// Every rank parses the same recipe and meets the same error: rank 0 prints it once and the job
// ends with status 2 (the other ranks wait for its abort instead of printing it again).
TEST(CliErrors, RecipeErrorUnderMpirunIsPrintedOnce) {
  const std::string dir = testing::fresh_dir("unknown_key_mpi");
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text("x.h5", dir + "/run"));
  const auto r = run_cli("train " + path + " --set train.stepz=3", testing::mpirun(3));
  expect_user_error(r, {"train.stepz"});
  size_t count = 0;
  for (size_t at = r.output.find("unknown key"); at != std::string::npos;
       at = r.output.find("unknown key", at + 1))
    ++count;
  EXPECT_EQ(count, 1u) << r.output;
}

TEST(CliErrors, WrongTypeNamesValue) {
  const std::string dir = testing::fresh_dir("wrong_type");
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text("x.h5", dir + "/run"));
  expect_user_error(run_cli("train " + path + " --set train.steps=many"), {"train.steps", "many"});
}

TEST(CliErrors, MissingRecipeAndMissingDataset) {
  expect_user_error(run_cli("train does/not/exist.yaml"), {"does/not/exist.yaml"});
  const std::string dir = testing::fresh_dir("missing_data");
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text(dir + "/nope.h5", dir + "/run"));
  expect_user_error(run_cli("train " + path), {"nope.h5"});
}

TEST(CliErrors, CorruptAndTruncatedDataset) {
  const std::string dir = testing::fresh_dir("corrupt_data");
  const std::string junk = dir + "/junk.h5";
  testing::write_file(junk, std::string(4096, 'x'));
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text(junk, dir + "/run"));
  expect_user_error(run_cli("train " + path), {"junk.h5"});

  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string cut = dir + "/cut.h5";
  std::filesystem::copy_file(testing::ci_dataset(), cut);
  std::filesystem::resize_file(cut, std::filesystem::file_size(cut) / 2);
  testing::write_file(path, recipe_text(cut, dir + "/run"));
  expect_user_error(run_cli("train " + path), {"cut.h5"});
}

TEST(CliErrors, TokenizerThatDoesNotMatchTheDataset) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string dir = testing::fresh_dir("tokenizer_mismatch");
  const std::string path = dir + "/r.yaml";
  // data.tokenizer names the tokenizer the recipe expects; GPT-2's is not the CI corpus's.
  std::string text = recipe_text(testing::ci_dataset(), dir + "/run");
  text.replace(text.find("data:\n"), 6, "data:\n  tokenizer: gpt2\n");
  testing::write_file(path, text);
  expect_user_error(run_cli("train " + path), {"tokenizer", "gutenberg.h5"});
}

TEST(CliErrors, LayoutNeedsItsRanks) {
  const std::string dir = testing::fresh_dir("not_built");
  const std::string path = dir + "/r.yaml";
  testing::write_file(path, recipe_text(testing::ci_dataset(), dir + "/run"));
  // One process cannot run a 2-rank layout: the message says how many ranks to launch.
  expect_user_error(run_cli("train " + path + " --set parallel.tp=2"),
                    {"parallel.tp", "world size 1", "-n 2"});
}

TEST(CliErrors, UnknownCommandAndBadPrepareArgs) {
  EXPECT_EQ(run_cli("frobnicate").status, 2);
  EXPECT_EQ(run_cli("prepare --out x.h5").status, 2);
  EXPECT_EQ(run_cli("inspect /no/such/path").status, 2);
}

}  // namespace
}  // namespace tessera
