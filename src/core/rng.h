// Counter-based RNG (Philox-4x32-10): the value at any position is a pure function of
// (key, counter), so each parameter's initial values depend only on (seed, parameter name,
// element index). That is what lets any parallel layout start from the same weights as one
// process: draw the element indices of your slice, not a stream.
#pragma once
#include <array>
#include <cstdint>
#include <string_view>

namespace tessera {

using Philox4x32Key = std::array<uint32_t, 2>;
using Philox4x32Ctr = std::array<uint32_t, 4>;

// Ten rounds of Philox-4x32 (Salmon et al., SC'11).
Philox4x32Ctr philox4x32(Philox4x32Ctr counter, Philox4x32Key key);

// Stable 64-bit FNV-1a hash of a name (parameter names, stream names).
uint64_t hash_name(std::string_view name);

// A stream: key = (seed, hash(name)); element i's values come from counter (i, i >> 32, sub, 0).
class CounterRng {
 public:
  CounterRng(uint64_t seed, std::string_view name);
  CounterRng(uint64_t seed, uint64_t stream);
  uint32_t bits(uint64_t index, uint32_t sub = 0) const;
  float uniform(uint64_t index, uint32_t sub = 0) const;  // in [0, 1), 24 bits
  float normal(uint64_t index, uint32_t sub = 0) const;   // N(0,1) by Box-Muller on one counter
  // Fills out[j] = normal(begin + j) * stddev for j in [0, n).
  void fill_normal(float* out, uint64_t begin, uint64_t n, float stddev) const;
  void fill_uniform(float* out, uint64_t begin, uint64_t n, float lo, float hi) const;

 private:
  Philox4x32Key key_;
};

}  // namespace tessera
