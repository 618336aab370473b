// A pseudo-random bijection of [0, n) evaluated per index in O(1) memory, for shuffling the
// windows of an epoch without materializing the permutation (n may exceed 2^32).
// Not here: which permutation the loader uses for which epoch (loader.h).
//
// Construction: a balanced Feistel network over k bits, k = the smallest even number >= 8 with
// 2^k >= n (so the domain is less than 4n, or 256 for tiny n), with 8 rounds whose round
// functions are draws of a CounterRng: F_r(R) = rng.bits(R, r) masked to k/2 bits. Any Feistel
// network is a bijection of [0, 2^k); cycle-walking (apply it again while the result is >= n)
// restricts it to a bijection of [0, n). Expected steps per index: under 4 (n >= 64). The floor
// of 8 bits lets tiny n (2, 3, 4) reach every order of their elements.
#pragma once
#include <cstdint>

#include "core/rng.h"

namespace tessera {

class Permutation {
 public:
  // The permutation of [0, n) keyed by `rng` (e.g. CounterRng(seed, "<stream>/epoch/<e>")).
  Permutation(uint64_t n, const CounterRng& rng);

  uint64_t size() const { return n_; }
  uint64_t operator()(uint64_t i) const;  // the image of i; i < n
  uint64_t inverse(uint64_t y) const;     // the i with (*this)(i) == y; y < n

 private:
  uint64_t encrypt(uint64_t x) const;  // one pass of the Feistel network over [0, 2^k)
  uint64_t decrypt(uint64_t x) const;
  uint64_t round_fn(uint64_t half, int round) const;

  uint64_t n_;
  CounterRng rng_;
  int half_bits_;
  uint64_t half_mask_;
};

}  // namespace tessera
