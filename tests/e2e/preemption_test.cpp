// Preemption end to end under mpirun: SIGTERM to one rank, SIGUSR1 to mpirun or SIGTERM to
// launch/mpirun.sh at random moments; signals injected during an evaluation, a checkpoint save and
// the warm-up; train.time_limit and SLURM_JOB_END_TIME. Each stop exits 0 with a complete
// checkpoint whose resume is bitwise the uninterrupted run. A few random trials here; the 20-trial
// run is preemption_soak_test.cpp (label soak).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "tests/common/cli.h"
#include "tests/e2e/preemption_util.h"

namespace tessera {
namespace {

using testing::fresh_dir_for_this_test;
using testing::preempt_args;
using testing::run_cli;
using testing::Target;

// TESSERA_PREEMPT_TRIALS overrides the number of random trials of a test.
int trials(int fallback) {
  const char* env = std::getenv("TESSERA_PREEMPT_TRIALS");
  return env && *env ? std::atoi(env) : fallback;
}

TEST(Preemption, TermToOneRankAtRandomMomentsResumesBitwise) {
  testing::random_preemptions(fresh_dir_for_this_test("preempt"), " --set parallel.dp=2", trials(2),
                              {Target::one_rank});
}

// Two pipeline stages: ranks holding different layers stop after the same step.
TEST(Preemption, TermToTheLauncherOrUsr1ToMpirunResumesBitwise) {
  testing::random_preemptions(fresh_dir_for_this_test("preempt"), " --set parallel.pp=2", trials(2),
                              {Target::launcher_term, Target::mpirun_usr1});
}

testing::CliResult train_with_fault(const std::string& args, const std::string& fault) {
  return run_cli("train " + args, "TESSERA_FAULT_INJECT=" + fault + " " + testing::mpirun(2));
}

// One run directory stopped three times: SIGTERM as the evaluation of step 7 starts (rank 1),
// halfway through the scheduled save of step 10 (rank 0: its shard written, the checkpoint not
// yet committed), and during the warm-up of the run resumed from that checkpoint (which is not
// written again). The last resume finishes bitwise like the uninterrupted run.
TEST(Preemption, SignalsDuringEvaluationSaveAndWarmUp) {
  const std::string root = fresh_dir_for_this_test("preempt");
  const int steps = 12;
  const std::string ref = root + "/reference", dir = root + "/stopped";
  testing::train_reference(ref, preempt_args(ref, steps));
  const std::string args = preempt_args(dir, steps);
  const std::string resume = args + " --set checkpoint.resume=latest";

  auto r = train_with_fault(args, "rank=1,op=term_in_eval,step=7");
  ASSERT_EQ(r.status, 0) << r.output;
  auto p = testing::find_preempted(r.output);
  ASSERT_TRUE(p) << r.output;
  EXPECT_EQ(p->step, 7);
  EXPECT_EQ(p->reason, "SIGTERM");
  EXPECT_NE(r.output.find("val_loss"), std::string::npos) << "the evaluation ran to its end";

  r = train_with_fault(resume, "rank=0,op=term_in_save,step=10");
  ASSERT_EQ(r.status, 0) << r.output;
  p = testing::find_preempted(r.output);
  ASSERT_TRUE(p) << r.output;
  EXPECT_EQ(p->step, 10);
  EXPECT_NE(r.output.find("its checkpoint is written already"), std::string::npos) << r.output;
  EXPECT_TRUE(io::is_complete_checkpoint(p->dir));

  r = train_with_fault(resume, "rank=1,op=term_in_warmup,step=0");
  ASSERT_EQ(r.status, 0) << r.output;
  p = testing::find_preempted(r.output);
  ASSERT_TRUE(p) << r.output;
  EXPECT_EQ(p->step, 10);
  EXPECT_NE(r.output.find("its checkpoint is written already"), std::string::npos) << r.output;

  r = run_cli("train " + resume, testing::mpirun(2));
  ASSERT_EQ(r.status, 0) << r.output;
  testing::expect_identical_checkpoints(io::latest_checkpoint(dir), io::latest_checkpoint(ref));
  testing::expect_identical_losses(dir, ref);
}

// A deadline 6 s away leaves 1 s of training (the rule keeps 5 s in reserve): one process under
// train.time_limit, two ranks under SLURM_JOB_END_TIME. Both stop long before their 100000 steps
// with a checkpoint, exit 0, and the first resumes.
TEST(Preemption, TimeLimitAndSlurmJobEndTimeStopEarly) {
  const std::string root = fresh_dir_for_this_test("preempt");
  const std::string alone = root + "/time_limit";
  auto r = run_cli("train " + preempt_args(alone, 100000, "") + " --set train.time_limit=6");
  ASSERT_EQ(r.status, 0) << r.output;
  auto p = testing::find_preempted(r.output);
  ASSERT_TRUE(p) << r.output;
  EXPECT_NE(p->reason.find("train.time_limit 6 s"), std::string::npos) << p->reason;
  EXPECT_LT(p->step, 100000);
  EXPECT_TRUE(io::is_complete_checkpoint(p->dir));
  const std::string more = std::to_string(p->step + 2);
  r = run_cli("train " + preempt_args(alone, 100000, "") + " --set train.steps=" + more +
              " --set optim.warmup_steps=1 --set checkpoint.resume=latest");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("final: step " + more), std::string::npos) << r.output;

  const std::string slurm = root + "/slurm";
  const auto end = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count() +
                   6;
  r = run_cli("train " + preempt_args(slurm, 100000),
              "SLURM_JOB_END_TIME=" + std::to_string(end) + " " + testing::mpirun(2));
  ASSERT_EQ(r.status, 0) << r.output;
  p = testing::find_preempted(r.output);
  ASSERT_TRUE(p) << r.output;
  EXPECT_NE(p->reason.find("SLURM_JOB_END_TIME"), std::string::npos) << p->reason;
  EXPECT_TRUE(io::is_complete_checkpoint(p->dir));
}

}  // namespace
}  // namespace tessera
