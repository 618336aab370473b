// Helpers for the io tests: deterministic fills whose every element is distinct, so a misplaced
// element shows (scratch directories and error checks come from the shared kit, tests/common).
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera::io::testing {

using ::tessera::testing::expect_error;
using ::tessera::testing::ScratchDir;

// v[i] = base + i * step, as T: distinct values per element (within T's exact range).
template <class T>
std::vector<T> iota_values(int64_t n, double base, double step) {
  std::vector<T> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = T(base + double(i) * step);
  return v;
}

// Copies the box [offset, offset + shape) out of a row-major 2-D (R, C) array.
template <class T>
std::vector<T> box2d(const std::vector<T>& full, int64_t cols, int64_t r0, int64_t c0, int64_t nr,
                     int64_t nc) {
  std::vector<T> out;
  for (int64_t r = r0; r < r0 + nr; ++r)
    for (int64_t c = c0; c < c0 + nc; ++c) out.push_back(full[size_t(r * cols + c)]);
  return out;
}

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace tessera::io::testing
