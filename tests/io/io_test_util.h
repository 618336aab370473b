// Helpers for the io tests: a unique scratch directory under the build tree (removed afterwards)
// and deterministic fills whose every element is distinct, so a misplaced element shows.
#pragma once
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/error.h"

namespace tessera::io::testing {

class ScratchDir {
 public:
  ScratchDir() {
    static std::atomic<int> counter{0};
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::path(TESSERA_BINARY_DIR) / "test_scratch" /
            (std::string("io_") + (info ? info->name() : "x") + "_" + std::to_string(::getpid()) +
             "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  std::string operator/(const std::string& rel) const { return (path_ / rel).string(); }

 private:
  std::filesystem::path path_;
};

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

// Runs `fn`, expecting a tessera::Error of `kind` whose message contains every one of `needles`.
template <class Fn>
void expect_error(Fn&& fn, ErrorKind kind, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(int(e.kind()), int(kind)) << e.what();
    for (const std::string& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "message lacks '" << n << "': " << e.what();
    return;
  }
  ADD_FAILURE() << "no tessera::Error thrown";
}

}  // namespace tessera::io::testing
