// Multi-rank checks of DistributedDataParallel and DistributedOptimizer, shared by the MPI (CPU)
// and NCCL (GPU) test executables: each runs every (tp, dp, pp) factorization of the world.
// Collective: every rank calls the same check; failures are reported with gtest's EXPECTs (never
// ASSERTs, so that no rank leaves a check early and strands the others in a collective).
#pragma once
#include <string>

#include "core/tensor.h"

namespace tessera::testing {

struct DpCase {
  Device device;
  DType dtype;  // f32 (CPU, GPU) or bf16 (GPU)
  int zero;
};
std::string dp_case_name(const DpCase& c);

// After finish(), the gradients this rank holds summed (all of them for ZeRO-0, its pieces for
// ZeRO-1) equal the double sum of every contributing rank's deterministic gradients.
void check_summed_gradients(const DpCase& c);
// Three steps from the same masters: values equal AdamW's in one process on the fully reduced
// gradients bit for bit (the gradients are multiples of 1/8, so every reduction order gives the
// exact sum, in bf16 too), and the global norm equals the serial one on every rank.
void check_steps_match_adamw(const DpCase& c);
// gather_state equals AdamW's state bit for bit on dp rank 0; load_state into a fresh optimizer
// reproduces values and state bit for bit, and both continue identically.
void check_state_round_trip(const DpCase& c);

}  // namespace tessera::testing
