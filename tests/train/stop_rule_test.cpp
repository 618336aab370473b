// The stop decision without MPI: the time rule, the deadline (train.time_limit and
// SLURM_JOB_END_TIME), the signal flag, and StopCheck's agreement over a one-rank communicator.
#include "train/stop_rule.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <thread>

#include "config/recipe.h"
#include "parallel/self_communicator.h"
#include "tests/common/errors.h"
#include "train/stop_signals.h"

namespace tessera {
namespace {

using Clock = Deadline::Clock;
using std::chrono::seconds;

TEST(StopRule, StopsWhenAStepAndASaveNoLongerFitWithTheMargin) {
  const StopEstimate e{10.0, 20.0};  // need 1.5 * 30 + 5 = 50 s
  EXPECT_FALSE(out_of_time(50.5, e));
  EXPECT_TRUE(out_of_time(49.5, e));
  EXPECT_TRUE(out_of_time(-3.0, e));  // past the deadline already
  // Before the first step only the save and the margin count.
  EXPECT_FALSE(out_of_time(kStopMarginS + 0.2, StopEstimate{0.0, 0.1}));
  EXPECT_TRUE(out_of_time(kStopMarginS + 0.1, StopEstimate{0.0, 0.1}));
  EXPECT_FALSE(out_of_time(INFINITY, StopEstimate{1e9, 1e9}));  // no deadline
}

TEST(StopRule, DeadlineIsTheEarlierOfTimeLimitAndJobEnd) {
  const Clock::time_point start = Clock::now();
  const Clock::time_point later = start + seconds(50);
  EXPECT_FALSE(Deadline().set());
  EXPECT_TRUE(std::isinf(Deadline().remaining_s(later, 1000.0)));
  EXPECT_DOUBLE_EQ(Deadline(60.0, std::nullopt, start).remaining_s(later, 1000.0), 10.0);
  EXPECT_DOUBLE_EQ(Deadline(0.0, 1030.0, start).remaining_s(later, 1000.0), 30.0);
  EXPECT_DOUBLE_EQ(Deadline(60.0, 1030.0, start).remaining_s(later, 1000.0), 10.0);
  EXPECT_DOUBLE_EQ(Deadline(600.0, 1030.0, start).remaining_s(later, 1000.0), 30.0);
  EXPECT_EQ(Deadline(60.0, 1030.0, start).describe(),
            "train.time_limit 60 s and SLURM_JOB_END_TIME 1030");
}

TEST(StopRule, ParsesSlurmJobEndTime) {
  EXPECT_EQ(parse_job_end_time("1767225600"), 1767225600.0);
  for (const char* bad : {"", "soon", "12x", "-5", "0", "inf"})
    EXPECT_FALSE(parse_job_end_time(bad).has_value()) << bad;
  EXPECT_FALSE(parse_job_end_time(nullptr).has_value());
}

TEST(StopRule, TimeLimitIsARecipeFieldOfNonNegativeSeconds) {
  const char* base =
      "model: {family: gpt2, vocab_size: 100, num_layers: 2, hidden: 32, "
      "num_heads: 4, max_seq_len: 16}\n"
      "data: {path: data/x.h5, seq_len: 16, micro_batch: 2}\n"
      "train: {steps: 10, out_dir: runs/t}\n";
  EXPECT_EQ(parse_recipe(base, "t.yaml").train.time_limit, 0);
  EXPECT_EQ(parse_recipe(base, "t.yaml", {"train.time_limit=3600"}).train.time_limit, 3600);
  testing::expect_user_error([&] { parse_recipe(base, "t.yaml", {"train.time_limit=-1"}); },
                             {"train.time_limit", "-1"});
}

TEST(StopCheck, AgreesOnNothingWithoutSignalOrDeadline) {
  SelfCommunicator world(Device::cpu, "world");
  clear_stop_signal();
  StopCheck check(world, Deadline(), 0.0);
  EXPECT_FALSE(check.at_boundary());
  EXPECT_FALSE(check.at_boundary());
}

TEST(StopCheck, ASignalStopsAtTheNextBoundaryAndTheProcessLives) {
  SelfCommunicator world(Device::cpu, "world");
  install_stop_signal_handlers();
  clear_stop_signal();
  StopCheck check(world, Deadline(), 0.0);
  EXPECT_FALSE(check.at_boundary());
  std::raise(SIGUSR1);
  std::raise(SIGTERM);  // a second signal while stopping: the flag keeps a stop signal
  EXPECT_EQ(stop_signal_received(), SIGTERM);
  const StopDecision d = check.at_boundary();
  EXPECT_EQ(d.reason, StopReason::signal);
  EXPECT_EQ(d.signal, SIGTERM);
  EXPECT_EQ(d.describe(), "SIGTERM");
  clear_stop_signal();
}

TEST(StopCheck, ANearDeadlineStopsAndTheEstimateFollowsTheSteps) {
  SelfCommunicator world(Device::cpu, "world");
  clear_stop_signal();
  // 100 s left: the margin fits, a 70 s save guess does not (1.5 * 70 + 5 > 100).
  StopCheck roomy(world, Deadline(100.0, std::nullopt, Clock::now()), 1.0);
  EXPECT_FALSE(roomy.at_boundary());
  StopCheck tight(world, Deadline(100.0, std::nullopt, Clock::now()), 70.0);
  const StopDecision d = tight.at_boundary();
  EXPECT_EQ(d.reason, StopReason::time_limit);
  EXPECT_GT(d.remaining_s, 99.0);

  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(roomy.at_boundary());
  EXPECT_GE(roomy.estimate().step_s, 0.02);  // the interval between the two boundaries
  roomy.saved(0.5);  // the first measured save replaces the guess, later ones raise it only
  EXPECT_EQ(roomy.estimate().save_s, 0.5);
  roomy.saved(0.25);
  EXPECT_EQ(roomy.estimate().save_s, 0.5);
  roomy.saved(2.0);
  EXPECT_EQ(roomy.estimate().save_s, 2.0);
}

}  // namespace
}  // namespace tessera
