// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), FNV-1a name hashing, and the CounterRng streams built on them.
// Every value is a pure function of (key, counter): there is no state to advance, so any slice of
// a tensor can be drawn independently and matches the same elements of the full draw.
#include "core/rng.h"

#include <cmath>
#include <numbers>

namespace tessera {

namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

// SplitMix64's finaliser: a bijection on 64 bits with good avalanche.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Philox4x32Ctr philox4x32(Philox4x32Ctr ctr, Philox4x32Key key) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    // One round: two 32x32->64 multiplies; the high halves are xored with the other two words
    // and the key, and the words are permuted (the S-box and P-box of the paper).
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * ctr[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = {hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0};
    // Key schedule: a Weyl sequence, bumped between rounds.
    key[0] += kPhiloxW0;
    key[1] += kPhiloxW1;
  }
  return ctr;
}

uint64_t hash_name(std::string_view name) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a 64-bit offset basis
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001B3ull;  // FNV 64-bit prime
  }
  return h;
}

CounterRng::CounterRng(uint64_t seed, std::string_view name) : CounterRng(seed, hash_name(name)) {}

// Key derivation: k = mix64(mix64(seed) ^ stream); key = (low 32 bits of k, high 32 bits of k).
// For one seed, distinct streams always give distinct keys (xor with a constant then a bijection),
// and nearby seeds are decorrelated by the inner mix before they meet the stream hash.
CounterRng::CounterRng(uint64_t seed, uint64_t stream) {
  const uint64_t k = mix64(mix64(seed) ^ stream);
  key_ = {static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}

namespace {
Philox4x32Ctr counter_for(uint64_t index, uint32_t sub) {
  return {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), sub, 0};
}
}  // namespace

uint32_t CounterRng::bits(uint64_t index, uint32_t sub) const {
  return philox4x32(counter_for(index, sub), key_)[0];
}

float CounterRng::uniform(uint64_t index, uint32_t sub) const {
  // The top 24 bits fill a float mantissa exactly: multiples of 2^-24 in [0, 1), never 1.
  return static_cast<float>(bits(index, sub) >> 8) * 0x1.0p-24f;
}

float CounterRng::normal(uint64_t index, uint32_t sub) const {
  const Philox4x32Ctr r = philox4x32(counter_for(index, sub), key_);
  // u1 in (0, 1] so the log never sees 0 (|z| <= sqrt(64 ln 2) ~ 6.7); u2 in [0, 1).
  const double u1 = (static_cast<double>(r[0]) + 1.0) * 0x1.0p-32;
  const double u2 = static_cast<double>(r[1]) * 0x1.0p-32;
  const double radius = std::sqrt(-2.0 * std::log(u1));
  return static_cast<float>(radius * std::cos(2.0 * std::numbers::pi * u2));
}

// Fills are split across OpenMP threads (when built with it) in static chunks: each value is a
// function of its index alone, so the output is identical for every thread count.
constexpr uint64_t kParallelFill = uint64_t(1) << 16;

void CounterRng::fill_normal(float* out, uint64_t begin, uint64_t n, float stddev) const {
#pragma omp parallel for schedule(static) if (n >= kParallelFill)
  for (uint64_t j = 0; j < n; ++j) out[j] = normal(begin + j) * stddev;
}

void CounterRng::fill_uniform(float* out, uint64_t begin, uint64_t n, float lo, float hi) const {
#pragma omp parallel for schedule(static) if (n >= kParallelFill)
  for (uint64_t j = 0; j < n; ++j) {
    float v = lo + (hi - lo) * uniform(begin + j);
    // Float rounding can land exactly on hi; keep the interval half-open.
    if (v >= hi && hi > lo) v = std::nextafter(hi, lo);
    out[j] = v;
  }
}

}  // namespace tessera
