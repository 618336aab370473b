// Recipe: the typed sections of a YAML experiment file, each field declared once in a table
// below (name, type, default, rule, doc line; config/field.h). Parsing, validation, the resolved
// YAML and the key table of docs/RECIPES.md all come from these tables. Unknown keys, wrong types
// and inconsistent values are user errors naming the key, the value, the file and the line (or the
// `--set` override that gave it).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/distill_config.h"
#include "config/enums.h"
#include "config/field.h"
#include "config/model_config.h"
#include "config/moe_config.h"
#include "config/qat_config.h"

namespace tessera {

// clang-format off
#define TESSERA_PARALLEL_FIELDS(X)                                                                \
  X(int, dp, 1, config::kPositive, "data-parallel replicas")                                      \
  X(int, tp, 1, config::kPositive, "tensor-parallel ranks (heads, FFN columns, vocabulary split)") \
  X(int, pp, 1, config::kPositive, "pipeline stages")                                             \
  X(int, ep, 1, config::kPositive,                                                                \
    "expert-parallel ranks carved out of dp; divides dp and moe.num_experts")                         \
  X(int, microbatches, 1, config::kPositive,                                                      \
    "micro-batches per pipeline flush (with pp 1 they accumulate like data.grad_accum)")         \
  X(PipelineSchedule, schedule, PipelineSchedule::gpipe, config::kAny, "pipeline schedule")       \
  X(int, zero, 0, config::int_range(0, 1),                                                        \
    "ZeRO stage: 1 shards the optimizer state (and FP32 masters) over dp")                      \
  X(std::vector<int>, stage_layers, {}, config::kPositive,                                        \
    "blocks per pipeline stage (pp entries summing to model.num_layers); empty: an even split")  \
  X(std::vector<int>, recompute_stages, {}, config::distinct(config::kNonNegative),               \
    "pipeline stages whose blocks recompute activations in backward (besides train.recompute)")  \
  X(float, bucket_mb, 25.0f, config::kPositive,                                                   \
    "data-parallel gradient bucket size in MB (10^6 bytes of gradient)")                          \
  X(RankOrder, order, RankOrder::tp_dp_pp, config::kAny, "rank order, innermost axis first")      \
  X(float, timeout_s, 600.0f, config::kNonNegative,                                               \
    "seconds a collective or p2p transfer may stay unfinished before the hang watchdog ends "      \
    "the job, naming it (0: off)")
// clang-format on

// The 3D-parallel layout (dp x tp x pp ranks; launch/README.md says how to start such a job).
// Checks that span sections live in config/layout_check.h.
struct ParallelConfig {
  TESSERA_CONFIG_FIELDS(ParallelConfig, TESSERA_PARALLEL_FIELDS)
  int64_t bucket_bytes() const { return int64_t(double(bucket_mb) * 1e6); }
};

// clang-format off
#define TESSERA_LOSS_SCALE_FIELDS(X)                                                              \
  X(float, initial, 65536.0f, config::kPositive, "starting loss scale (2^16)")                    \
  X(float, growth_factor, 2.0f, config::kAboveOne, "scale *= this after growth_interval clean steps") \
  X(float, backoff_factor, 0.5f, config::kUnitOpen, "scale *= this on backoff")                   \
  X(int, growth_interval, 1000, config::kPositive, "clean steps before the scale grows")          \
  X(int, hysteresis, 2, config::kPositive, "overflowing steps tolerated before the first backoff") \
  X(float, min, 1.0f, config::kPositive, "lowest scale, <= initial")                              \
  X(float, max, 16777216.0f, config::kPositive, "highest scale (2^24), >= initial")               \
  X(int, max_overflows_at_min, 10, config::kPositive,                                             \
    "overflowing steps in a row at min before the run stops as diverged")
// clang-format on

// FP16 dynamic loss scaling (optim/loss_scaler.h holds the state machine and compares it with
// Megatron-LM's and DeepSpeed's scalers).
struct LossScalerConfig {
  TESSERA_CONFIG_FIELDS(LossScalerConfig, TESSERA_LOSS_SCALE_FIELDS)
};

// clang-format off
#define TESSERA_FP8_FIELDS(X)                                                                     \
  X(int, amax_history_len, 1024, config::kPositive, "steps of amax kept per tensor")              \
  X(AmaxCompute, amax_compute, AmaxCompute::max, config::kAny,                                    \
    "the amax a scale comes from: the history's max or the most recent")                         \
  X(int, margin, 0, config::int_range(0, 64), "headroom in powers of two: scale = 2^-margin fp8_max / amax")
// clang-format on

// FP8 delayed scaling: each tensor's scale comes from a history of its absolute maxima.
struct Fp8Config {
  TESSERA_CONFIG_FIELDS(Fp8Config, TESSERA_FP8_FIELDS)
};

namespace config {
bool compute_is_fp16(const void* precision);
bool compute_is_fp8(const void* precision);
}  // namespace config

// clang-format off
#define TESSERA_PRECISION_FIELDS(X)                                                               \
  X(Compute, compute, Compute::fp32, config::kAny,                                                \
    "dtype of forward and backward; masters and optimizer state are FP32 always")                \
  X(std::vector<HighPrecisionLayer>, high_precision, {}, config::kAny,                            \
    "layers kept in FP32 under a narrower compute dtype")                                        \
  X(GradReduce, grad_reduce, GradReduce::fp32, config::kAny,                                      \
    "dtype gradients accumulate over micro-batches and reduce over dp in (compute: the compute dtype)") \
  X(LossScalerConfig, loss_scale, {},                                                             \
    config::only_when(config::compute_is_fp16, "precision.compute is fp16"),                     \
    "dynamic loss scaling")                                                                      \
  X(Fp8Config, fp8, {}, config::only_when(config::compute_is_fp8, "precision.compute is fp8"),    \
    "FP8 delayed scaling")
// clang-format on

// The precision policy (docs/RECIPES.md).
struct PrecisionConfig {
  TESSERA_CONFIG_FIELDS(PrecisionConfig, TESSERA_PRECISION_FIELDS)
  bool keeps_high_precision(HighPrecisionLayer layer) const {
    for (HighPrecisionLayer l : high_precision)
      if (l == layer) return true;
    return false;
  }
};

// clang-format off
#define TESSERA_OPTIM_FIELDS(X)                                                                   \
  X(float, lr, 3e-4f, config::kPositive, "peak learning rate")                                    \
  X(float, min_lr, 0.0f, config::kNonNegative, "floor of the decay, <= lr")                       \
  X(int, warmup_steps, 0, config::kNonNegative, "linear warm-up steps, <= train.steps")           \
  X(LrScheduleKind, schedule, LrScheduleKind::cosine, config::kAny, "learning-rate schedule after warm-up") \
  X(float, decay_fraction, 0.2f, config::kUnitOpenLow, "wsd: last fraction of steps spent decaying") \
  X(float, beta1, 0.9f, config::kUnitHalfOpen, "AdamW beta1")                                     \
  X(float, beta2, 0.95f, config::kUnitHalfOpen, "AdamW beta2")                                    \
  X(float, eps, 1e-8f, config::kPositive, "AdamW epsilon")                                        \
  X(float, weight_decay, 0.1f, config::kNonNegative, "decoupled weight decay")                    \
  X(std::vector<DecayExempt>, no_decay,                                                           \
    (std::vector<DecayExempt>{DecayExempt::norms, DecayExempt::biases, DecayExempt::embeddings}), \
    config::kAny, "parameter classes without weight decay")                                      \
  X(float, grad_clip, 1.0f, config::kNonNegative, "global L2 gradient-norm clip; 0 disables")
// clang-format on

struct OptimConfig {
  TESSERA_CONFIG_FIELDS(OptimConfig, TESSERA_OPTIM_FIELDS)
};

// One dataset of a blend: an HDF5 token dataset written by `tessera prepare` (or `mock`:
// uniform random tokens) and its sampling weight.
struct DataSource {
  std::string path;
  float weight = 1.0f;  // relative
  bool operator==(const DataSource&) const = default;
};
using DataSources = std::vector<DataSource>;

// clang-format off
#define TESSERA_DATA_FIELDS(X)                                                                    \
  X(DataSources, path, {}, config::required(config::kPositive),                                   \
    "HDF5 token dataset; or a blend [{path: a.h5, weight: 0.7}, ...]; mock: uniform random tokens") \
  X(int, seq_len, 0, config::required(config::kPositive), "tokens per sequence (T)")             \
  X(int, micro_batch, 0, config::or_auto(config::kNonNegative),                                   \
    "sequences per micro-batch per dp rank (B); auto: from global_batch")                        \
  X(int, grad_accum, 1, config::kPositive, "pipeline flushes (pp 1: micro-batches) per optimizer step") \
  X(int, global_batch, 0, config::or_auto(config::kNonNegative),                                  \
    "sequences per optimizer step over all dp ranks; auto: micro_batch x grad_accum x microbatches x dp") \
  X(std::string, tokenizer, "", config::kAny,                                                     \
    "expected tokenizer (gpt2, qwen3 or a tokenizer.json); empty: the dataset's")
// clang-format on

struct DataConfig {
  TESSERA_CONFIG_FIELDS(DataConfig, TESSERA_DATA_FIELDS)
  bool mock() const { return path.size() == 1 && path[0].path == "mock"; }
};

// clang-format off
#define TESSERA_TRAIN_FIELDS(X)                                                                   \
  X(int, steps, 0, config::required(config::kPositive), "optimizer steps")                        \
  X(int, eval_every, 0, config::kNonNegative, "evaluate every N steps; 0: only at the end")        \
  X(int, eval_batches, 8, config::kPositive, "global batches per evaluation")                     \
  X(uint64_t, seed, 1234, config::kAny, "seed of initialization, data order and sampling")        \
  X(std::string, out_dir, "", config::required(config::kAny), "the run directory")                \
  X(DeviceChoice, device, DeviceChoice::auto_, config::kAny, "where to train; auto: cuda when a GPU is usable") \
  X(bool, recompute, false, config::kAny, "activation recomputation: keep only each block's input") \
  X(ops::AttentionImpl, attention, ops::AttentionImpl::cudnn, config::kAny,                             \
    "attention kernel on CUDA: cuDNN's fused SDPA or Tessera's own")                             \
  X(int, sample_tokens, 64, config::kNonNegative, "tokens generated per sample at the end; 0: none") \
  X(int, num_samples, 2, config::kNonNegative, "samples printed at the end")                      \
  X(float, sample_temperature, 0.8f, config::kPositive, "sampling temperature")                   \
  X(std::string, sample_prompt, "", config::kAny, "prompt of the samples")                        \
  X(int, time_limit, 0, config::kNonNegative,                                                     \
    "wall-clock seconds of training, 0: none; before they run out the job saves a checkpoint " \
    "and exits 0, as when preempted (docs/CLUSTER.md)")
// clang-format on

struct TrainConfig {
  TESSERA_CONFIG_FIELDS(TrainConfig, TESSERA_TRAIN_FIELDS)
};

// clang-format off
#define TESSERA_CHECKPOINT_FIELDS(X)                                                              \
  X(int, every, 0, config::kNonNegative, "checkpoint every N steps; 0: only the final one")       \
  X(int, keep, 3, config::kPositive, "newest checkpoints kept")                                   \
  X(std::string, resume, "", config::kAny, "empty, latest, or a checkpoint step directory")       \
  X(bool, save_final, true, config::kAny, "write a checkpoint when training ends")
// clang-format on

struct CheckpointConfig {
  TESSERA_CONFIG_FIELDS(CheckpointConfig, TESSERA_CHECKPOINT_FIELDS)
};

// clang-format off
#define TESSERA_LOGGING_FIELDS(X)                                                                 \
  X(int, every, 1, config::kPositive, "progress line every N steps")                               \
  X(LogLevel, level, LogLevel::info, config::kAny, "log level")                                   \
  X(bool, profile_ops, false, config::kAny,                                                       \
    "time every op after 3 warm-up steps; per-op table at the end and <out_dir>/op_profile.json") \
  X(int, prometheus_port, 0, config::int_range(0, 65535),                                         \
    "rank 0 serves Prometheus metrics (GET /metrics) on this TCP port, all interfaces; 0: off")
// clang-format on

struct LoggingConfig {
  TESSERA_CONFIG_FIELDS(LoggingConfig, TESSERA_LOGGING_FIELDS)
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
// clang-format off
#define TESSERA_RECIPE_SECTIONS(X)                                                                \
  X(ModelConfig, model, {}, config::kAny, "the architecture")                                     \
  X(MoeConfig, moe, {}, config::kAny, "Mixture-of-Experts layers (docs/MOE.md)")                  \
  X(ParallelConfig, parallel, {}, config::kAny, "the 3D-parallel layout")                         \
  X(PrecisionConfig, precision, {}, config::kAny, "the precision policy")                         \
  X(OptimConfig, optim, {}, config::kAny, "AdamW and the learning-rate schedule")                 \
  X(DataConfig, data, {}, config::kAny, "data and batch")                                         \
  X(TrainConfig, train, {}, config::kAny, "the run")                                              \
  X(CheckpointConfig, checkpoint, {}, config::kAny, "checkpoints and resume")                     \
  X(LoggingConfig, logging, {}, config::kAny, "progress and profiling")                           \
  X(DistillConfig, distill, {}, config::kAny, "knowledge distillation from a teacher checkpoint") \
  X(QatConfig, qat, {}, config::kAny, "quantization-aware training (docs/QAT.md)")
// clang-format on

struct Recipe {
  std::string file;  // where it came from (for messages); not a field
  TESSERA_CONFIG_FIELDS(Recipe, TESSERA_RECIPE_SECTIONS)

  // Fits in int: the parser rejects larger products (config/layout_check.h).
  int micro_batches_per_step() const { return data.grad_accum * parallel.microbatches; }
  int64_t global_batch() const {
    return int64_t(data.micro_batch) * micro_batches_per_step() * parallel.dp;
  }
  int64_t tokens_per_step() const { return global_batch() * data.seq_len; }
};

// Loads, applies overrides ("section.key=value", the value parsed as YAML, so lists work) and
// validates. A missing file is a user error naming the path. Paths in the recipe are kept as
// written (relative to the working directory).
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
Recipe parse_recipe(const std::string& yaml_text, const std::string& file_name,
                    const std::vector<std::string>& overrides = {});
// The fully resolved recipe as YAML (every field, defaults filled in, in table order):
// parse_recipe(recipe_to_yaml(r), r.file) == r. Printed at start, stored in the run directory
// and in checkpoints.
std::string recipe_to_yaml(const Recipe& r);
// The key table of docs/RECIPES.md (markdown), generated from the field tables.
std::string recipe_keys_markdown();

// Completes a recipe whose model.vocab_size is `auto` (0) once the dataset's tokenizer is known:
// sets vocab_size, derives padded_vocab_size when it was not given, and re-checks
// padded_vocab_size >= vocab_size. The derived size rounds vocab_size up to a multiple of
// lcm(vocab_pad_multiple, tp), so the vocabulary-parallel embedding and LM head split evenly over
// `tp` ranks (the padding rows are masked out of the loss); a given padded_vocab_size that `tp`
// does not divide is a user error. When the recipe gave vocab_size, it must equal `vocab_size`.
// Errors name `recipe_file`.
void finalize_model_vocab(ModelConfig& model, int vocab_size, const std::string& recipe_file,
                          int tp = 1);

}  // namespace tessera
