// Recipe: the typed sections of a YAML experiment file. Each section is validated where it is
// built; unknown keys, wrong types and inconsistent values are user errors that name the key,
// the value, the file and the line. `--set section.key=value` overrides any field.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "optim/loss_scaler.h"

namespace tessera {

// The 3D-parallel layout (dp x tp x pp ranks; launch/README.md says how to start such a job).
// Layout checks that span sections live in train/layout_check.h.
struct ParallelConfig {
  int dp = 1, tp = 1, pp = 1;
  // Micro-batches per pipeline flush (GPipe / 1F1B); see "Batch terms" at Recipe. With pp == 1
  // they are accumulated like data.grad_accum.
  int microbatches = 1;
  std::string schedule = "gpipe";  // gpipe | 1f1b
  int zero = 0;                    // 0 | 1
  // Transformer blocks per pipeline stage: pp entries, each >= 1, summing to model.num_layers
  // (uneven splits, e.g. fewer blocks on the stage that holds the LM head). Empty: an even split,
  // see resolve_stage_layers (train/layout_check.h).
  std::vector<int> stage_layers;
  // Pipeline stages (indices in [0, pp)) whose blocks recompute their activations in backward,
  // in addition to model.recompute, which means every stage.
  std::vector<int> recompute_stages;
  // Data-parallel gradient bucket size in MB (10^6 bytes, bucket_bytes()): buckets of this many
  // bytes of gradients are all-reduced / reduce-scattered as backward fills them.
  float bucket_mb = 25.0f;
  // Rank order, innermost (stride 1) axis first: a permutation of tp, dp, pp joined by '-'
  // (parallel/topology.h draws the default "tp-dp-pp" for 16 ranks).
  std::string order = "tp-dp-pp";

  int64_t bucket_bytes() const { return int64_t(double(bucket_mb) * 1e6); }

  bool operator==(const ParallelConfig&) const = default;
};

// FP8 delayed scaling (precision.fp8, read only with compute: fp8): each tensor's scale comes
// from a history of its absolute maxima, scale = 2^-margin * fp8_max / amax. The trainer maps it
// onto optim/fp8_scaling.h's Fp8ScalingConfig (src/optim must not depend on src/train).
struct Fp8Config {
  int amax_history_len = 1024;       // steps of amax kept per tensor, >= 1
  std::string amax_compute = "max";  // max (over the history) | most_recent
  int margin = 0;                    // in [0, 64]: headroom in powers of two

  bool operator==(const Fp8Config&) const = default;
};

// The precision policy (docs/RECIPES.md). FP32 master weights and optimizer state always;
// `compute` is the dtype of forward/backward.
struct PrecisionConfig {
  std::string compute = "fp32";  // fp32 | bf16 | fp16 | fp8
  // Layers kept in FP32 when compute is narrower: any of "embedding", "lm_head" (distinct, in
  // the order given). Default empty for every compute dtype, fp8 included: which layers stay wide
  // is a choice the recipe states rather than one the dtype implies. Empty with fp32.
  std::vector<std::string> high_precision;
  // The dynamic loss scaler (optim/loss_scaler.h); a recipe may give it only with compute: fp16,
  // otherwise it holds the defaults and is unused.
  LossScalerConfig loss_scale;
  // A recipe may give it only with compute: fp8; otherwise the defaults, unused.
  Fp8Config fp8;

  bool keeps_high_precision(const std::string& layer) const {
    for (const std::string& l : high_precision)
      if (l == layer) return true;
    return false;
  }

  bool operator==(const PrecisionConfig&) const = default;
};

struct OptimConfig {
  float lr = 3e-4f;
  float min_lr = 0.0f;  // floor of the decay
  int warmup_steps = 0;
  std::string schedule = "cosine";  // cosine | linear | constant | wsd
  float decay_fraction = 0.2f;      // wsd: last fraction of steps spent decaying
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;
  // Parameter classes excluded from weight decay: any of "norms", "biases", "embeddings".
  std::vector<std::string> no_decay = {"norms", "biases", "embeddings"};
  float grad_clip = 1.0f;  // global L2 norm; 0 disables

  bool operator==(const OptimConfig&) const = default;
};

struct DataConfig {
  std::string path;     // HDF5 token dataset written by `tessera prepare`
  int seq_len = 0;      // T
  int micro_batch = 0;  // B: sequences per micro-batch per data-parallel rank; 0 (or
                        // `auto`) in a recipe: derived from global_batch
  int grad_accum = 1;   // pipeline flushes (pp == 1: micro-batches) per optimizer step
  // Sequences per optimizer step over all data-parallel ranks; 0 (`auto`) = derived, see
  // "Batch terms" at Recipe. When given without micro_batch, micro_batch is derived from it.
  int global_batch = 0;
  // Optional: the tokenizer the recipe expects ("gpt2", "qwen3" or a tokenizer.json path). When
  // set, training refuses a dataset made with a different tokenizer. Empty: use the dataset's.
  std::string tokenizer;

  bool operator==(const DataConfig&) const = default;
};

struct TrainConfig {
  int steps = 0;
  int eval_every = 0;  // 0 disables periodic evaluation (a final one still runs)
  int eval_batches = 8;
  uint64_t seed = 1234;
  std::string out_dir;
  std::string device = "auto";  // cpu | cuda | auto
  int sample_tokens = 64;       // tokens generated per sample at the end (0: none)
  int num_samples = 2;
  float sample_temperature = 0.8f;
  std::string sample_prompt = "";

  bool operator==(const TrainConfig&) const = default;
};

struct CheckpointConfig {
  int every = 0;  // 0 disables periodic checkpoints (a final one is written)
  int keep = 3;
  std::string resume;      // "" | latest | <path>
  bool save_final = true;  // write a checkpoint when training ends (benchmarks turn it off)

  bool operator==(const CheckpointConfig&) const = default;
};

struct LoggingConfig {
  int every = 1;  // progress line every N steps
  std::string level = "info";
  // Time every op (after 3 warm-up steps) and print a per-op breakdown of the steps at the end,
  // also written to <out_dir>/op_profile.json. Adds an event pair per op on the GPU.
  bool profile_ops = false;

  bool operator==(const LoggingConfig&) const = default;
};

// Batch terms (Megatron-Core's). Per optimizer step each data-parallel rank runs
//   micro_batches_per_step() = data.grad_accum * parallel.microbatches
// micro-batches of data.micro_batch sequences of data.seq_len tokens. With pp > 1 one pipeline
// flush (GPipe or 1F1B) runs parallel.microbatches micro-batches and a step is data.grad_accum
// flushes (normally 1); with pp == 1 the two factors simply multiply (gradient accumulation). So
//   global_batch()    = data.micro_batch * micro_batches_per_step() * parallel.dp  (sequences)
//   tokens_per_step() = global_batch() * data.seq_len
// and a step's loss and gradient are the mean over all of its tokens. data.global_batch, when
// given, pins global_batch(): a missing data.micro_batch is derived as
// global_batch / (dp * grad_accum * microbatches), which must divide exactly; a given one must
// agree. Either way every field holds its resolved value after parsing, except
// data.global_batch, which stays 0 when it was not given.
struct Recipe {
  std::string file;  // where it came from (for messages)
  ModelConfig model;
  ParallelConfig parallel;
  PrecisionConfig precision;
  OptimConfig optim;
  DataConfig data;
  TrainConfig train;
  CheckpointConfig checkpoint;
  LoggingConfig logging;

  // Fits in int: the parser rejects larger products (train/layout_check.h).
  int micro_batches_per_step() const { return data.grad_accum * parallel.microbatches; }
  int64_t global_batch() const {
    return int64_t(data.micro_batch) * micro_batches_per_step() * parallel.dp;
  }
  int64_t tokens_per_step() const { return global_batch() * data.seq_len; }

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
// sets vocab_size, derives padded_vocab_size when it was not given, and re-checks
// padded_vocab_size >= vocab_size. The derived size rounds vocab_size up to a multiple of
// lcm(vocab_pad_multiple, tp), so the vocabulary-parallel embedding and LM head split evenly over
// `tp` ranks (the padding rows are masked out of the loss); a given padded_vocab_size that `tp`
// does not divide is a user error. When the recipe gave vocab_size, it must equal `vocab_size`.
// Errors name `recipe_file`. The trainer calls this after opening the dataset, with
// tp = recipe.parallel.tp (the parser derives a given vocab_size's padding the same way).
void finalize_model_vocab(ModelConfig& model, int vocab_size, const std::string& recipe_file,
                          int tp = 1);

}  // namespace tessera
