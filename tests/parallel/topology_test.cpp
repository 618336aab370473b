// Rank topology without MPI: the 16-rank worked example from topology.h, every factorization of
// 1..64 under all six orders, partition properties for worlds of thousands of ranks, pipeline
// neighbours, and the user errors for inconsistent layouts.
#include "parallel/topology.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"

namespace tessera {
namespace {

using Groups = std::vector<std::vector<int>>;

constexpr std::array<Axis, 3> kAxes = {Axis::tp, Axis::dp, Axis::pp};
const std::vector<std::string> kOrders = {"tp-dp-pp", "tp-pp-dp", "dp-tp-pp",
                                          "dp-pp-tp", "pp-tp-dp", "pp-dp-tp"};

int coord_on(const RankCoord& c, Axis axis) {
  return axis == Axis::tp ? c.tp_rank : axis == Axis::dp ? c.dp_rank : c.pp_rank;
}

Axis axis_from_name(const std::string& name) {
  for (Axis a : kAxes) {
    if (name == axis_name(a)) return a;
  }
  ADD_FAILURE() << "bad axis name " << name;
  return Axis::tp;
}

// Reference layout by enumeration, independent of the division arithmetic in topology.cpp:
// nested loops with the order's last axis outermost, handing out consecutive ranks.
std::vector<RankCoord> enumerate_coords(ParallelSizes s, const std::string& order) {
  const Axis inner = axis_from_name(order.substr(0, 2));
  const Axis middle = axis_from_name(order.substr(3, 2));
  const Axis outer = axis_from_name(order.substr(6, 2));
  const auto size_of = [&s](Axis a) { return a == Axis::tp ? s.tp : a == Axis::dp ? s.dp : s.pp; };
  std::vector<RankCoord> coords;
  for (int o = 0; o < size_of(outer); ++o) {
    for (int m = 0; m < size_of(middle); ++m) {
      for (int i = 0; i < size_of(inner); ++i) {
        std::array<int, 3> v{};
        v[static_cast<int>(outer)] = o;
        v[static_cast<int>(middle)] = m;
        v[static_cast<int>(inner)] = i;
        coords.push_back(RankCoord{v[0], v[1], v[2]});
      }
    }
  }
  return coords;
}

// Members of `group` share every coordinate but `axis` and are ordered by their `axis`
// coordinate 0, 1, ..., size - 1.
void expect_valid_group(const Topology& topo, Axis axis, const std::vector<int>& group) {
  ASSERT_EQ(static_cast<int>(group.size()), topo.size(axis)) << axis_name(axis);
  const RankCoord first = topo.coord(group[0]);
  for (int i = 0; i < static_cast<int>(group.size()); ++i) {
    const RankCoord c = topo.coord(group[i]);
    EXPECT_EQ(coord_on(c, axis), i) << axis_name(axis) << " member " << group[i];
    for (Axis other : kAxes) {
      if (other != axis) {
        EXPECT_EQ(coord_on(c, other), coord_on(first, other))
            << axis_name(axis) << " group member " << group[i] << " differs on "
            << axis_name(other);
      }
    }
  }
}

// all_groups(axis) partitions [0, world): each rank once, groups valid, sorted by smallest rank,
// and each rank's group(axis, r) is the one it appears in.
void expect_partition(const Topology& topo, Axis axis) {
  const Groups groups = topo.all_groups(axis);
  ASSERT_EQ(static_cast<int>(groups.size()), topo.world_size() / topo.size(axis));
  std::vector<int> owner(topo.world_size(), -1);
  for (int g = 0; g < static_cast<int>(groups.size()); ++g) {
    expect_valid_group(topo, axis, groups[g]);
    if (g > 0) {
      EXPECT_LT(groups[g - 1][0], groups[g][0]);
    }
    for (int r : groups[g]) {
      ASSERT_GE(r, 0);
      ASSERT_LT(r, topo.world_size());
      EXPECT_EQ(owner[r], -1) << "rank " << r << " in two " << axis_name(axis) << " groups";
      owner[r] = g;
    }
  }
  for (int r = 0; r < topo.world_size(); ++r) {
    ASSERT_NE(owner[r], -1) << "rank " << r << " in no " << axis_name(axis) << " group";
    EXPECT_EQ(topo.group(axis, r), groups[owner[r]]) << axis_name(axis) << " rank " << r;
  }
}

TEST(Topology, WorkedExampleFromHeader) {
  const Topology topo(16, ParallelSizes{.tp = 2, .dp = 4, .pp = 2});
  EXPECT_EQ(topo.order(), "tp-dp-pp");
  EXPECT_EQ(topo.all_groups(Axis::tp),
            (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(topo.all_groups(Axis::dp),
            (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
  EXPECT_EQ(topo.all_groups(Axis::pp),
            (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  // The grid in the header: row dp, column tp, block pp.
  const int grid[2][4][2] = {{{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                             {{8, 9}, {10, 11}, {12, 13}, {14, 15}}};
  for (int p = 0; p < 2; ++p) {
    for (int d = 0; d < 4; ++d) {
      for (int t = 0; t < 2; ++t) {
        EXPECT_EQ(topo.rank(RankCoord{t, d, p}), grid[p][d][t]);
        EXPECT_EQ(topo.coord(grid[p][d][t]), (RankCoord{t, d, p}));
      }
    }
  }
  EXPECT_EQ(topo.coord(11), (RankCoord{1, 1, 1}));
  EXPECT_EQ(topo.group(Axis::dp, 11), (std::vector<int>{9, 11, 13, 15}));
  EXPECT_EQ(topo.pipeline_prev(11), 3);
  EXPECT_EQ(topo.pipeline_next(11), -1);
  EXPECT_EQ(topo.pipeline_next(3), 11);
  EXPECT_EQ(topo.pipeline_prev(3), -1);
}

TEST(Topology, NonDefaultOrderSmallExample) {
  // "tp-pp-dp": rank = tp_rank + 2 * (pp_rank + 2 * dp_rank).
  const Topology topo(8, ParallelSizes{.tp = 2, .dp = 2, .pp = 2}, "tp-pp-dp");
  EXPECT_EQ(topo.all_groups(Axis::tp), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(topo.all_groups(Axis::pp), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(topo.all_groups(Axis::dp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(topo.coord(6), (RankCoord{0, 1, 1}));
}

TEST(Topology, EveryFactorizationUpTo64AllOrders) {
  int num_layouts = 0;
  for (int world = 1; world <= 64; ++world) {
    for (int tp = 1; tp <= world; ++tp) {
      if (world % tp != 0) continue;
      for (int dp = 1; dp <= world / tp; ++dp) {
        if ((world / tp) % dp != 0) continue;
        const ParallelSizes sizes{.tp = tp, .dp = dp, .pp = world / tp / dp};
        for (const std::string& order : kOrders) {
          SCOPED_TRACE(testing::Message() << "world " << world << " tp " << tp << " dp " << dp
                                          << " pp " << sizes.pp << " order " << order);
          const Topology topo(world, sizes, order);
          const std::vector<RankCoord> expected = enumerate_coords(sizes, order);
          ASSERT_EQ(static_cast<int>(expected.size()), world);
          for (int r = 0; r < world; ++r) {
            const RankCoord c = topo.coord(r);
            ASSERT_EQ(c, expected[r]) << "rank " << r;
            ASSERT_EQ(topo.rank(c), r);
            for (Axis a : kAxes) ASSERT_EQ(topo.axis_rank(a, r), coord_on(c, a));
          }
          for (Axis a : kAxes) expect_partition(topo, a);
          if (HasFatalFailure() || HasNonfatalFailure()) return;
          ++num_layouts;
        }
      }
    }
  }
  // Sum over world in 1..64 of the ordered 3-factorizations of world, times 6 orders.
  EXPECT_EQ(num_layouts, 6 * 796);
}

TEST(Topology, PipelineNeighbours) {
  for (const std::string& order : kOrders) {
    const Topology topo(24, ParallelSizes{.tp = 2, .dp = 3, .pp = 4}, order);
    for (int r = 0; r < 24; ++r) {
      const RankCoord c = topo.coord(r);
      EXPECT_EQ(topo.is_first_stage(r), c.pp_rank == 0);
      EXPECT_EQ(topo.is_last_stage(r), c.pp_rank == 3);
      const int next = topo.pipeline_next(r);
      const int prev = topo.pipeline_prev(r);
      if (c.pp_rank == 3) {
        EXPECT_EQ(next, -1);
      } else {
        EXPECT_EQ(topo.coord(next), (RankCoord{c.tp_rank, c.dp_rank, c.pp_rank + 1}));
        EXPECT_EQ(topo.pipeline_prev(next), r);
      }
      if (c.pp_rank == 0) {
        EXPECT_EQ(prev, -1);
      } else {
        EXPECT_EQ(topo.coord(prev), (RankCoord{c.tp_rank, c.dp_rank, c.pp_rank - 1}));
      }
    }
  }
  const Topology single_stage(4, ParallelSizes{.tp = 2, .dp = 2, .pp = 1});
  for (int r = 0; r < 4; ++r) {
    EXPECT_TRUE(single_stage.is_first_stage(r));
    EXPECT_TRUE(single_stage.is_last_stage(r));
    EXPECT_EQ(single_stage.pipeline_next(r), -1);
    EXPECT_EQ(single_stage.pipeline_prev(r), -1);
  }
}

TEST(Topology, HugeWorldsWithoutMpi) {
  struct Case {
    int world;
    ParallelSizes sizes;
  };
  const Case cases[] = {{4096, {.tp = 8, .dp = 64, .pp = 8}},
                        {16384, {.tp = 8, .dp = 256, .pp = 8}},
                        {16384, {.tp = 4, .dp = 128, .pp = 32}}};
  for (const Case& k : cases) {
    for (const std::string& order : {std::string("tp-dp-pp"), std::string("pp-dp-tp")}) {
      SCOPED_TRACE(testing::Message() << "world " << k.world << " order " << order);
      const Topology topo(k.world, k.sizes, order);
      for (Axis a : kAxes) expect_partition(topo, a);
      // A deterministic sample of ranks, ends included: round trip and group validity.
      for (int r = 0; r < k.world; r += 997) {
        for (int s : {r, k.world - 1 - r}) {
          EXPECT_EQ(topo.rank(topo.coord(s)), s);
          for (Axis a : kAxes) {
            const std::vector<int> g = topo.group(a, s);
            expect_valid_group(topo, a, g);
            EXPECT_EQ(g[topo.axis_rank(a, s)], s);
          }
        }
      }
    }
  }
  // Default order keeps a tp group on consecutive ranks (one node's NVLink domain).
  const Topology topo(16384, ParallelSizes{.tp = 8, .dp = 256, .pp = 8});
  EXPECT_EQ(topo.group(Axis::tp, 16383),
            (std::vector<int>{16376, 16377, 16378, 16379, 16380, 16381, 16382, 16383}));
}

// Runs `make` and returns the user error's message; fails the test if nothing or another tier
// was thrown.
template <typename F>
std::string user_error_message(F make) {
  try {
    make();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

TEST(Topology, BadLayoutsAreUserErrors) {
  std::string msg =
      user_error_message([] { Topology(6, ParallelSizes{.tp = 2, .dp = 2, .pp = 2}); });
  EXPECT_NE(msg.find("world size 6 != dp 2 x tp 2 x pp 2 = 8"), std::string::npos) << msg;

  msg = user_error_message([] { Topology(4096, ParallelSizes{.tp = 8, .dp = 64, .pp = 4}); });
  EXPECT_NE(msg.find("4096"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2048"), std::string::npos) << msg;

  // The product overflows int; it must still be reported, not wrap to a match.
  msg = user_error_message([] { Topology(0, ParallelSizes{.tp = 65536, .dp = 65536, .pp = 1}); });
  EXPECT_NE(msg.find("4294967296"), std::string::npos) << msg;

  msg = user_error_message([] { Topology(4, ParallelSizes{.tp = 0, .dp = 4, .pp = 1}); });
  EXPECT_NE(msg.find("tp = 0"), std::string::npos) << msg;
  msg = user_error_message([] { Topology(4, ParallelSizes{.tp = 4, .dp = 1, .pp = -1}); });
  EXPECT_NE(msg.find("pp = -1"), std::string::npos) << msg;
  msg = user_error_message([] { Topology(6, ParallelSizes{.tp = 1, .dp = 6, .pp = 1, .ep = 4}); });
  EXPECT_NE(msg.find("ep = 4 must be >= 1 and divide dp = 6"), std::string::npos) << msg;

  for (const std::string bad :
       {"tp-dp", "tp-tp-pp", "tp-dp-ep", "", "tp-dp-pp-", "tp,dp,pp", "tp-dp-pp-tp", "TP-DP-PP"}) {
    msg =
        user_error_message([&bad] { Topology(8, ParallelSizes{.tp = 2, .dp = 2, .pp = 2}, bad); });
    EXPECT_NE(msg.find("'" + bad + "'"), std::string::npos) << msg;
  }
}

// 16 ranks, tp 2, dp 4, pp 2 (the header's worked example) with ep 2: dp group {0,2,4,6} splits
// into ep groups {0,2} {4,6} and expert-dp groups {0,4} {2,6}.
TEST(Topology, ExpertParallelGroupsSplitDp) {
  const Topology t(16, ParallelSizes{.tp = 2, .dp = 4, .pp = 2, .ep = 2});
  EXPECT_EQ(t.ep_size(), 2);
  EXPECT_EQ(t.ep_group(0), (std::vector<int>{0, 2}));
  EXPECT_EQ(t.ep_group(6), (std::vector<int>{4, 6}));
  EXPECT_EQ(t.expert_dp_group(2), (std::vector<int>{2, 6}));
  EXPECT_EQ(t.expert_dp_group(4), (std::vector<int>{0, 4}));
  EXPECT_EQ(t.ep_group(11), (std::vector<int>{9, 11}));  // tp 1, dp 1, pp 1
  EXPECT_EQ(t.expert_dp_group(11), (std::vector<int>{11, 15}));
}

// Every rank of every layout up to 64 ranks with every ep dividing dp: the ep groups partition
// each dp group into dp / ep blocks of ep, the expert-dp groups into ep strided sets of dp / ep,
// and an ep group and an expert-dp group meet in exactly the rank itself.
TEST(Topology, ExpertParallelGroupsPartitionEveryDpGroup) {
  for (int world = 1; world <= 64; ++world)
    for (int tp = 1; tp <= world; ++tp)
      for (int pp = 1; tp * pp <= world; ++pp) {
        if (world % (tp * pp) != 0) continue;
        const int dp = world / (tp * pp);
        for (int ep = 1; ep <= dp; ++ep) {
          if (dp % ep != 0) continue;
          const Topology t(world, ParallelSizes{.tp = tp, .dp = dp, .pp = pp, .ep = ep});
          for (int r = 0; r < world; ++r) {
            const std::vector<int> e = t.ep_group(r), x = t.expert_dp_group(r);
            ASSERT_EQ(int(e.size()), ep);
            ASSERT_EQ(int(x.size()), dp / ep);
            const std::vector<int> d = t.group(Axis::dp, r);
            for (int m : e) ASSERT_NE(std::find(d.begin(), d.end(), m), d.end());
            for (int m : x) ASSERT_NE(std::find(d.begin(), d.end(), m), d.end());
            std::vector<int> both;
            for (int m : e)
              if (std::find(x.begin(), x.end(), m) != x.end()) both.push_back(m);
            ASSERT_EQ(both, std::vector<int>{r}) << "world " << world << " ep " << ep;
            ASSERT_EQ(t.ep_group(e.back()), e);  // the same group seen from another member
            ASSERT_EQ(t.expert_dp_group(x.back()), x);
          }
        }
      }
}

TEST(Topology, OutOfRangeRankIsABug) {
  const Topology topo(8, ParallelSizes{.tp = 2, .dp = 2, .pp = 2});
  for (int bad : {-1, 8}) {
    try {
      topo.coord(bad);
      ADD_FAILURE() << "no error for rank " << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bug);
    }
  }
  try {
    topo.rank(RankCoord{2, 0, 0});
    ADD_FAILURE() << "no error for tp coordinate 2";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bug);
  }
}

}  // namespace
}  // namespace tessera
