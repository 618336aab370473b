// main() of every MPI test executable (tessera_mpi_test in cmake/tessera.cmake): initializes MPI,
// runs every test on every rank, prints gtest's report on rank 0 only and failures on every rank
// (tagged with the rank), and exits nonzero when any rank failed, 77 when every test skipped.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "parallel/mpi_runtime.h"

namespace {

// Rank r > 0 keeps quiet except for failed assertions, which it prints with its rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The name is kept here: UnitTest::current_test_info() takes the lock that gtest holds while
  // it reports a part result, so calling it from OnTestPartResult deadlocks.
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s: %s:%d: Failure\n%s\n", rank_, test_.c_str(),
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.message());
  }

 private:
  int rank_;
  std::string test_ = "(outside a test)";
};

}  // namespace

int main(int argc, char** argv) {
  tessera::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(mpi.rank()));
  }
  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  const int local_all_skipped =
      unit.successful_test_count() == 0 && unit.skipped_test_count() > 0 ? 1 : 0;

  // flags[0]: did any rank fail (max of 0/1); flags[1]: did every rank skip everything (the max
  // of -x is minus the min of x, so one MPI_MAX reduction answers both).
  int flags[2] = {local_failed, -local_all_skipped};
  TS_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, flags, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD),
               "combining test results");
  const bool any_failed = flags[0] != 0;
  const bool all_skipped = flags[1] == -1;
  if (mpi.rank() == 0) {
    if (any_failed) {
      std::printf("MPI test: FAILED on at least one of %d ranks (see [rank r] lines)\n",
                  mpi.size());
    } else if (all_skipped) {
      // Matched by SKIP_REGULAR_EXPRESSION, so ctest reports the executable as skipped.
      std::printf("TESSERA_MPI_TEST_ALL_SKIPPED: every test skipped on every one of %d ranks\n",
                  mpi.size());
    }
    std::fflush(stdout);
  }
  return any_failed ? 1 : all_skipped ? 77 : 0;
}
