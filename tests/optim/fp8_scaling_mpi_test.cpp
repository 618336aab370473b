// Fp8ScalingState::reduce_amax under mpirun on the CPU: every rank quantizes its own data (as
// tensor-parallel shards and data-parallel replicas see different activations), reduces the amaxes
// over tp and then dp, and must end with the same scales as one process that saw all the data.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/ops_fp8.h"
#include "optim/fp8_scaling.h"
#include "parallel/parallel_context.h"

namespace tessera {
namespace {

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// Rank r's data for tensor j: normals with a rank- and tensor-dependent spread, so the largest
// amax of each tensor sits on a different rank.
std::vector<float> rank_data(int rank, int j, int64_t n) {
  std::mt19937_64 rng(1000 * rank + j);
  std::normal_distribution<float> d(0.0f, 1.0f + float((rank + 3 * j) % 5));
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(Fp8ScalingMpi, ReducedScalesEqualThoseOfAllData) {
  const int world = world_size();
  for (int tp : {1, 2}) {
    if (world % tp != 0) continue;
    ParallelContext ctx(ParallelSizes{tp, world / tp, 1}, Device::cpu);
    const std::vector<DType> formats{DType::e4m3, DType::e5m2, DType::e4m3};
    Fp8ScalingConfig cfg;
    cfg.amax_history_len = 4;
    Fp8ScalingState state(Device::cpu, formats, cfg);
    const int64_t n = 257;
    std::vector<uint8_t> out(n);
    std::vector<float> global_max(formats.size(), 0.0f);
    for (size_t j = 0; j < formats.size(); ++j) {
      std::vector<float> x = rank_data(ctx.rank(), int(j), n);
      ops::fp8_quantize(Tensor(out.data(), formats[j], Device::cpu, {n}), {}, state.amax(j),
                        Tensor(x.data(), DType::f32, Device::cpu, {n}), state.scale(j));
      for (int r = 0; r < world; ++r)
        for (float v : rank_data(r, int(j), n))
          global_max[j] = std::max(global_max[j], std::fabs(v));
    }
    state.reduce_amax(&ctx.comm(Group::tp));
    state.reduce_amax(&ctx.comm(Group::dp));
    std::vector<float> amax(formats.size());
    std::memcpy(amax.data(), state.amaxes().data, amax.size() * sizeof(float));
    EXPECT_EQ(amax, global_max) << "tp " << tp;
    state.update();
    for (size_t j = 0; j < formats.size(); ++j)
      EXPECT_EQ(static_cast<const float*>(state.scales().data)[j],
                ops::fp8_max_of(formats[j]) / global_max[j])
          << "tensor " << j << ", tp " << tp;
  }
}

}  // namespace
}  // namespace tessera
