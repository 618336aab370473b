// SHA-256 (FIPS 180-4): one-shot over a string, streaming over chunks, and over a whole file.
// Used to pin downloaded corpora and tokenizer files and to fingerprint checkpoints; it is not a
// general crypto library (no HMAC, no other hashes).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tessera {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t bytes);
  // Lower-case hex of the digest of everything fed so far. Does not finalise this object: more
  // update() calls may follow and hex_digest() again gives the digest of the longer message.
  std::string hex_digest() const;

 private:
  void compress(const uint8_t* block);  // one 64-byte block into state_

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> pending_;  // bytes of the current, incomplete block
  size_t num_pending_ = 0;
  uint64_t num_bytes_ = 0;  // total message length so far
};

std::string sha256_hex(std::string_view data);
// User error naming the path if it cannot be opened; system error if reading fails midway.
std::string sha256_file_hex(const std::string& path);

}  // namespace tessera
