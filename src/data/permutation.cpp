// Keyed Feistel permutation with cycle-walking (the construction is described in permutation.h).
#include "data/permutation.h"

#include <bit>

#include "core/error.h"

namespace tessera {

namespace {

constexpr int kRounds = 8;
constexpr int kMinBits = 8;

}  // namespace

Permutation::Permutation(uint64_t n, const CounterRng& rng) : n_(n), rng_(rng) {
  TS_CHECK(n >= 1 && n <= (uint64_t(1) << 63), "permutation of {} elements", n);
  int bits = std::max(kMinBits, int(std::bit_width(n - 1)));  // 2^bits >= n
  bits += bits % 2;
  half_bits_ = bits / 2;
  half_mask_ = half_bits_ == 64 ? ~uint64_t(0) : (uint64_t(1) << half_bits_) - 1;
}

uint64_t Permutation::round_fn(uint64_t half, int round) const {
  return uint64_t(rng_.bits(half, uint32_t(round))) & half_mask_;
}

uint64_t Permutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t next = left ^ round_fn(right, r);
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t Permutation::decrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (int r = kRounds - 1; r >= 0; --r) {
    const uint64_t prev = right ^ round_fn(left, r);
    right = left;
    left = prev;
  }
  return (left << half_bits_) | right;
}

uint64_t Permutation::operator()(uint64_t i) const {
  TS_CHECK(i < n_, "index {} outside a permutation of {}", i, n_);
  // The cycle of i under encrypt returns to [0, n) (it contains i), so this ends.
  uint64_t y = encrypt(i);
  while (y >= n_) y = encrypt(y);
  return y;
}

uint64_t Permutation::inverse(uint64_t y) const {
  TS_CHECK(y < n_, "index {} outside a permutation of {}", y, n_);
  uint64_t i = decrypt(y);
  while (i >= n_) i = decrypt(i);
  return i;
}

}  // namespace tessera
