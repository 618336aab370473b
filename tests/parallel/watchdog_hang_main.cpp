// `watchdog_hang TIMEOUT_S`: the smallest job the watchdog guards, for watchdog_mpi_test.cpp.
// Every rank of a dp-only layout runs 10 all-reduces on dp, then a barrier on world, under a
// Watchdog; TESSERA_FAULT_INJECT (op=comm_sleep or comm_skip, group=dp) makes it hang.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "parallel/watchdog.h"

int main(int argc, char** argv) {
  using namespace tessera;
  MpiRuntime mpi(&argc, &argv);
  if (argc != 2) {
    std::fprintf(stderr, "usage: watchdog_hang TIMEOUT_S\n");
    return 2;
  }
  try {
    ParallelContext ctx(ParallelSizes{1, mpi.size(), 1, 1}, Device::cpu);
    Watchdog watchdog(ctx.communicators(), ctx.recorder(), std::atof(argv[1]));
    std::vector<float> x(16, 1.0f);
    const Tensor t(x.data(), DType::f32, Device::cpu, {16});
    for (int i = 0; i < 10; ++i) ctx.comm(Group::dp).all_reduce(t, ReduceOp::sum);
    ctx.comm(Group::world).barrier();
    // Ten sums of `size` ones each: every element is size^10 (exact in f32 for size <= 4).
    float want = 1.0f;
    for (int i = 0; i < 10; ++i) want *= float(mpi.size());
    for (float v : x)
      if (v != want) {
        std::fprintf(stderr, "rank %d: all-reduce gave %g, want %g\n", mpi.rank(), v, want);
        abort_job(1);
      }
    std::printf("rank %d: done\n", mpi.rank());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    abort_job(1);
  }
  return 0;
}
