// Test kit shared by cross_entropy_test.cpp and kd_loss_test.cpp: the small padded vocabulary, the
// tp column-shard cases and column slicing (CPU), and the row checks of the GPU shard protocol.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tests/common/tensors.h"

namespace tessera::testing {

// The unsharded CPU cases: N = kRows rows of V = kWidth columns, the last two of them padding.
constexpr int64_t kRows = 7;        // N
constexpr int64_t kWidth = 13;      // V
constexpr int kVocabSize = 11;      // columns 11 and 12 are padding
constexpr int64_t kIgnoredRow = 3;  // its target is -1

// sum_n dloss * losses[n]: the scalar whose gradient a backward with this dloss computes.
inline double weighted_total(const HostTensor& losses, float dloss) {
  double total = 0.0;
  for (int64_t n = 0; n < losses.size(); ++n) total += double(dloss) * losses.get(n);
  return total;
}

// Target column buffer (N) as a host i32 tensor.
inline Tensor host_i32(std::vector<int32_t>& v, Shape s) {
  return Tensor(v.data(), DType::i32, Device::cpu, s);
}

// Columns [begin, begin + width) of a row-major (rows, full_width) matrix.
inline std::vector<float> columns_of(const std::vector<float>& full, int64_t rows,
                                     int64_t full_width, int64_t begin, int64_t width) {
  std::vector<float> out(rows * width);
  for (int64_t i = 0; i < rows; ++i)
    std::copy_n(full.begin() + i * full_width + begin, width, out.begin() + i * width);
  return out;
}

// Ignored rows (target < 0) must have a loss of exactly 0.
inline void expect_ignored_rows_zero(const std::vector<float>& losses,
                                     const std::vector<int32_t>& targets, const std::string& what) {
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] < 0) {
      EXPECT_EQ(losses[i], 0.0f) << "ignored row " << i << " " << what;
    }
  }
}

// A gradient (rows, width) must be exactly 0 on ignored rows and in the columns >= num_real
// (padding); reports the first offending column of each row.
inline void expect_zero_outside_real(const std::vector<float>& grad,
                                     const std::vector<int32_t>& targets, int64_t width,
                                     int64_t num_real, const std::string& name,
                                     const std::string& what) {
  for (int64_t i = 0; i < int64_t(targets.size()); ++i) {
    for (int64_t col = 0; col < width; ++col) {
      if ((targets[i] < 0 || col >= num_real) && grad[i * width + col] != 0.0f) {
        ADD_FAILURE() << what << ": " << name << "[" << i << ", " << col
                      << "] = " << grad[i * width + col];
        break;
      }
    }
  }
}

namespace shard_cases {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The padded vocabulary V = tp * Vl split into tp column shards of width Vl.
struct ShardCase {
  int64_t rows, shard_width;  // N, Vl
  int tp;
  int vocab_size;  // real columns of the whole V = tp * Vl
  int64_t width() const { return tp * shard_width; }
  int64_t start(int rank) const { return rank * shard_width; }
  std::string str() const {
    return "N=" + std::to_string(rows) + " Vl=" + std::to_string(shard_width) +
           " tp=" + std::to_string(tp) + " vocab=" + std::to_string(vocab_size);
  }
};
const ShardCase kCases[] = {
    {5, 7, 1, 7},     // tp = 1, no padding
    {6, 7, 1, 5},     // tp = 1, padded
    {6, 8, 2, 16},    // even split, no padding
    {7, 7, 2, 13},    // last shard: 6 of 7 columns real
    {5, 5, 3, 11},    // last shard: 1 real column
    {6, 3, 4, 9},     // last shard: no real column
    {4, 1, 4, 2},     // Vl = 1, two shards of padding only
    {9, 33, 4, 129},  // Vl = 33 is no multiple of a vector width; last shard 30 real
    {1, 13, 3, 30},   // N = 1
};

// Columns [begin, begin + width) of a (N, V) tensor, as a (N, width) tensor.
inline HostTensor slice_columns(const HostTensor& full, int64_t begin, int64_t width) {
  const int64_t rows = full.t.dim(0), full_width = full.t.dim(1);
  HostTensor out(full.t.dtype, {rows, width});
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j)
      out.set(n * width + j, full.get(n * full_width + begin + j));
  return out;
}

// Writes a (N, width) shard into columns [begin, begin + width) of a (N, V) tensor.
inline void place_columns(HostTensor& full, const HostTensor& shard, int64_t begin) {
  const int64_t rows = shard.t.dim(0), width = shard.t.dim(1), full_width = full.t.dim(1);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j)
      full.set(n * full_width + begin + j, shard.get(n * width + j));
}

// The largest |got - want| / max(1, |want|) over the elements (a NaN counts as inf): relative
// error, floored at 1 so a value near 0 is not judged relative to itself.
inline double max_floored_rel_error(const HostTensor& got, const HostTensor& want) {
  double worst = 0.0;
  for (int64_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got.get(i) - want.get(i)) / std::max(1.0, std::fabs(want.get(i)));
    worst = std::max(worst, std::isnan(err) ? kInf : err);
  }
  return worst;
}

}  // namespace shard_cases
}  // namespace tessera::testing
