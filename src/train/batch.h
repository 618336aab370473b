// Batch: one micro-batch of token ids, filled on the host by the loader and placed on the model's
// device (on the CPU the device tensors are views of the host vectors).
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"

namespace tessera {

struct Batch {
  std::vector<int32_t> inputs, targets;  // (B, T) host
  Tensor tokens, labels;                 // (B, T) i32 on the model's device

  Batch(int B, int T, Device device, Arena& arena) : inputs(size_t(B) * T), targets(size_t(B) * T) {
    if (device == Device::cpu) {
      tokens = Tensor(inputs.data(), DType::i32, device, {B, T});
      labels = Tensor(targets.data(), DType::i32, device, {B, T});
    } else {
      tokens = arena.alloc(DType::i32, {B, T});
      labels = arena.alloc(DType::i32, {B, T});
    }
  }
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;
  static size_t bytes_needed(int B, int T, Device device) {
    return device == Device::cpu ? 0 : 2 * Arena::aligned(sizeof(int32_t) * B * T);
  }
  void upload() {
    if (tokens.data == inputs.data()) return;
    copy_bytes(tokens.data, tokens.device, inputs.data(), Device::cpu, tokens.nbytes());
    copy_bytes(labels.data, labels.device, targets.data(), Device::cpu, labels.nbytes());
  }
  int64_t num_valid() const {
    int64_t n = 0;
    for (int32_t t : targets) n += t >= 0;
    return n;
  }
};

}  // namespace tessera
