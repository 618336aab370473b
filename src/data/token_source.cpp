// The synthetic and in-memory token sources (the HDF5 one is in dataset.cpp).
#include "data/token_source.h"

#include "core/error.h"

namespace tessera {

void fail_token_out_of_vocab(const std::string& source_name, int64_t index, int64_t id,
                             int64_t vocab_size) {
  TS_USER_ERROR("{}: token id {} at index {} is not below vocab_size {}", source_name, id, index,
                vocab_size);
}

namespace {

void check_range(const TokenSource& s, int64_t begin, int64_t n) {
  TS_CHECK(begin >= 0 && n >= 0 && begin <= s.num_tokens() - n,
           "read of tokens [{}, {}) outside {} ({} tokens)", begin, begin + n, s.name(),
           s.num_tokens());
}

}  // namespace

MockTokenSource::MockTokenSource(uint64_t seed, const std::string& stream, int64_t vocab_size,
                                 int64_t num_tokens)
    : rng_(seed, stream),
      name_("mock " + stream),
      vocab_size_(vocab_size),
      num_tokens_(num_tokens) {
  TS_CHECK(vocab_size >= 1 && vocab_size <= (int64_t(1) << 31) && num_tokens >= 0,
           "mock source: vocab {} tokens {}", vocab_size, num_tokens);
}

void MockTokenSource::read(int64_t begin, int64_t n, int32_t* out) const {
  check_range(*this, begin, n);
  for (int64_t i = 0; i < n; ++i)
    out[i] = int32_t(uint64_t(rng_.bits(uint64_t(begin + i))) % uint64_t(vocab_size_));
}

MemoryTokenSource::MemoryTokenSource(std::vector<uint32_t> tokens, int64_t vocab_size,
                                     std::string name)
    : tokens_(std::move(tokens)), vocab_size_(vocab_size), name_(std::move(name)) {}

void MemoryTokenSource::read(int64_t begin, int64_t n, int32_t* out) const {
  check_range(*this, begin, n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t id = tokens_[size_t(begin + i)];
    if (int64_t(id) >= vocab_size_) fail_token_out_of_vocab(name_, begin + i, id, vocab_size_);
    out[i] = int32_t(id);
  }
}

}  // namespace tessera
