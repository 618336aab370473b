// Trainer checkpoints under any parallel layout: each rank writes the parameters it owns (tp
// slices, its stage's layers, its ep rank's experts; data-parallel replica 0 only, for experts
// replica 0 of the expert_dp group) with global names, shapes and offsets — routed experts as
// (E, ...) tensors by global expert index — plus their FP32 masters and AdamW moments gathered
// over dp; loading reads each rank's slice of whatever layout wrote the checkpoint.
#pragma once
#include <cstdint>
#include <string>

#include "config/recipe.h"
#include "io/checkpoint.h"
#include "model/transformer.h"
#include "optim/distributed_optimizer.h"
#include "optim/fp8_linear.h"
#include "optim/loss_scaler.h"
#include "parallel/parallel_context.h"

namespace tessera {

// Collective over the whole job: every rank writes its shard, then rank 0 commits the directory.
// The precision policy's state that a checkpoint carries (each null when not in use): the FP16
// loss scaler (metadata) and the FP8 scaling state (tensors "fp8.<layer weight>.*").
struct PrecisionState {
  LossScaler* scaler = nullptr;
  Fp8Linears* fp8 = nullptr;
};

// Reads the slice of checkpoint tensor `name` that parameter `spec` holds on this rank, into
// `dst` (host memory, spec.shape elements of `dtype`, which the tensor must have), from whatever
// layout wrote it. The embedding and head tables may differ from the checkpoint's in padding rows
// only (rows at and past vocab_size): rows it lacks read as zero.
void read_param_slice(const io::CheckpointReader& ck, const std::string& name,
                      const ParamSpec& spec, int vocab_size, DType dtype, void* dst);

// The data's tokenizer is stored whole (meta tokenizer_json, "" for mock data) beside its hash, so
// an exported model carries the tokenizer it was trained with (src/export).
void save_checkpoint(const Recipe& r, const ParallelContext& ctx, const Transformer& model,
                     const DistributedOptimizer& opt, PrecisionState prec, int64_t step,
                     const std::string& tokenizer_hash, const std::string& tokenizer_json);

// Every rank reads its slices (parameters, masters, moments) from `dir`; returns the step to
// continue from. Architecture and tokenizer must match; the layout may differ.
// The precision state is restored when the checkpoint has it; a checkpoint without it (saved
// under another precision) leaves it at its initial state.
int64_t load_checkpoint(const std::string& dir, const Recipe& r, Transformer& model,
                        DistributedOptimizer& opt, PrecisionState prec,
                        const std::string& tokenizer_hash);

}  // namespace tessera
