// The full preemption trial: 20 stop signals at random moments (TERM to a random rank, USR1 to
// mpirun, TERM to launch/mpirun.sh) to a dp 2 FP16 run (the loss scaler's state must survive
// too), each resumed bitwise. About 70 s on two cores, so not in the default run:
// TESSERA_PREEMPT_SOAK=1 ctest --test-dir build -L soak (it skips otherwise).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "tests/e2e/preemption_util.h"

namespace tessera {
namespace {

using testing::Target;

TEST(PreemptionSoak, TwentyRandomStopsResumeBitwise) {
  const char* soak = std::getenv("TESSERA_PREEMPT_SOAK");
  if (!soak || std::string(soak) != "1") GTEST_SKIP() << "set TESSERA_PREEMPT_SOAK=1 to run it";
  testing::random_preemptions(testing::fresh_dir_for_this_test("preempt-soak"),
                              " --set parallel.dp=2 --set precision.compute=fp16", 20,
                              {Target::one_rank, Target::mpirun_usr1, Target::launcher_term});
}

}  // namespace
}  // namespace tessera
