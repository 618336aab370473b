// Rank topology: validation of the layout, order parsing, and the mixed-radix arithmetic behind
// rank <-> (tp, dp, pp) coordinates and group membership. Pure: no MPI, no globals.
#include "parallel/topology.h"

#include <cstdint>
#include <utility>

#include "core/error.h"

namespace tessera {

namespace {

constexpr std::array<Axis, kNumAxes> kAllAxes = {Axis::tp, Axis::dp, Axis::pp};

// Splits "tp-dp-pp" into axes, innermost first. Any other token, a repeat or a missing axis is a
// user error naming the whole string.
std::array<Axis, kNumAxes> parse_order(const std::string& order) {
  const auto bad = [&order]() {
    TS_USER_ERROR(
        "parallel layout: order '{}' must list each of tp, dp, pp exactly once, innermost first, "
        "joined by '-' (e.g. 'tp-dp-pp')",
        order);
  };
  std::array<Axis, kNumAxes> axes{};
  std::array<bool, kNumAxes> seen{};
  int num_tokens = 0;
  size_t begin = 0;
  while (true) {
    const size_t end = order.find('-', begin);
    const std::string token = order.substr(begin, end == std::string::npos ? end : end - begin);
    bool matched = false;
    for (Axis axis : kAllAxes) {
      if (token == axis_name(axis)) {
        const int a = static_cast<int>(axis);
        if (seen[a] || num_tokens >= kNumAxes) bad();
        seen[a] = true;
        axes[num_tokens++] = axis;
        matched = true;
      }
    }
    if (!matched) bad();
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  if (num_tokens != kNumAxes) bad();
  return axes;
}

}  // namespace

const char* axis_name(Axis axis) {
  switch (axis) {
    case Axis::tp: return "tp";
    case Axis::dp: return "dp";
    case Axis::pp: return "pp";
  }
  TS_BUG("unknown Axis value {}", static_cast<int>(axis));
}

Topology::Topology(int world_size, ParallelSizes sizes, std::string order)
    : world_size_(world_size), order_(std::move(order)) {
  sizes_[idx(Axis::tp)] = sizes.tp;
  sizes_[idx(Axis::dp)] = sizes.dp;
  sizes_[idx(Axis::pp)] = sizes.pp;
  for (Axis axis : kAllAxes) {
    if (size(axis) < 1) {
      TS_USER_ERROR("parallel layout: {} = {} must be >= 1", axis_name(axis), size(axis));
    }
  }
  // 64-bit product: three int sizes can overflow int before the comparison.
  const int64_t product = int64_t{sizes.dp} * sizes.tp * sizes.pp;
  if (world_size < 1 || product != world_size) {
    TS_USER_ERROR("parallel layout: world size {} != dp {} x tp {} x pp {} = {}", world_size,
                  sizes.dp, sizes.tp, sizes.pp, product);
  }
  ep_ = sizes.ep;
  if (ep_ < 1 || sizes.dp % ep_ != 0)
    TS_USER_ERROR("parallel layout: ep = {} must be >= 1 and divide dp = {}", ep_, sizes.dp);
  const std::array<Axis, kNumAxes> axes = parse_order(order_);
  int stride = 1;
  for (Axis axis : axes) {
    strides_[idx(axis)] = stride;
    stride *= size(axis);
  }
  TS_CHECK(stride == world_size_, "strides end at {} for world size {}", stride, world_size_);
}

void Topology::check_rank(int rank) const {
  TS_CHECK(rank >= 0 && rank < world_size_, "rank {} outside world of size {}", rank, world_size_);
}

int Topology::axis_rank(Axis axis, int rank) const {
  check_rank(rank);
  return (rank / strides_[idx(axis)]) % size(axis);
}

RankCoord Topology::coord(int rank) const {
  return RankCoord{axis_rank(Axis::tp, rank), axis_rank(Axis::dp, rank), axis_rank(Axis::pp, rank)};
}

int Topology::rank(RankCoord c) const {
  const std::array<int, kNumAxes> values = {c.tp_rank, c.dp_rank, c.pp_rank};
  int result = 0;
  for (Axis axis : kAllAxes) {
    const int v = values[idx(axis)];
    TS_CHECK(v >= 0 && v < size(axis), "{} coordinate {} outside [0, {})", axis_name(axis), v,
             size(axis));
    result += v * strides_[idx(axis)];
  }
  return result;
}

std::vector<int> Topology::group(Axis axis, int rank) const {
  const int stride = strides_[idx(axis)];
  // The member with coordinate 0 on `axis`; the others follow at multiples of the stride.
  const int base = rank - axis_rank(axis, rank) * stride;
  std::vector<int> members(size(axis));
  for (int i = 0; i < size(axis); ++i) members[i] = base + i * stride;
  return members;
}

std::vector<std::vector<int>> Topology::all_groups(Axis axis) const {
  std::vector<std::vector<int>> groups;
  groups.reserve(world_size_ / size(axis));
  // A group's smallest rank is its member at coordinate 0, so scanning ranks in increasing order
  // and keeping those emits each group once, sorted by smallest rank.
  for (int r = 0; r < world_size_; ++r) {
    if (axis_rank(axis, r) == 0) groups.push_back(group(axis, r));
  }
  return groups;
}

int Topology::pipeline_next(int rank) const {
  return is_last_stage(rank) ? -1 : rank + strides_[idx(Axis::pp)];
}

int Topology::pipeline_prev(int rank) const {
  return is_first_stage(rank) ? -1 : rank - strides_[idx(Axis::pp)];
}

std::vector<int> Topology::ep_group(int rank) const {
  const std::vector<int> dp = group(Axis::dp, rank);
  const int first = axis_rank(Axis::dp, rank) / ep_ * ep_;
  return std::vector<int>(dp.begin() + first, dp.begin() + first + ep_);
}

std::vector<int> Topology::expert_dp_group(int rank) const {
  const std::vector<int> dp = group(Axis::dp, rank);
  std::vector<int> out;
  for (size_t d = size_t(axis_rank(Axis::dp, rank) % ep_); d < dp.size(); d += size_t(ep_))
    out.push_back(dp[d]);
  return out;
}

}  // namespace tessera
