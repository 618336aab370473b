// The hang watchdog in `tessera train` under mpirun -np 2 (dp 2, a tiny model on mock data): a
// rank asleep inside a gradient all-reduce ends the job within parallel.timeout_s + 10 s, named;
// with the watchdog on (the default) the losses equal those of a run with it off, bit for bit.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "tests/common/cli.h"
#include "tests/common/runs.h"

namespace tessera {
namespace {

std::string args(const std::string& out_dir, const std::string& extra) {
  return "train recipes/ci-tiny.yaml --set data.path=mock --set model.vocab_size=250"
         " --set model.vocab_pad_multiple=64 --set model.num_layers=2 --set model.hidden=32"
         " --set model.num_heads=4 --set model.max_seq_len=16 --set data.seq_len=16"
         " --set data.global_batch=8 --set data.micro_batch=0 --set train.steps=6"
         " --set train.eval_every=0 --set train.eval_batches=1 --set train.sample_tokens=0"
         " --set optim.warmup_steps=2"
         " --set checkpoint.save_final=false --set train.device=cpu --set parallel.dp=2"
         " --set train.out_dir=" +
         out_dir + extra;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(HangTrain, RankAsleepInAGradientAllReduceEndsTheJob) {
  const std::string dir = testing::fresh_dir("hang-train-sleep");
  const auto t0 = std::chrono::steady_clock::now();
  const testing::CliResult r = testing::run_cli(
      args(dir, " --set parallel.timeout_s=3"),
      "TESSERA_FAULT_INJECT=rank=1,op=comm_sleep,group=dp,step=3 timeout -k 5 90 " +
          testing::mpirun(2));
  const double seconds = seconds_since(t0);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, 124) << "the outer timeout ended it:\n" << r.output;
  // Start-up (data, model) takes about a second before the hang; the budget is timeout + 10 s.
  EXPECT_LT(seconds, 3 + 10 + 5) << r.output;
  EXPECT_NE(r.output.find("rank 1: stuck in all_reduce on group 'dp' (mpi, seq 3,"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("rank 0: stuck in "), std::string::npos) << r.output;
}

TEST(HangTrain, WatchdogChangesNoLoss) {
  double took[2] = {0, 0};
  std::vector<double> losses[2];
  for (int on = 0; on < 2; ++on) {
    const std::string dir = testing::fresh_dir(on ? "hang-train-on" : "hang-train-off");
    const auto t0 = std::chrono::steady_clock::now();
    const testing::CliResult r =
        testing::run_cli(args(dir, on ? "" : " --set parallel.timeout_s=0"), testing::mpirun(2));
    took[on] = seconds_since(t0);
    ASSERT_EQ(r.status, 0) << r.output;
    for (const auto& j : testing::read_metrics(dir))
      if (j.contains("loss")) losses[on].push_back(j["loss"].get<double>());
  }
  ASSERT_EQ(losses[0].size(), 6u);
  EXPECT_EQ(losses[1], losses[0]);
  std::printf("2-rank run: %.2f s with the watchdog off, %.2f s on\n", took[0], took[1]);
}

}  // namespace
}  // namespace tessera
