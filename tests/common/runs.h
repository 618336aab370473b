// What a finished `tessera train` run left behind, for end-to-end tests: its metrics.jsonl
// records and a comparison of two runs' final checkpoints. Part of the shared test kit.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/checkpoint.h"

namespace tessera::testing {

// Every record of <dir>/metrics.jsonl, in file order.
inline std::vector<nlohmann::json> read_metrics(const std::string& dir) {
  std::vector<nlohmann::json> out;
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Every parameter (optimizer state aside) of the latest checkpoints of two runs:
// max |a - b| <= tol * max |b| per tensor, max |b| floored at `floor` for near-zero tensors.
inline void expect_same_parameters(const std::string& a_dir, const std::string& b_dir, double tol,
                                   double floor = 1e-3) {
  const auto a = io::CheckpointReader::open(io::latest_checkpoint(a_dir));
  const auto b = io::CheckpointReader::open(io::latest_checkpoint(b_dir));
  ASSERT_EQ(a.tensor_names(), b.tensor_names());
  for (const std::string& name : b.tensor_names()) {
    if (name.rfind("optim.", 0) == 0) continue;
    const int64_t n = b.numel(name);
    std::vector<float> x(n), y(n);
    a.read_full(name, x.data());
    b.read_full(name, y.data());
    double diff = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      diff = std::max(diff, double(std::abs(x[i] - y[i])));
      scale = std::max(scale, double(std::abs(y[i])));
    }
    EXPECT_LE(diff, tol * std::max(scale, floor)) << name;
  }
}

}  // namespace tessera::testing
