// Recipe: the typed sections of a YAML experiment file. Each section is validated where it is
// built; unknown keys, wrong types and inconsistent values are user errors that name the key,
// the value, the file and the line. `--set section.key=value` overrides any field.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace tessera {

struct ParallelConfig {
  int dp = 1, tp = 1, pp = 1;
  int microbatches = 1;           // pipeline micro-batches per step (GPipe)
  std::string schedule = "gpipe"; // gpipe | 1f1b
  int zero = 0;                   // 0 | 1

  bool operator==(const ParallelConfig&) const = default;
};

struct PrecisionConfig {
  std::string compute = "fp32";   // fp32 | bf16 | fp16 | fp8 (only fp32 is built on the CPU now)

  bool operator==(const PrecisionConfig&) const = default;
};

struct OptimConfig {
  float lr = 3e-4f;
  float min_lr = 0.0f;            // floor of the decay
  int warmup_steps = 0;
  std::string schedule = "cosine";  // cosine | linear | constant | wsd
  float decay_fraction = 0.2f;    // wsd: last fraction of steps spent decaying
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;
  // Parameter classes excluded from weight decay: any of "norms", "biases", "embeddings".
  std::vector<std::string> no_decay = {"norms", "biases", "embeddings"};
  float grad_clip = 1.0f;         // global L2 norm; 0 disables

  bool operator==(const OptimConfig&) const = default;
};

struct DataConfig {
  std::string path;               // HDF5 token dataset written by `tessera prepare`
  int seq_len = 0;                // T
  int micro_batch = 0;            // B per micro-batch per data-parallel rank
  int grad_accum = 1;             // micro-batches accumulated per optimizer step
  // Optional: the tokenizer the recipe expects ("gpt2", "qwen3" or a tokenizer.json path). When
  // set, training refuses a dataset made with a different tokenizer. Empty: use the dataset's.
  std::string tokenizer;

  bool operator==(const DataConfig&) const = default;
};

struct TrainConfig {
  int steps = 0;
  int eval_every = 0;             // 0 disables periodic evaluation (a final one still runs)
  int eval_batches = 8;
  uint64_t seed = 1234;
  std::string out_dir;
  std::string device = "auto";    // cpu | cuda | auto
  int sample_tokens = 64;         // tokens generated per sample at the end (0: none)
  int num_samples = 2;
  float sample_temperature = 0.8f;
  std::string sample_prompt = "";

  bool operator==(const TrainConfig&) const = default;
};

struct CheckpointConfig {
  int every = 0;                  // 0 disables periodic checkpoints (a final one is written)
  int keep = 3;
  std::string resume;             // "" | latest | <path>
  bool save_final = true;         // write a checkpoint when training ends (benchmarks turn it off)

  bool operator==(const CheckpointConfig&) const = default;
};

struct LoggingConfig {
  int every = 1;                  // progress line every N steps
  std::string level = "info";
  // Time every op (after 3 warm-up steps) and print a per-op breakdown of the steps at the end,
  // also written to <out_dir>/op_profile.json. Adds an event pair per op on the GPU.
  bool profile_ops = false;

  bool operator==(const LoggingConfig&) const = default;
};

struct Recipe {
  std::string file;               // where it came from (for messages)
  ModelConfig model;
  ParallelConfig parallel;
  PrecisionConfig precision;
  OptimConfig optim;
  DataConfig data;
  TrainConfig train;
  CheckpointConfig checkpoint;
  LoggingConfig logging;

  int64_t tokens_per_step() const {
    return int64_t(data.micro_batch) * data.seq_len * data.grad_accum * parallel.dp;
  }

  bool operator==(const Recipe&) const = default;
};

// Loads, applies overrides ("section.key=value", the value parsed as YAML, so lists work) and
// validates. A missing file is a user error naming the path.
// Paths in the recipe are kept as written (relative to the working directory).
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
Recipe parse_recipe(const std::string& yaml_text, const std::string& file_name,
                    const std::vector<std::string>& overrides = {});
// The fully resolved recipe as YAML (every field, defaults filled in): printed at start and
// stored in the run directory and in checkpoints.
std::string recipe_to_yaml(const Recipe& r);

// Completes a recipe whose model.vocab_size is `auto` (0) once the dataset's tokenizer is known:
// sets vocab_size, derives padded_vocab_size (rounded up to vocab_pad_multiple) when it was not
// given, and re-checks padded_vocab_size >= vocab_size. When the recipe gave vocab_size, it must
// equal `vocab_size`. Errors name `recipe_file`. The trainer calls this after opening the dataset.
void finalize_model_vocab(ModelConfig& model, int vocab_size, const std::string& recipe_file);

}  // namespace tessera
