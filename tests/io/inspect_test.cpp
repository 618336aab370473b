// `tessera inspect` tests, run as a process (TESSERA_INSPECT_CLI): checkpoint listing with
// statistics and metadata, run-dir resolution to the latest checkpoint, generic HDF5 listing, and
// exit status 2 for missing or unusable paths.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include "io/checkpoint.h"
#include "io/h5.h"
#include "io_test_util.h"

namespace tessera::io {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

struct CliResult {
  int status = -1;
  std::string output;  // stdout and stderr together
};

CliResult run_inspect(const std::string& args) {
  const std::string cmd = std::string(TESSERA_INSPECT_CLI) + " inspect " + args + " 2>&1";
  CliResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return r;
  }
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int raw = ::pclose(p);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return r;
}

bool has(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

const char* kRecipe =
    "model:\n  layers: 2\n  width: 64\n  heads: 4\n  vocab: 256\noptim:\n  lr: 0.001\n"
    "train:\n  steps: 10\n";

std::string save(const std::string& root, int64_t step) {
  const std::vector<float> w10 = {1, 2, 3, 4};
  const std::vector<float> w2 = {0.5f, std::numeric_limits<float>::quiet_NaN(), -0.5f};
  const std::vector<int32_t> pos = {7, 8};
  const std::vector<uint16_t> half = {0x3f80, 0x4000};  // bf16 1.0, 2.0
  CheckpointWriter w(root, step, 0, 1);
  w.add({"layers.10.w", DType::f32, {2, 2}, {0, 0}, {2, 2}, w10.data()});
  w.add({"layers.2.w", DType::f32, {3}, {0}, {3}, w2.data()});
  w.add({"loader.pos", DType::i32, {2}, {0}, {2}, pos.data()});
  w.add({"cast.h", DType::bf16, {2}, {0}, {2}, half.data()});
  w.set_meta("recipe", kRecipe);
  w.set_meta("rng", "seed=1");
  return w.commit(0);
}

TEST(Inspect, ListsCheckpointTensorsStatsAndMetadata) {
  ScratchDir dir;
  const std::string step_dir = save(dir.str(), 3);
  const CliResult r = run_inspect(step_dir);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r.output, "step 3, 1 shard(s), 4 tensor(s), 11 elements")) << r.output;
  EXPECT_TRUE(has(r.output, "mean 2.5  std 1.11803  min 1  max 4")) << r.output;
  EXPECT_TRUE(has(r.output, "mean 0  std 0.5  min -0.5  max 0.5  nan 1")) << r.output;
  EXPECT_TRUE(has(r.output, "mean 1.5  std 0.5  min 1  max 2")) << r.output;  // bf16
  EXPECT_TRUE(has(r.output, "(2, 2)")) << r.output;
  // Natural order: layers.2 before layers.10; integer tensors get no statistics.
  EXPECT_LT(r.output.find("layers.2.w"), r.output.find("layers.10.w")) << r.output;
  const std::string pos_line = r.output.substr(r.output.find("loader.pos"));
  EXPECT_FALSE(has(pos_line.substr(0, pos_line.find('\n')), "mean")) << r.output;
  EXPECT_TRUE(has(r.output, "recipe: model:\\n  layers: 2")) << r.output;
  EXPECT_TRUE(has(r.output, "rng: seed=1")) << r.output;
  EXPECT_FALSE(has(r.output, "steps: 10")) << r.output;  // recipe cut short without --recipe

  const CliResult full = run_inspect(step_dir + " --recipe --no-stats");
  ASSERT_EQ(full.status, 0) << full.output;
  EXPECT_TRUE(has(full.output, std::string("recipe:\n") + kRecipe)) << full.output;
  EXPECT_FALSE(has(full.output, "mean")) << full.output;
}

TEST(Inspect, RunDirectoryPicksTheLatestCheckpoint) {
  ScratchDir dir;
  save(dir.str(), 1);
  const std::string second = save(dir.str(), 2);
  for (const std::string& path : {dir.str(), checkpoints_dir(dir.str())}) {
    const CliResult r = run_inspect(path);
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_TRUE(has(r.output, "latest complete checkpoint under")) << r.output;
    EXPECT_TRUE(has(r.output, "checkpoint " + second)) << r.output;
    EXPECT_TRUE(has(r.output, "step 2,")) << r.output;
  }
}

TEST(Inspect, ListsAnyHdf5File) {
  ScratchDir dir;
  const std::string path = dir / "tokens.h5";
  {
    h5::File f = h5::File::create(path);
    h5::write_attr_string(f.ctx(), f.id(), "tokenizer", "gpt2");
    h5::Handle g = h5::create_group(f.ctx(), f.id(), "train");
    h5::write_attr_i64s(f.ctx(), g.id(), "vocab_size", {50257});
    const std::vector<int32_t> ids(10, 3);
    h5::Handle d = h5::create_dataset(f.ctx(), g.id(), "ids", H5T_STD_I32LE, {10}, 4, false);
    h5::write_dataset(f.ctx(), d.id(), H5T_NATIVE_INT32, ids.data(), "ids");
    d.close(f.ctx(), "H5Dclose");
    g.close(f.ctx(), "H5Gclose");
    f.close();
  }
  const CliResult r = run_inspect(path);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r.output, "@tokenizer = gpt2")) << r.output;
  EXPECT_TRUE(has(r.output, "/train/\n    @vocab_size = [50257]")) << r.output;
  EXPECT_TRUE(has(r.output, "/train/ids  i32 (10) (10 elements)")) << r.output;
}

TEST(Inspect, BadPathsExitWithStatusTwo) {
  ScratchDir dir;
  CliResult r = run_inspect(dir / "absent");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r.output, "absent") && has(r.output, "does not exist")) << r.output;

  std::ofstream(dir / "notes.h5") << "text";
  r = run_inspect(dir / "notes.h5");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r.output, "not an HDF5 file")) << r.output;

  const std::string step_dir = save(dir.str(), 4);
  fs::remove(step_dir + "/COMPLETE");
  r = run_inspect(step_dir);
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r.output, "not a complete checkpoint")) << r.output;
  r = run_inspect(dir.str());
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r.output, "no complete checkpoint")) << r.output;

  r = run_inspect("");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r.output, "PATH is required")) << r.output;  // CLI11's wording
}

}  // namespace
}  // namespace tessera::io
