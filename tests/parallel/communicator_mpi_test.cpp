// Communicators under mpirun on the CPU (MpiCommunicator): every collective on every dtype
// against references built from all ranks' inputs, in-place variants, broadcast, a P2P ring with
// bit-exact bf16 patterns, every group of ParallelContext for every (tp, dp, pp) layout of the
// world, the MPI runtime helpers, and the error paths (short messages, MPI failures, bad layout).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "tests/parallel/comm_cases.h"

namespace tessera::testing {
namespace {

class MpiComm : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ctx_ = new ParallelContext(ParallelSizes{1, world_size(), 1}, Device::cpu);
  }
  static void TearDownTestSuite() {
    delete ctx_;
    ctx_ = nullptr;
  }
  static Communicator& world() { return ctx_->comm(Group::world); }
  static ParallelContext* ctx_;
};
ParallelContext* MpiComm::ctx_ = nullptr;

TEST_F(MpiComm, AllReduceEveryDtypeAndOp) {
  uint64_t seed = 100;
  for (DType t : kCommDTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max})
      check_all_reduce(world(), t, op, 1027, ++seed);
  }
}

// A strict subgroup whose group ranks differ from the global ranks (dp with tp = 2: ranks
// {0, 2, 4, ...} or {1, 3, ...}); inputs and reference are indexed by group rank.
TEST_F(MpiComm, AllReduceOnSubgroup) {
  if (world_size() < 4) GTEST_SKIP() << "needs 4 ranks for a subgroup of more than one rank";
  ParallelContext ctx(ParallelSizes{2, world_size() / 2, 1}, Device::cpu);
  ASSERT_EQ(ctx.comm(Group::dp).size(), world_size() / 2);
  uint64_t seed = 200;
  for (DType t : kCommDTypes) check_all_reduce(ctx.comm(Group::dp), t, ReduceOp::sum, 333, ++seed);
}

TEST_F(MpiComm, ReduceScatterSeparateAndInPlace) {
  uint64_t seed = 300;
  for (DType t : kCommDTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      for (bool in_place : {false, true})
        check_reduce_scatter(world(), t, op, 37, in_place, ++seed);
    }
  }
}

TEST_F(MpiComm, AllGatherSeparateAndInPlaceBitExact) {
  uint64_t seed = 400;
  for (DType t : kCommDTypes) {
    for (bool in_place : {false, true}) check_all_gather(world(), t, 129, in_place, ++seed);
  }
}

// Uneven counts with zeros (a rank may send nothing to a peer, or receive nothing at all), up
// to 700 elements a pair, and the adjoint round trip.
TEST_F(MpiComm, AllToAllVUnevenCountsAndAdjoint) {
  uint64_t seed = 900;
  for (DType t : kCommDTypes) {
    check_all_to_all_v(world(), t, 3, ++seed);
    check_all_to_all_v(world(), t, 700, ++seed);
  }
}

TEST_F(MpiComm, BroadcastFromEveryRoot) {
  uint64_t seed = 500;
  for (DType t : kCommDTypes) check_broadcast(world(), t, 301, ++seed);
}

TEST_F(MpiComm, RingBitExact) {
  uint64_t seed = 600;
  for (DType t : kCommDTypes) {
    for (bool batched : {false, true}) check_ring(world(), t, 513, batched, ++seed);
  }
}

TEST_F(MpiComm, ScalarAllReduce) {
  const int n = world().size();
  const double x = world().rank() + 0.25;
  // Sums of quarters are exact in double whatever the order.
  EXPECT_EQ(world().all_reduce_scalar(x, ReduceOp::sum), n * (n - 1) / 2.0 + 0.25 * n);
  EXPECT_EQ(world().all_reduce_scalar(x, ReduceOp::max), n - 1 + 0.25);
}

TEST_F(MpiComm, ShorterMessageThanBufferIsDetected) {
  // MPI itself accepts a message shorter than the receive buffer; the wait must not.
  Communicator& c = world();
  std::vector<int32_t> data(12, 7);
  if (c.rank() == 0) {
    c.send(Tensor(data.data(), DType::i32, Device::cpu, {10}), 1, 3);
  } else if (c.rank() == 1) {
    CommHandle h = c.recv_async(Tensor(data.data(), DType::i32, Device::cpu, {12}), 0, 3);
    try {
      h->wait();
      ADD_FAILURE() << "a 10-element message into a 12-element receive was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bug);
      EXPECT_NE(std::string(e.what()).find("received 10 elements, expected 12"), std::string::npos)
          << e.what();
    }
  }
}

TEST_F(MpiComm, ArgumentErrorsAreCaughtBeforeMpi) {
  Communicator& c = world();
  std::vector<float> a(4 * c.size()), b(4);
  const Tensor in(a.data(), DType::f32, Device::cpu, {4 * c.size()});
  const Tensor wrong(b.data(), DType::f32, Device::cpu, {3});
  EXPECT_THROW(c.reduce_scatter(wrong, in, ReduceOp::sum), Error);
  EXPECT_THROW(c.all_gather(in, wrong), Error);
  // Overlapping, but not exactly chunk rank(): a bug, not a silent in-place.
  const Tensor shifted(a.data() + c.rank() * 3 + 1, DType::f32, Device::cpu, {3});
  EXPECT_THROW(c.all_gather(Tensor(a.data(), DType::f32, Device::cpu, {3 * c.size()}), shifted),
               Error);
  std::vector<int8_t> bytes(8);
  EXPECT_THROW(c.all_reduce(Tensor(bytes.data(), DType::i8, Device::cpu, {8}), ReduceOp::sum),
               Error);
  EXPECT_THROW(c.send(Tensor(b.data(), DType::f32, Device::cpu, {4}), c.rank(), 0), Error);
  EXPECT_THROW(c.send(Tensor(b.data(), DType::f32, Device::cpu, {4}), c.size(), 0), Error);
  EXPECT_THROW(c.broadcast(Tensor(b.data(), DType::f32, Device::cpu, {4}), -1), Error);
}

TEST_F(MpiComm, MpiFailuresNameCallContextAndRank) {
  auto& mpi = dynamic_cast<MpiCommunicator&>(world());
  int value = 0;
  const int bad_peer = mpi.size() + 5;
  try {
    TS_MPI_CHECK(MPI_Send(&value, 1, MPI_INT, bad_peer, 0, mpi.mpi_comm()),
                 "send of 1 i32 element to rank {} on group '{}'", bad_peer, mpi.name());
    ADD_FAILURE() << "MPI accepted a send to rank " << bad_peer;
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::system);
    EXPECT_NE(what.find("MPI: send of 1 i32 element to rank"), std::string::npos) << what;
    EXPECT_NE(what.find("group 'world'"), std::string::npos) << what;
    EXPECT_NE(what.find("MPI_ERR_RANK"), std::string::npos) << what;
    EXPECT_NE(what.find("mpi_test.cpp"), std::string::npos) << what;  // file:line
    if (mpi.size() > 1) {
      EXPECT_EQ(what.rfind(fmt::format("[rank {}] ", world_rank()), 0), 0u) << what;
    }
  }
}

TEST(MpiRuntimeHelpers, RanksAndLauncher) {
  int rank = -1;
  int size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_TRUE(mpi_active());
  EXPECT_EQ(world_rank(), rank);
  EXPECT_EQ(world_size(), size);
  EXPECT_TRUE(launched_by_mpi_launcher());  // mpirun sets OMPI_COMM_WORLD_SIZE
  // ctest runs every rank on one node, so the node-local rank is the world rank.
  EXPECT_EQ(local_rank(), rank);
  EXPECT_EQ(error_rank(), size > 1 ? rank : -1);
}

// Every ordered (tp, dp, pp) with tp * dp * pp = world and every ep dividing dp, under two axis
// orders.
TEST(MpiParallelContext, GroupsOfEveryLayout) {
  const int world = world_size();
  int num_layouts = 0;
  for (const char* order : {"tp-dp-pp", "pp-dp-tp"}) {
    for (int tp = 1; tp <= world; ++tp) {
      for (int pp = 1; tp * pp <= world; ++pp) {
        if (world % (tp * pp) != 0) continue;
        const int dp = world / (tp * pp);
        for (int ep = 1; ep <= dp; ++ep) {  // every expert-parallel split of dp
          if (dp % ep != 0) continue;
          ParallelContext ctx(ParallelSizes{tp, dp, pp, ep}, Device::cpu, order);
          check_groups(ctx, /*device_comms=*/false);
          for (Group g : {Group::world, Group::tp, Group::dp, Group::pp, Group::embedding,
                          Group::model, Group::ep, Group::expert_dp}) {
            EXPECT_EQ(&ctx.comm(g), &ctx.host_comm(g)) << "on the CPU comm() is the MPI group";
          }
          ++num_layouts;
        }
      }
    }
  }
  EXPECT_GE(num_layouts, 2 * 3);  // world 2 has (1,2,1) (2,1,1) (1,1,2) per order
}

TEST(MpiParallelContext, WorldSizeMismatchIsUserError) {
  const int world = world_size();
  try {
    ParallelContext ctx(ParallelSizes{2, world, 1}, Device::cpu);
    ADD_FAILURE() << "tp 2 x dp " << world << " accepted on " << world << " ranks";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_NE(what.find(fmt::format("world size {}", world)), std::string::npos) << what;
    EXPECT_NE(what.find(fmt::format("dp {} x tp 2 x pp 1", world)), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace tessera::testing
