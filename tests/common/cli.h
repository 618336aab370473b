// Runs the `tessera` binary in a shell and captures its exit status and combined output, for
// tests of the command-line behaviour (exit codes, error messages, end-to-end training).
#pragma once
#include <sys/wait.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace tessera::testing {

struct CliResult {
  int status = -1;
  std::string output;  // stdout and stderr
};

inline std::string tessera_binary() { return std::string(TESSERA_BINARY_DIR) + "/src/cli/tessera"; }

// Runs the binary with `args` in directory `dir` (stdout and stderr together). `launcher` (e.g.
// "mpirun -np 4 ") is put before the binary; empty runs it directly.
inline CliResult run_cli_in(const std::string& dir, const std::string& args,
                            const std::string& launcher = "") {
  const std::string cmd =
      "cd '" + dir + "' && " + launcher + "'" + tessera_binary() + "' " + args + " 2>&1";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// run_cli_in the source tree, where recipes/ and data/ are.
inline CliResult run_cli(const std::string& args, const std::string& launcher = "") {
  return run_cli_in(TESSERA_SOURCE_DIR, args, launcher);
}

#ifdef TESSERA_MPIEXEC
// mpirun as the test launcher needs it here: root in CI containers, more ranks than cores. Set in
// the launcher's environment only, never the user's.
inline std::string mpirun(int np) {
  return std::string(
             "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
             "OMPI_MCA_rmaps_base_oversubscribe=1 ") +
         TESSERA_MPIEXEC + " -np " + std::to_string(np) + " --oversubscribe --bind-to none ";
}
#endif

// A fresh directory under the build tree, removed first if it exists.
inline std::string fresh_dir(const std::string& name) {
  const std::filesystem::path d = std::filesystem::path(TESSERA_BINARY_DIR) / "test-runs" / name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

// The run of recipes/ci-tiny.yaml as the main job trains it (600 steps), made by
// Train.CiRecipeBeatsUnigramBaseline (tests/e2e): the CI-trained model that later tests export.
// ctest orders them through the fixture ci_tiny_model.
inline std::string ci_trained_run() {
  return (std::filesystem::path(TESSERA_BINARY_DIR) / "test-runs" / "ci_tiny").string();
}

// A fresh directory private to the running test: ctest runs the cases of one binary concurrently,
// each in its own process, so a reference run that several cases need is made by each of them.
inline std::string fresh_dir_for_this_test(const std::string& name) {
  return fresh_dir(name + "-for-" +
                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

// The dataset scripts/prepare-data.sh makes (the test command runs it before ctest).
inline std::string ci_dataset() {
  return std::string(TESSERA_SOURCE_DIR) + "/data/gutenberg/gutenberg.h5";
}

}  // namespace tessera::testing
