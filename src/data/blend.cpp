// The periodic blend schedule (rules and guarantee in blend.h).
#include "data/blend.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace tessera {

namespace {

// How close w * P must be to a whole number to count as one (the normalised weights carry the
// rounding of a division, ~1e-16 relative).
constexpr double kWholeTolerance = 1e-9;

std::vector<double> normalised(const std::vector<double>& weights,
                               const std::vector<std::string>& names) {
  if (weights.empty()) TS_USER_ERROR("data blend: no datasets given");
  double sum = 0.0;
  for (size_t d = 0; d < weights.size(); ++d) {
    if (!std::isfinite(weights[d]) || weights[d] <= 0.0)
      TS_USER_ERROR("data blend: weight {} of {} must be a positive number", weights[d],
                    d < names.size() ? names[d] : std::to_string(d));
    sum += weights[d];
  }
  std::vector<double> w(weights.size());
  for (size_t d = 0; d < w.size(); ++d) w[d] = weights[d] / sum;
  return w;
}

// The smallest period in which every share is whole, or 0 when none is <= kMaxBlendPeriod.
int64_t exact_period(const std::vector<double>& w) {
  for (int64_t p = 1; p <= kMaxBlendPeriod; ++p) {
    bool whole = true;
    for (const double x : w)
      whole = whole && std::abs(x * double(p) - std::round(x * double(p))) <= kWholeTolerance;
    if (whole) return p;
  }
  return 0;
}

// q_d = w_d * P by largest remainders (ties to the lower index), summing to P.
std::vector<int64_t> apportion(const std::vector<double>& w, int64_t period) {
  std::vector<int64_t> q(w.size());
  std::vector<size_t> order(w.size());
  int64_t given = 0;
  for (size_t d = 0; d < w.size(); ++d) {
    q[d] = int64_t(std::floor(w[d] * double(period)));
    given += q[d];
  }
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return w[a] * double(period) - double(q[a]) > w[b] * double(period) - double(q[b]);
  });
  for (size_t k = 0; given < period; ++k, ++given) ++q[order[k % order.size()]];
  return q;
}

// Tijdeman's rule at step m (1-based) for shares q / P with counts c so far: among the datasets
// whose deficit m*q_d/P - c_d is at least 1/(2K-2), the one whose deficit would first exceed
// 1 - 1/(2K-2), i.e. the least (c_d + sigma) / q_d. Integer arithmetic, scaled by P(2K-2).
int choose(int64_t m, int64_t period, const std::vector<int64_t>& q,
           const std::vector<int64_t>& c) {
  const int64_t k2 = 2 * int64_t(q.size()) - 2;
  int best = -1;
  for (int d = 0; d < int(q.size()); ++d) {
    if (k2 * (m * q[d] - period * c[d]) < period) continue;  // not due yet
    // deadline_d = (k2 * c_d + k2 - 1) / (k2 * q_d): compare by cross-multiplying.
    if (best < 0 || (k2 * c[d] + k2 - 1) * q[best] < (k2 * c[best] + k2 - 1) * q[d]) best = d;
  }
  TS_CHECK(best >= 0, "blend schedule: no dataset due at step {} of {}", m, period);
  return best;
}

}  // namespace

BlendSchedule::BlendSchedule(const std::vector<double>& weights,
                             const std::vector<std::string>& names) {
  const std::vector<double> w = normalised(weights, names);
  const int64_t exact = exact_period(w);
  period_ = exact > 0 ? exact : kMaxBlendPeriod;
  per_period_ = exact > 0 ? std::vector<int64_t>(w.size()) : apportion(w, period_);
  if (exact > 0)
    for (size_t d = 0; d < w.size(); ++d) per_period_[d] = std::llround(w[d] * double(period_));
  for (size_t d = 0; d < w.size(); ++d)
    if (per_period_[d] == 0)
      TS_USER_ERROR(
          "data blend: weight {} of {} is below 1/{} of the total and would never be "
          "sampled",
          weights[d], d < names.size() ? names[d] : std::to_string(d), kMaxBlendPeriod);
  dataset_at_.resize(size_t(period_));
  rank_at_.resize(size_t(period_));
  slots_.assign(w.size(), {});
  std::vector<int64_t> count(w.size(), 0);
  for (int64_t m = 1; m <= period_; ++m) {
    const int d = w.size() == 1 ? 0 : choose(m, period_, per_period_, count);
    dataset_at_[size_t(m - 1)] = d;
    rank_at_[size_t(m - 1)] = int32_t(count[size_t(d)]++);
    slots_[size_t(d)].push_back(int32_t(m - 1));
  }
  for (size_t d = 0; d < w.size(); ++d)
    TS_CHECK(count[d] == per_period_[d], "blend period serves dataset {} {} times, not {}", d,
             count[d], per_period_[d]);
}

BlendSchedule::Pick BlendSchedule::pick(int64_t global_index) const {
  TS_CHECK(global_index >= 0, "global sample index {}", global_index);
  const int64_t period_idx = global_index / period_;
  const size_t pos = size_t(global_index % period_);
  const int d = dataset_at_[pos];
  return {d, period_idx * per_period_[size_t(d)] + rank_at_[pos]};
}

int64_t BlendSchedule::global_index_of(int d, int64_t index) const {
  TS_CHECK(d >= 0 && d < num_datasets() && index >= 0, "dataset {} sample {}", d, index);
  const int64_t q = per_period_[size_t(d)];
  return (index / q) * period_ + slots_[size_t(d)][size_t(index % q)];
}

}  // namespace tessera
