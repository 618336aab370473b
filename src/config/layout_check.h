// Layout checks for 3D parallelism (dp x tp x pp): does a recipe's model, batch and pipeline split
// fit its parallel layout, and does the job have dp * tp * pp ranks? Pure (no MPI), so every case
// is unit-tested in one process. The parser runs the field checks with line numbers; the trainer
// runs validate_layout with MPI's world size before it allocates anything.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "config/recipe.h"

namespace tessera {

// Names a field and its value in a message: "parallel.tp = 3 (line 16)" while parsing (where the
// value came from), "parallel.tp = 3" for a recipe already built.
using ShowField = std::function<std::string(const std::string& key, const std::string& value)>;

// Every layout check that does not need the world size; the first failure is a user error that
// starts with r.file and names both sides through `show`:
//   parallel.dp/tp/pp/microbatches >= 1; data.grad_accum * parallel.microbatches fits in int;
//   model.num_heads, model.num_kv_heads, model.ffn_hidden and model.padded_vocab_size (when known,
//   i.e. > 0) divisible by parallel.tp; model.num_layers >= parallel.pp; parallel.stage_layers
//   empty or pp entries >= 1 summing to num_layers; parallel.recompute_stages distinct, in [0, pp);
//   the global batch (< 2^31 sequences) and, when data.global_batch is given, divisible by
//   dp * grad_accum * microbatches and equal to micro_batch times that; parallel.ep >= 1, and when
//   > 1 it divides parallel.dp and moe.num_experts (which must be > 0).
void check_layout_fields(const Recipe& r, const ShowField& show);

// Called by the trainer before allocating anything, after finalize_model_vocab (so the padded
// vocabulary is known): world_size (MPI_COMM_WORLD's size, however the job was launched) must
// equal dp * tp * pp, then check_layout_fields. User errors name the values and r.file.
void validate_layout(const Recipe& r, int world_size);

// Blocks per pipeline stage (pp entries summing to model.num_layers): parallel.stage_layers when
// given, else an even split whose remainder goes one block each to the earliest stages, e.g.
// 10 layers over 4 stages -> {3, 3, 2, 2}. The earliest stages get the extra blocks because the
// last stage also runs the LM head and the loss (for Llama-3.2-1B's 128K vocabulary that head
// costs about as much as four blocks); list stage_layers to balance memory or a large head
// explicitly. Stage s holds blocks [sum of the counts before s, that + count s).
// Expects a recipe that passed check_layout_fields (TS_CHECK otherwise).
std::vector<int> resolve_stage_layers(const Recipe& r);

// Whether pipeline stage `stage_idx` recomputes its blocks' activations in backward:
// train.recompute (every stage) or stage_idx listed in parallel.recompute_stages.
bool stage_recomputes(const Recipe& r, int stage_idx);

}  // namespace tessera
