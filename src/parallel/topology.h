// Rank topology: a pure function of (world size, tp/dp/pp sizes, axis order) mapping a global rank
// to its (tp, dp, pp) coordinates and to the ranks it shares each parallel group with.
// No MPI here: communicators are built from these groups elsewhere, so this file can be tested for
// world sizes in the thousands in one process. Expert parallelism is a split of the dp axis (see
// ep_group and expert_dp_group), not an axis of its own.
#pragma once
#include <array>
#include <string>
#include <vector>

namespace tessera {

enum class Axis { tp, dp, pp };
inline constexpr int kNumAxes = 3;

// "tp", "dp" or "pp".
const char* axis_name(Axis axis);

struct ParallelSizes {
  int tp = 1;
  int dp = 1;
  int pp = 1;
  int ep = 1;  // expert-parallel ranks carved out of dp: divides dp
};

struct RankCoord {
  int tp_rank;
  int dp_rank;
  int pp_rank;
  bool operator==(const RankCoord&) const = default;
};

// The order string lists the axes innermost (stride 1) first. With the default "tp-dp-pp",
//   rank = tp_rank + tp * (dp_rank + dp * pp_rank)
// so neighbouring ranks share a tp group (one node's NVLink carries the per-layer all-reduces),
// then data parallel, and pipeline stages are the outermost (cheap P2P can cross nodes).
//
// Worked example: 16 ranks, tp = 2, dp = 4, pp = 2, order "tp-dp-pp".
//
//                 pp stage 0          pp stage 1
//                 tp 0   tp 1         tp 0   tp 1
//        dp 0       0      1            8      9
//        dp 1       2      3           10     11
//        dp 2       4      5           12     13
//        dp 3       6      7           14     15
//
//   tp groups (a row within a stage):     {0,1} {2,3} {4,5} {6,7} {8,9} {10,11} {12,13} {14,15}
//   dp groups (a column within a stage):  {0,2,4,6} {1,3,5,7} {8,10,12,14} {9,11,13,15}
//   pp groups (the same cell per stage):  {0,8} {1,9} {2,10} {3,11} {4,12} {5,13} {6,14} {7,15}
//   e.g. rank 11 = (tp 1, dp 1, pp 1); pipeline_prev(11) = 3, pipeline_next(11) = -1.
// tests/parallel/topology_test.cpp asserts this exact example.
class Topology {
 public:
  // User errors (inconsistent layout): world_size != tp * dp * pp, a size < 1, or an order that
  // is not a permutation of tp, dp, pp joined by '-'.
  Topology(int world_size, ParallelSizes sizes, std::string order = "tp-dp-pp");

  int world_size() const { return world_size_; }
  int size(Axis axis) const { return sizes_[idx(axis)]; }
  const std::string& order() const { return order_; }

  RankCoord coord(int rank) const;
  int rank(RankCoord coord) const;
  int axis_rank(Axis axis, int rank) const;

  // The ranks that share every coordinate with `rank` except `axis`, ordered by their coordinate
  // on `axis` (so group(axis, r)[axis_rank(axis, r)] == r).
  std::vector<int> group(Axis axis, int rank) const;
  // Every group of `axis`, ordered by their smallest rank; each rank is in exactly one.
  std::vector<std::vector<int>> all_groups(Axis axis) const;

  // Expert parallelism (Megatron-Core's layout): a dp group of size dp splits into dp / ep
  // ep groups of ep consecutive dp coordinates, [k ep, (k+1) ep); the expert-data-parallel group
  // of a rank is the dp ranks at its position in their ep groups (dp coordinate = its own mod ep).
  // Experts are sharded over the first and replicated over the second. Both ordered by dp
  // coordinate.
  int ep_size() const { return ep_; }
  std::vector<int> ep_group(int rank) const;
  std::vector<int> expert_dp_group(int rank) const;

  // Neighbouring pipeline stage with the same tp and dp coordinates; -1 past either end.
  int pipeline_next(int rank) const;
  int pipeline_prev(int rank) const;
  bool is_first_stage(int rank) const { return axis_rank(Axis::pp, rank) == 0; }
  bool is_last_stage(int rank) const { return axis_rank(Axis::pp, rank) == size(Axis::pp) - 1; }

 private:
  static int idx(Axis axis) { return static_cast<int>(axis); }
  void check_rank(int rank) const;

  int world_size_;
  int ep_ = 1;
  std::string order_;
  std::array<int, kNumAxes> sizes_;    // indexed by Axis
  std::array<int, kNumAxes> strides_;  // indexed by Axis; the innermost axis has stride 1
};

}  // namespace tessera
