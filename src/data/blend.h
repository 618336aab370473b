// Which dataset of a blend each global sample comes from: a pure function of the sample index, so
// a blend keeps resume and every parallel layout exact. Not here: which window of that dataset is
// read (loader.h).
//
// Weights are normalised to w_d = weight_d / sum. The schedule is periodic: with period P, dataset
// d gets q_d of every P consecutive samples, where P is the smallest period <= kMaxBlendPeriod in
// which every w_d * P is a whole number (0.7/0.3 -> 10, 1:1:1 -> 3); when there is none, P =
// kMaxBlendPeriod and q_d = w_d * P rounded by largest remainders (each realized weight q_d / P
// then differs from w_d by less than 1 / P). Within a period samples are assigned by Tijdeman's
// chairman-assignment rule (earliest deadline among the datasets whose share is due, ties to the
// lower index), computed once into a table of P entries.
//
// Guarantee (Tijdeman 1980, and checked for every prefix of a period in the tests): after any
// prefix of n samples, dataset d has served c_d(n) samples with
//     |c_d(n) - n * q_d / P| <= 1 - 1 / (2K - 2)      (K >= 2 datasets; exact for K = 1),
// so always within 1 of its share (within 1/2 for two datasets); q_d / P = w_d whenever the
// weights are exact multiples of 1 / P as above.
// Global sample g is sample k = (g / P) * q_d + rank of dataset d = table[g % P].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

inline constexpr int64_t kMaxBlendPeriod = int64_t(1) << 16;

class BlendSchedule {
 public:
  // `names` are used in messages only (e.g. the datasets' paths). User errors: no datasets, a
  // weight that is not a finite positive number, or one too small to get a sample per period.
  BlendSchedule(const std::vector<double>& weights, const std::vector<std::string>& names);

  int num_datasets() const { return static_cast<int>(per_period_.size()); }
  int64_t period() const { return period_; }
  int64_t per_period(int d) const { return per_period_[size_t(d)]; }  // q_d

  struct Pick {
    int dataset = 0;
    int64_t index = 0;  // the dataset's own sample index (0, 1, 2, ... as it is picked)
  };
  Pick pick(int64_t global_index) const;
  // The global index at which dataset d serves its sample `index` (the inverse of pick).
  int64_t global_index_of(int d, int64_t index) const;

 private:
  int64_t period_ = 1;
  std::vector<int64_t> per_period_;          // (K,) q_d, summing to period_
  std::vector<int32_t> dataset_at_;          // (P,) the dataset of each position of a period
  std::vector<int32_t> rank_at_;             // (P,) its sample index within the period
  std::vector<std::vector<int32_t>> slots_;  // (K, q_d) the positions of each dataset
};

}  // namespace tessera
