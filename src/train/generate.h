// Text generation from a trained model: temperature sampling with a counter-based RNG (so a
// sample is reproducible from its seed). The context is the last T tokens; this recomputes the
// whole window per token (no KV cache — that belongs to the inference engine in src/infer).
#pragma once
#include <cstdint>
#include <vector>

#include "model/transformer.h"
#include "train/run.h"

namespace tessera {

// acts must be inference activations of batch 1; its T bounds the context window.
// temperature <= 0 picks the argmax. Stops early at stop_token (if >= 0), which is included.
std::vector<int32_t> generate(const Transformer& model, Activations& acts,
                              const std::vector<int32_t>& prompt, int num_tokens, float temperature,
                              uint64_t seed, int32_t stop_token);

// The end-of-training samples (train.num_samples of train.sample_tokens tokens after
// train.sample_prompt), logged by rank 0. Needs the whole model in one process: under tp, pp or ep
// they are skipped with a log line (generation under model parallelism belongs to the inference
// engine), and mock data has no tokenizer to decode with.
void print_samples(Run& run);

}  // namespace tessera
