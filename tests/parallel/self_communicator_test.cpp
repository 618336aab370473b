// Without MPI: the one-rank SelfCommunicator and ParallelContext::single (serial runs), the
// 16-bit reductions behind the MPI ops (rounding and bitwise commutativity), and group_ranks on
// the worked example of topology.h.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/memory.h"
#include "parallel/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "parallel/self_communicator.h"

namespace tessera {
namespace {

constexpr Group kAllGroups[] = {Group::world, Group::tp,        Group::dp,
                                Group::pp,    Group::embedding, Group::model};

TEST(SelfCommunicator, SingleContextIsOneRankEverywhere) {
  std::unique_ptr<ParallelContext> ctx = ParallelContext::single(Device::cpu);
  EXPECT_EQ(ctx->rank(), 0);
  EXPECT_EQ(ctx->world_size(), 1);
  EXPECT_EQ(ctx->coord(), (RankCoord{0, 0, 0}));
  EXPECT_EQ(ctx->device(), Device::cpu);
  for (Group g : kAllGroups) {
    EXPECT_EQ(ctx->comm(g).size(), 1);
    EXPECT_EQ(ctx->comm(g).rank(), 0);
    EXPECT_EQ(ctx->comm(g).name(), group_name(g));
    EXPECT_EQ(&ctx->comm(g), &ctx->host_comm(g));
  }
}

TEST(SelfCommunicator, CollectivesAreIdentityOrCopies) {
  SelfCommunicator c(Device::cpu, "dp");
  std::vector<float> a = {1.5f, -2.0f, 3.25f};
  std::vector<float> b(3, 0.0f);
  const Tensor ta(a.data(), DType::f32, Device::cpu, {3});
  const Tensor tb(b.data(), DType::f32, Device::cpu, {3});
  c.all_reduce(ta, ReduceOp::sum);
  EXPECT_EQ(a, (std::vector<float>{1.5f, -2.0f, 3.25f}));
  c.reduce_scatter(tb, ta, ReduceOp::max);
  EXPECT_EQ(b, a);
  std::fill(b.begin(), b.end(), 0.0f);
  c.all_gather(tb, ta);
  EXPECT_EQ(b, a);
  c.reduce_scatter(ta, ta, ReduceOp::sum);  // in place: the one chunk is the whole tensor
  c.all_gather(ta, ta);
  EXPECT_EQ(a, (std::vector<float>{1.5f, -2.0f, 3.25f}));
  c.broadcast(ta, 0);
  c.barrier();
  EXPECT_EQ(c.all_reduce_scalar(2.5, ReduceOp::sum), 2.5);
  std::fill(b.begin(), b.end(), 0.0f);
  c.all_to_all_v(tb, {3}, ta, {3});
  EXPECT_EQ(b, a);
}

TEST(SelfCommunicator, PointToPointAndBadArgumentsAreBugs) {
  SelfCommunicator c(Device::cpu, "pp");
  std::vector<float> a(4);
  const Tensor t(a.data(), DType::f32, Device::cpu, {4});
  const auto expect_bug = [](auto&& f, const char* what) {
    try {
      f();
      ADD_FAILURE() << what << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bug) << what << ": " << e.what();
    }
  };
  expect_bug([&] { c.send(t, 0, 0); }, "send on a one-rank group");
  expect_bug([&] { c.recv(t, 0, 0); }, "recv on a one-rank group");
  expect_bug([&] { c.broadcast(t, 1); }, "broadcast from root 1");
  expect_bug([&] { c.reduce_scatter(t.slice(0, 3), t, ReduceOp::sum); }, "reduce_scatter 4 -> 3");
  std::vector<float> o(4);
  const Tensor to(o.data(), DType::f32, Device::cpu, {4});
  expect_bug([&] { c.all_to_all_v(to, {4}, t, {3}); }, "all_to_all_v counts that miss the input");
  expect_bug([&] { c.all_to_all_v(to, {4, 0}, t, {4, 0}); }, "all_to_all_v with two counts");
  expect_bug([&] { c.all_to_all_v(to.slice(0, 3), {3}, t, {4}); }, "all_to_all_v 4 -> 3");
  expect_bug([&] { c.all_to_all_v(t, {4}, t, {4}); }, "all_to_all_v in place");
  std::vector<int8_t> bytes(4);
  expect_bug(
      [&] { c.all_reduce(Tensor(bytes.data(), DType::i8, Device::cpu, {4}), ReduceOp::sum); },
      "all_reduce of i8");
  expect_bug([&] { c.all_reduce(Tensor(a.data(), DType::f32, Device::cuda, {4}), ReduceOp::sum); },
             "a cuda tensor on a cpu communicator");
}

TEST(SelfCommunicator, CudaSingleContextCopiesOnTheDevice) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible";
  std::unique_ptr<ParallelContext> ctx = ParallelContext::single(Device::cuda);
  Communicator& c = ctx->comm(Group::dp);
  EXPECT_EQ(c.device(), Device::cuda);
  EXPECT_EQ(ctx->host_comm(Group::dp).device(), Device::cpu);
  const std::vector<float> host = {1.0f, 2.0f, 3.0f};
  Buffer in(Device::cuda, 12);
  Buffer out(Device::cuda, 12);
  copy_bytes(in.data(), Device::cuda, host.data(), Device::cpu, 12);
  c.all_gather(Tensor(out.data(), DType::f32, Device::cuda, {3}),
               Tensor(in.data(), DType::f32, Device::cuda, {3}));
  std::vector<float> back(3);
  copy_bytes(back.data(), Device::cpu, out.data(), Device::cuda, 12);
  EXPECT_EQ(back, host);
  EXPECT_EQ(c.all_reduce_scalar(4.0, ReduceOp::max), 4.0);
}

// The MPI ops for bf16/f16 must round exactly like one f32 addition rounded to nearest even,
// and be commutative bit for bit (MPI may swap operands between ranks).
TEST(Reduce16Bit, SumRoundsOnceAndMaxIsExactAndCommutative) {
  std::mt19937 rng(7);
  std::vector<uint16_t> specials = {0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001,
                                    0x8001, 0x3F80, 0xBF80, 0x7C00, 0xFC00, 0x7E00, 0x3C00};
  for (bool bf16 : {true, false}) {
    const auto to_f32 = bf16 ? bf16_bits_to_f32 : f16_bits_to_f32;
    const auto from_f32 = bf16 ? f32_to_bf16_bits : f32_to_f16_bits;
    const auto reduce = bf16 ? reduce_bf16 : reduce_f16;
    std::vector<uint16_t> x, y;
    for (uint16_t a : specials) {
      for (uint16_t b : specials) {
        x.push_back(a);
        y.push_back(b);
      }
    }
    for (int i = 0; i < 20000; ++i) {
      x.push_back(static_cast<uint16_t>(rng()));
      y.push_back(static_cast<uint16_t>(rng()));
    }
    const int64_t n = static_cast<int64_t>(x.size());
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      std::vector<uint16_t> xy = y, yx = x;
      reduce(x.data(), xy.data(), n, op);  // y op= x
      reduce(y.data(), yx.data(), n, op);  // x op= y
      int bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float a = to_f32(x[i]);
        const float b = to_f32(y[i]);
        if (std::isnan(a + b) && op == ReduceOp::sum) {
          bad += !std::isnan(to_f32(xy[i]));  // NaN payloads may differ for sums
          continue;
        }
        uint16_t want;
        if (op == ReduceOp::sum) {
          want = from_f32(a + b);
        } else if (std::isnan(a) || std::isnan(b)) {
          want = bf16 ? 0x7FC0 : 0x7E00;
        } else if (a == b) {
          // Equal non-zero values have equal bits; of two zeros, +0 wins (IEEE maximum).
          want = a == 0 && std::signbit(a) ? y[i] : x[i];
        } else {
          want = a > b ? x[i] : y[i];
        }
        bad += xy[i] != want || yx[i] != xy[i];
        if (bad == 1 && (xy[i] != want || yx[i] != xy[i])) {
          ADD_FAILURE() << (bf16 ? "bf16 " : "f16 ") << reduce_op_name(op) << " of " << x[i]
                        << " and " << y[i] << ": got " << xy[i] << " / " << yx[i] << ", want "
                        << want;
        }
      }
      EXPECT_EQ(bad, 0) << (bf16 ? "bf16 " : "f16 ") << reduce_op_name(op);
    }
  }
}

// group_ranks on the 16-rank worked example of topology.h (tp 2, dp 4, pp 2, "tp-dp-pp").
TEST(GroupRanks, WorkedExample) {
  const Topology topo(16, ParallelSizes{2, 4, 2});
  EXPECT_EQ(group_ranks(topo, Group::tp, 11), (std::vector<int>{10, 11}));
  EXPECT_EQ(group_ranks(topo, Group::dp, 11), (std::vector<int>{9, 11, 13, 15}));
  EXPECT_EQ(group_ranks(topo, Group::pp, 11), (std::vector<int>{3, 11}));
  EXPECT_EQ(group_ranks(topo, Group::embedding, 11), (std::vector<int>{3, 11}));
  EXPECT_EQ(group_ranks(topo, Group::model, 11), (std::vector<int>{2, 3, 10, 11}));
  EXPECT_EQ(group_ranks(topo, Group::world, 11).size(), 16u);
  // pp = 4: the middle stages are alone in their embedding group.
  const Topology deep(8, ParallelSizes{1, 2, 4});
  EXPECT_EQ(group_ranks(deep, Group::embedding, 0), (std::vector<int>{0, 6}));
  EXPECT_EQ(group_ranks(deep, Group::embedding, 6), (std::vector<int>{0, 6}));
  EXPECT_EQ(group_ranks(deep, Group::embedding, 2), (std::vector<int>{2}));
  EXPECT_EQ(group_ranks(deep, Group::embedding, 5), (std::vector<int>{5}));
  // pp = 1: the rank alone.
  EXPECT_EQ(group_ranks(Topology(4, ParallelSizes{2, 2, 1}), Group::embedding, 3),
            (std::vector<int>{3}));
}

}  // namespace
}  // namespace tessera
