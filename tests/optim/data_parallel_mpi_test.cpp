// Bucketed gradient sync and the distributed optimizer under mpirun on the CPU (MPI), ZeRO-0 and
// ZeRO-1, every (tp, dp, pp) factorization of the world: the checks of dp_mpi_cases.h.
#include <gtest/gtest.h>

#include "tests/optim/dp_mpi_cases.h"

namespace tessera::testing {
namespace {

class DataParallelMpi : public ::testing::TestWithParam<DpCase> {};

TEST_P(DataParallelMpi, SummedGradientsMatchReference) { check_summed_gradients(GetParam()); }
TEST_P(DataParallelMpi, StepsMatchAdamWOnSummedGradients) { check_steps_match_adamw(GetParam()); }
TEST_P(DataParallelMpi, StateGatherLoadRoundTrip) { check_state_round_trip(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Cpu, DataParallelMpi,
                         ::testing::Values(DpCase{Device::cpu, DType::f32, 0},
                                           DpCase{Device::cpu, DType::f32, 1}),
                         [](const auto& info) { return dp_case_name(info.param); });

}  // namespace
}  // namespace tessera::testing
