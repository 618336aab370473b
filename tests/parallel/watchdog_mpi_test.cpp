// The watchdog under mpirun (2 ranks of watchdog_hang, timeout 3 s): a rank that sleeps inside a
// dp all-reduce, or skips one, ends the job non-zero within timeout + 10 s, and every rank's line
// names it, the operation, the group and the sequence number. Each run sits under `timeout`, so
// a watchdog that failed to fire fails the test instead of hanging it.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "tests/common/cli.h"

namespace tessera {
namespace {

constexpr int kTimeoutS = 3;

struct Timed {
  testing::CliResult r;
  double seconds;
};

Timed run_hang(const std::string& fault) {
  const std::string cmd = "cd '" TESSERA_SOURCE_DIR "' && TESSERA_FAULT_INJECT=" + fault +
                          " timeout -k 5 60 " + testing::mpirun(2) + TESSERA_WATCHDOG_HANG + " " +
                          std::to_string(kTimeoutS) + " 2>&1";
  const auto t0 = std::chrono::steady_clock::now();
  Timed out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.r.output.append(buf, n);
  const int st = pclose(p);
  out.r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

void expect_line(const std::string& output, const std::string& text) {
  EXPECT_NE(output.find(text), std::string::npos) << "missing '" << text << "' in:\n" << output;
}

// Without a fault the guarded job runs to the end, its sums right, and the watchdog says nothing.
TEST(WatchdogMpi, AHealthyJobFinishesUntouched) {
  const Timed t = run_hang("");
  EXPECT_EQ(t.r.status, 0) << t.r.output;
  expect_line(t.r.output, "rank 0: done");
  expect_line(t.r.output, "rank 1: done");
  EXPECT_EQ(t.r.output.find("stuck"), std::string::npos) << t.r.output;
}

TEST(WatchdogMpi, RankSleepingInsideACollectiveEndsTheJob) {
  const Timed t = run_hang("rank=1,op=comm_sleep,group=dp,step=5");
  EXPECT_NE(t.r.status, 0) << t.r.output;
  EXPECT_NE(t.r.status, 124) << "the outer timeout ended it:\n" << t.r.output;
  EXPECT_LT(t.seconds, kTimeoutS + 10) << t.r.output;
  // The culprit: blocked in its 5th dp all-reduce, having issued 5.
  expect_line(t.r.output, "rank 1: stuck in all_reduce on group 'dp' (mpi, seq 5, 16 elements)");
  expect_line(t.r.output, "dp/mpi 5");
  // Its peer waits too, in the same or the next all-reduce, and says so.
  EXPECT_NE(t.r.output.find("rank 0: stuck in all_reduce on group 'dp'"), std::string::npos)
      << t.r.output;
}

TEST(WatchdogMpi, RankSkippingACollectiveEndsTheJob) {
  const Timed t = run_hang("rank=1,op=comm_skip,group=dp,step=5");
  EXPECT_NE(t.r.status, 0) << t.r.output;
  EXPECT_NE(t.r.status, 124) << "the outer timeout ended it:\n" << t.r.output;
  EXPECT_LT(t.seconds, kTimeoutS + 10) << t.r.output;
  // Rank 0's 10th all-reduce has no partner; rank 1, one short on dp, waits at the barrier.
  expect_line(t.r.output, "rank 0: stuck in all_reduce on group 'dp' (mpi, seq 10, 16 elements)");
  expect_line(t.r.output, "rank 1: stuck in barrier on group 'world' (mpi, seq 1");
  expect_line(t.r.output, "dp/mpi 9");  // rank 1 issued one fewer: the laggard
  expect_line(t.r.output, "dp/mpi all_reduce#5 skipped");
}

}  // namespace
}  // namespace tessera
