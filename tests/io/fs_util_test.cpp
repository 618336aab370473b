// fs_util tests: step directory names and listing, directory replacement (atomic swap and the
// two-rename fallback), synced writes, and failed system calls reported as system errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/fs_util.h"
#include "io_test_util.h"

namespace tessera::io {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::ScratchDir;

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(FsUtil, ParsesStepDirNames) {
  int64_t step = -1;
  EXPECT_TRUE(parse_step_dir_name("step_0", &step));
  EXPECT_EQ(step, 0);
  EXPECT_TRUE(parse_step_dir_name("step_123456", &step));
  EXPECT_EQ(step, 123456);
  for (const char* bad : {"step_", "step_-1", "step_1a", "step_+3", "Step_1", ".tmp-step_4",
                          "step_1234567890123456789", "step_1 ", "xstep_1"})
    EXPECT_FALSE(parse_step_dir_name(bad, &step)) << bad;
}

TEST(FsUtil, ListsStepDirsNumerically) {
  ScratchDir dir;
  for (const char* d : {"step_9", "step_10", "step_100", "step_2", ".tmp-step_50", "other"})
    fs::create_directories(dir / d);
  std::ofstream(dir / "step_7") << "a file, not a directory";
  std::vector<int64_t> steps;
  for (const StepDir& d : list_step_dirs(dir.str())) steps.push_back(d.step);
  EXPECT_EQ(steps, (std::vector<int64_t>{2, 9, 10, 100}));
  EXPECT_EQ(list_step_dirs(dir.str()).back().path, dir / "step_100");
  EXPECT_TRUE(list_step_dirs(dir / "absent").empty());
}

TEST(FsUtil, ReplaceDirSwapsOrFallsBack) {
  for (bool exchange : {true, false}) {
    ScratchDir dir;
    fs::create_directories(dir / "new");
    fs::create_directories(dir / "target");
    write_file_synced(dir / "new/f", "new");
    write_file_synced(dir / "target/f", "old");
    write_file_synced(dir / "target/only_old", "x");
    replace_dir(dir / "new", dir / "target", dir / ".aside", exchange);
    EXPECT_EQ(slurp(dir / "target/f"), "new") << exchange;
    EXPECT_FALSE(fs::exists(dir / "target/only_old")) << exchange;
    EXPECT_FALSE(fs::exists(dir / "new")) << exchange;
    EXPECT_FALSE(fs::exists(dir / ".aside")) << exchange;
    // Into a place that does not exist yet: a plain rename.
    fs::create_directories(dir / "fresh");
    replace_dir(dir / "fresh", dir / "target2", dir / ".aside2", exchange);
    EXPECT_TRUE(fs::is_directory(dir / "target2"));
  }
}

TEST(FsUtil, SyncedWriteAndErrors) {
  ScratchDir dir;
  write_file_synced(dir / "a.txt", "hello\n");
  EXPECT_EQ(slurp(dir / "a.txt"), "hello\n");
  write_file_synced(dir / "a.txt", "");
  EXPECT_EQ(slurp(dir / "a.txt"), "");
  fsync_file(dir / "a.txt");
  fsync_dir(dir.str());
  expect_error([&] { fsync_file(dir / "missing"); }, ErrorKind::system, {"missing", "fsync"});
  expect_error([&] { fsync_dir(dir / "a.txt"); }, ErrorKind::system, {"a.txt"});
  expect_error([&] { rename_path(dir / "missing", dir / "b"); }, ErrorKind::system,
               {"rename", "missing"});
  expect_error([&] { write_file_synced(dir / "no/such/dir/f", "x"); }, ErrorKind::system,
               {"no/such/dir/f"});
  expect_error([&] { make_dirs(dir / "a.txt/sub"); }, ErrorKind::system, {"a.txt/sub"});
  remove_tree(dir / "a.txt");
  remove_tree(dir / "a.txt");  // absent: fine
  EXPECT_FALSE(fs::exists(dir / "a.txt"));
}

}  // namespace
}  // namespace tessera::io
