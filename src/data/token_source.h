// Where the loader's tokens come from: one split of token ids addressed by 64-bit offset, read on
// demand. Implementations: an HDF5 token dataset's split (TokenDataset::source in dataset.h),
// a synthetic stream computed per index (MockTokenSource) and ids held in memory
// (MemoryTokenSource, for tests and small tools). Not here: windows, shuffling, blends (loader.h).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"

namespace tessera {

class TokenSource {
 public:
  virtual ~TokenSource() = default;
  // For messages, e.g. "data/x.h5 /train".
  virtual const std::string& name() const = 0;
  virtual int64_t num_tokens() const = 0;
  virtual int64_t vocab_size() const = 0;
  // Writes ids [begin, begin + n) to out[0, n). An id >= vocab_size is a user error naming the
  // source and the token's index; so is a read the storage refuses (e.g. a corrupt file). Safe to
  // call from several threads.
  virtual void read(int64_t begin, int64_t n, int32_t* out) const = 0;
};

// Uniform random ids: token i = CounterRng(seed, stream).bits(i) % vocab_size, for benchmarks of
// models whose tokenizer does not ship here. Holds no tokens, so num_tokens may be huge.
class MockTokenSource final : public TokenSource {
 public:
  MockTokenSource(uint64_t seed, const std::string& stream, int64_t vocab_size, int64_t num_tokens);
  const std::string& name() const override { return name_; }
  int64_t num_tokens() const override { return num_tokens_; }
  int64_t vocab_size() const override { return vocab_size_; }
  void read(int64_t begin, int64_t n, int32_t* out) const override;

 private:
  CounterRng rng_;
  std::string name_;
  int64_t vocab_size_, num_tokens_;
};

// Ids held in memory (checked against vocab_size when read, like a file's).
class MemoryTokenSource final : public TokenSource {
 public:
  MemoryTokenSource(std::vector<uint32_t> tokens, int64_t vocab_size, std::string name);
  const std::string& name() const override { return name_; }
  int64_t num_tokens() const override { return int64_t(tokens_.size()); }
  int64_t vocab_size() const override { return vocab_size_; }
  void read(int64_t begin, int64_t n, int32_t* out) const override;

 private:
  std::vector<uint32_t> tokens_;  // (N,)
  int64_t vocab_size_;
  std::string name_;
};

// The user error for an id outside the vocabulary, shared by every source.
[[noreturn]] void fail_token_out_of_vocab(const std::string& source_name, int64_t index, int64_t id,
                                          int64_t vocab_size);

}  // namespace tessera
