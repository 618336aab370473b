// NcclCommunicator under mpirun, one GPU per rank: the collective, P2P and group cases of the MPI
// test on device memory, plus stream ordering (an operation sees compute-stream work queued just
// before it, and compute work queued after wait() sees its result, with no host synchronization
// in between). Every test skips unless every rank has a GPU of its own.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>

#include "core/memory.h"
#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "tests/parallel/comm_cases.h"

namespace tessera::testing {
namespace {

class NcclComm : public ::testing::Test {
 protected:
  // Collective: every rank takes the same decision, so no rank waits in an NCCL init alone.
  static void SetUpTestSuite() {
    int devices = 0;
    const bool have = cuda_available() && cudaGetDeviceCount(&devices) == cudaSuccess;
    int ok = have && local_rank() < devices ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    usable_ = ok == 1;
    if (!usable_) return;
    select_local_gpu();
    ctx_ = new ParallelContext(ParallelSizes{1, world_size(), 1}, Device::cuda);
  }
  static void TearDownTestSuite() {
    delete ctx_;
    ctx_ = nullptr;
  }
  void SetUp() override {
    if (!usable_) GTEST_SKIP() << "needs one CUDA device per rank";
  }
  static Communicator& world() { return ctx_->comm(Group::world); }

  static bool usable_;
  static ParallelContext* ctx_;
};
bool NcclComm::usable_ = false;
ParallelContext* NcclComm::ctx_ = nullptr;

TEST_F(NcclComm, AllReduceEveryDtypeAndOp) {
  ASSERT_EQ(world().device(), Device::cuda);
  uint64_t seed = 100;
  for (DType t : kCommDTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max})
      check_all_reduce(world(), t, op, 1027, ++seed);
  }
}

TEST_F(NcclComm, ReduceScatterSeparateAndInPlace) {
  uint64_t seed = 300;
  for (DType t : kCommDTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      for (bool in_place : {false, true})
        check_reduce_scatter(world(), t, op, 37, in_place, ++seed);
    }
  }
}

TEST_F(NcclComm, AllGatherSeparateAndInPlaceBitExact) {
  uint64_t seed = 400;
  for (DType t : kCommDTypes) {
    for (bool in_place : {false, true}) check_all_gather(world(), t, 129, in_place, ++seed);
  }
}

// Uneven counts with zeros (a rank may send nothing to a peer, or receive nothing at all), up
// to 700 elements a pair, and the adjoint round trip.
TEST_F(NcclComm, AllToAllVUnevenCountsAndAdjoint) {
  uint64_t seed = 900;
  for (DType t : kCommDTypes) {
    check_all_to_all_v(world(), t, 3, ++seed);
    check_all_to_all_v(world(), t, 700, ++seed);
  }
}

TEST_F(NcclComm, BroadcastFromEveryRoot) {
  uint64_t seed = 500;
  for (DType t : kCommDTypes) check_broadcast(world(), t, 301, ++seed);
}

TEST_F(NcclComm, RingBitExact) {
  uint64_t seed = 600;
  for (DType t : kCommDTypes) {
    for (bool batched : {false, true}) check_ring(world(), t, 513, batched, ++seed);
  }
}

TEST_F(NcclComm, ScalarAllReduceAndBarrier) {
  const int n = world().size();
  const double x = world().rank() + 0.25;
  EXPECT_EQ(world().all_reduce_scalar(x, ReduceOp::sum), n * (n - 1) / 2.0 + 0.25 * n);
  EXPECT_EQ(world().all_reduce_scalar(x, ReduceOp::max), n - 1 + 0.25);
  world().barrier();
}

// 64 MiB of int32 written on the compute stream right before the all-reduce, and copied on the
// compute stream right after wait(), with no host synchronization in between: without the
// events, NCCL would read the buffer before the memset lands, or the copy would read it before
// the reduction finishes.
TEST_F(NcclComm, OrderedWithTheComputeStream) {
  const int64_t n = int64_t{16} << 20;
  Buffer buf(Device::cuda, n * sizeof(int32_t));
  Buffer copy(Device::cuda, n * sizeof(int32_t));
  const cudaStream_t compute = nullptr;  // the legacy default stream, as kernels/cuda uses
  for (int round = 0; round < 3; ++round) {
    const uint8_t byte = static_cast<uint8_t>(1 + round);
    ASSERT_EQ(cudaMemsetAsync(buf.data(), 0, n * sizeof(int32_t), compute), cudaSuccess);
    ASSERT_EQ(cudaMemsetAsync(buf.data(), byte, n * sizeof(int32_t), compute), cudaSuccess);
    CommHandle h =
        world().all_reduce_async(Tensor(buf.data(), DType::i32, Device::cuda, {n}), ReduceOp::sum);
    h->wait();
    ASSERT_EQ(cudaMemcpyAsync(copy.data(), buf.data(), n * sizeof(int32_t),
                              cudaMemcpyDeviceToDevice, compute),
              cudaSuccess);
    std::vector<int32_t> host(n);
    copy_bytes(host.data(), Device::cpu, copy.data(), Device::cuda, n * sizeof(int32_t));
    int32_t one = 0;
    std::memset(&one, byte, sizeof(one));
    const int32_t want = one * world().size();
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += host[i] != want;
    EXPECT_EQ(bad, 0) << "round " << round << ": elements not equal to " << want;
  }
}

TEST_F(NcclComm, GroupsOfA3dLayout) {
  const int world = world_size();
  const int pp = world >= 4 ? 2 : 1;
  ParallelContext ctx(ParallelSizes{2, world / (2 * pp), pp}, Device::cuda);
  check_groups(ctx, /*device_comms=*/true);
  check_groups(ctx, /*device_comms=*/false);
}

}  // namespace
}  // namespace tessera::testing
