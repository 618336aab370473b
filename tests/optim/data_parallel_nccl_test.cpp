// Bucketed gradient sync and the distributed optimizer under mpirun on GPUs (NCCL), f32 and bf16,
// ZeRO-0 and ZeRO-1, every (tp, dp, pp) factorization of the world: the checks of
// dp_mpi_cases.h. Every test skips unless every rank has a GPU of its own.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include "core/memory.h"
#include "parallel/mpi_runtime.h"
#include "tests/optim/dp_mpi_cases.h"

namespace tessera::testing {
namespace {

class DataParallelNccl : public ::testing::TestWithParam<DpCase> {
 protected:
  // Collective: every rank takes the same decision, so no rank waits in an NCCL init alone.
  static void SetUpTestSuite() {
    int devices = 0;
    const bool have = cuda_available() && cudaGetDeviceCount(&devices) == cudaSuccess;
    int ok = have && local_rank() < devices ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    usable_ = ok == 1;
    if (usable_) select_local_gpu();
  }
  void SetUp() override {
    if (!usable_) GTEST_SKIP() << "needs one CUDA device per rank";
  }
  static bool usable_;
};
bool DataParallelNccl::usable_ = false;

TEST_P(DataParallelNccl, SummedGradientsMatchReference) { check_summed_gradients(GetParam()); }
TEST_P(DataParallelNccl, StepsMatchAdamWOnSummedGradients) { check_steps_match_adamw(GetParam()); }
TEST_P(DataParallelNccl, StateGatherLoadRoundTrip) { check_state_round_trip(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Cuda, DataParallelNccl,
                         ::testing::Values(DpCase{Device::cuda, DType::f32, 0},
                                           DpCase{Device::cuda, DType::f32, 1},
                                           DpCase{Device::cuda, DType::bf16, 0},
                                           DpCase{Device::cuda, DType::bf16, 1}),
                         [](const auto& info) { return dp_case_name(info.param); });

}  // namespace
}  // namespace tessera::testing
