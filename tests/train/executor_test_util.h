// Helpers for the pipeline-executor tests: deterministic micro-batches (the same on every rank)
// and the serial reference, the whole model running each micro-batch's forward and backward in
// turn, as gradient accumulation does without a pipeline.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/memory.h"
#include "model/transformer.h"
#include "train/batch.h"

namespace tessera::testing {

// Micro-batch m of a step: B x T tokens below vocab_size, targets with a few ignored (-1).
inline void fill_microbatch(const ModelConfig& cfg, int m, Batch& batch) {
  std::mt19937_64 rng(1000 + uint64_t(m));
  std::uniform_int_distribution<int> tok(0, cfg.vocab_size - 1);
  for (size_t i = 0; i < batch.inputs.size(); ++i) {
    batch.inputs[i] = tok(rng);
    batch.targets[i] = (i + size_t(m)) % 7 == 3 ? -1 : tok(rng);
  }
}

struct SerialResult {
  double loss_sum = 0.0;                  // sum over micro-batches of their mean loss
  std::vector<std::vector<float>> grads;  // per parameter, in the model's order
  std::vector<std::string> names;
};

// The whole model (seed 5), M micro-batches of (B, T) accumulated with loss scale `scale`.
inline SerialResult serial_reference(const ModelConfig& cfg, int M, int B, int T, float scale) {
  Transformer model(cfg, DType::f32, Device::cpu);
  model.init_weights(5);
  Arena arena(Device::cpu, Batch::bytes_needed(B, T, Device::cpu) + 1024, "batch");
  Batch batch(B, T, Device::cpu, arena);
  SerialResult r;
  model.params().zero_grad();
  for (int m = 0; m < M; ++m) {
    Activations acts(model, B, T, true);
    fill_microbatch(cfg, m, batch);
    r.loss_sum += model.forward(acts, batch.tokens, batch.labels);
    model.backward(acts, batch.tokens, batch.labels, scale);
  }
  for (const Param& p : model.params().all()) {
    r.names.push_back(p.spec.name);
    r.grads.emplace_back(p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel());
  }
  return r;
}

inline const std::vector<float>* serial_grad(const SerialResult& s, const std::string& name) {
  for (size_t i = 0; i < s.names.size(); ++i)
    if (s.names[i] == name) return &s.grads[i];
  ADD_FAILURE() << "no parameter " << name << " in the serial model";
  return nullptr;
}

}  // namespace tessera::testing
