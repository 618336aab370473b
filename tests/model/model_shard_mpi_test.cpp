// The tensor-parallel conjugate mappings of model/model_shard.h under mpirun (the tp group is
// the world): forward and backward are adjoint, <bwd(g), x> = <g, fwd(x)> summed over the ranks
// where the tensors are per-rank (Megatron's mappings.py pairs); the async backward equals the
// sync one bit for bit; and with tp = 1 every mapping leaves its tensor alone.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/model_shard.h"
#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"

namespace tessera {
namespace {

class TpMappings : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ctx_ = new ParallelContext(ParallelSizes{world_size(), 1, 1}, Device::cpu);
  }
  static void TearDownTestSuite() {
    delete ctx_;
    ctx_ = nullptr;
  }
  // A tp shard over the whole world (the mappings only read tp_size and tp_comm).
  static ModelShard shard() {
    ModelShard s;
    s.tp_size = ctx_->comm(Group::tp).size();
    s.tp_rank = ctx_->comm(Group::tp).rank();
    s.tp_comm = &ctx_->comm(Group::tp);
    return s;
  }
  static double sum_over_ranks(double x) {
    return ctx_->host_comm(Group::world).all_reduce_scalar(x, ReduceOp::sum);
  }
  static ParallelContext* ctx_;
};
ParallelContext* TpMappings::ctx_ = nullptr;

// Random values of odd length (not a multiple of any vector width); `seed` the same on every rank
// gives a replicated tensor, a rank-dependent seed a per-rank one.
std::vector<double> random_values(uint64_t seed, int64_t n = 1031) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}
Tensor view(std::vector<double>& v) {
  return Tensor(v.data(), DType::f64, Device::cpu, {int64_t(v.size())});
}
double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// copy_to_tp_region: x replicated -> a copy on every rank; adjoint: per-rank g -> sum over ranks.
TEST_F(TpMappings, CopyToTpRegionIsAdjoint) {
  const ModelShard s = shard();
  std::vector<double> x = random_values(11);                         // replicated
  std::vector<double> g = random_values(100 + uint64_t(s.tp_rank));  // per rank
  std::vector<double> fx = x;
  copy_to_tp_region_forward(s, view(fx));
  EXPECT_EQ(fx, x) << "forward is the identity";
  const double rhs = sum_over_ranks(dot(g, fx));  // sum_r <g_r, F(x)_r>
  std::vector<double> bg = g;
  copy_to_tp_region_backward(s, view(bg));
  const double lhs = dot(bg, x);  // <F*(g), x>: the same on every rank
  EXPECT_NEAR(lhs, rhs, 1e-9 * std::max(1.0, std::fabs(rhs)));
  // The backward is replicated: every rank holds the same sum.
  EXPECT_EQ(sum_over_ranks(bg[7]), bg[7] * s.tp_size);
}

// reduce_from_tp_region: per-rank y -> sum, replicated; adjoint: replicated g -> g on every rank.
TEST_F(TpMappings, ReduceFromTpRegionIsAdjoint) {
  const ModelShard s = shard();
  std::vector<double> y = random_values(200 + uint64_t(s.tp_rank));  // per rank
  std::vector<double> g = random_values(12);                         // replicated
  std::vector<double> fy = y;
  reduce_from_tp_region_forward(s, view(fy));
  const double lhs = dot(fy, g);  // <R(y), g>
  std::vector<double> bg = g;
  reduce_from_tp_region_backward(s, view(bg));
  EXPECT_EQ(bg, g) << "backward is the identity";
  const double rhs = sum_over_ranks(dot(y, bg));  // sum_r <y_r, R*(g)_r>
  EXPECT_NEAR(lhs, rhs, 1e-9 * std::max(1.0, std::fabs(rhs)));
}

// The pair composes: a column-parallel -> row-parallel block's input gradient is the sum of the
// ranks' partial gradients, which the async all-reduce forms exactly like the sync one.
TEST_F(TpMappings, AsyncBackwardEqualsSyncBitForBit) {
  const ModelShard s = shard();
  std::vector<double> a = random_values(300 + uint64_t(s.tp_rank)), b = a;
  copy_to_tp_region_backward(s, view(a));
  CommHandle h = copy_to_tp_region_backward_async(s, view(b));
  if (s.tp_size > 1) {
    ASSERT_TRUE(h);
    h->wait();
  } else {
    EXPECT_FALSE(h);
  }
  EXPECT_EQ(a, b);
}

TEST(TpMappingsSingle, EveryMappingIsANoOpWithOneRank) {
  const ModelShard s;  // tp_size 1, no communicator
  std::vector<double> x = random_values(5), y = x;
  copy_to_tp_region_forward(s, view(y));
  copy_to_tp_region_backward(s, view(y));
  reduce_from_tp_region_forward(s, view(y));
  reduce_from_tp_region_backward(s, view(y));
  EXPECT_FALSE(copy_to_tp_region_backward_async(s, view(y)));
  EXPECT_EQ(x, y);
}

}  // namespace
}  // namespace tessera
