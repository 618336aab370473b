// Layout checks for 3D parallelism: the field checks shared by the recipe parser and the trainer,
// the world-size check, the pipeline split and per-stage recomputation. Each failure is a user
// error naming both sides of the mismatch and the recipe file; nothing here talks to MPI.
#include "config/layout_check.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace tessera {

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

std::string list_text(const std::vector<int>& v) { return fmt::format("[{}]", fmt::join(v, ", ")); }

// Sizes that every later check divides by.
void check_sizes(const Recipe& r, const ShowField& show) {
  const ParallelConfig& p = r.parallel;
  for (const auto& [key, value] : {std::pair<const char*, int>{"parallel.dp", p.dp},
                                   {"parallel.tp", p.tp},
                                   {"parallel.pp", p.pp},
                                   {"parallel.ep", p.ep},
                                   {"data.grad_accum", r.data.grad_accum}}) {
    if (value < 1)
      TS_USER_ERROR("{}: {} must be >= 1", r.file, show(key, fmt::format("{}", value)));
  }
  if (p.microbatches < 1)
    TS_USER_ERROR("{}: {} must be >= 1 (micro-batches per {} pipeline flush)", r.file,
                  show("parallel.microbatches", fmt::format("{}", p.microbatches)),
                  to_string(p.schedule));
  const int64_t per_step = int64_t(r.data.grad_accum) * p.microbatches;
  if (per_step > kIntMax)
    TS_USER_ERROR("{}: {} x {} = {} micro-batches per step is more than {}", r.file,
                  show("data.grad_accum", fmt::format("{}", r.data.grad_accum)),
                  show("parallel.microbatches", fmt::format("{}", p.microbatches)), per_step,
                  kIntMax);
}

// data.global_batch against dp, grad_accum, microbatches and micro_batch (see "Batch terms" in
// recipe.h); then the global batch itself must fit in int.
void check_global_batch(const Recipe& r, const ShowField& show) {
  const ParallelConfig& p = r.parallel;
  const DataConfig& d = r.data;
  const auto num = [](int v) { return fmt::format("{}", v); };
  // <= 2^31 * 2^31: grad_accum * microbatches fits in int (check_sizes).
  const int64_t rows = int64_t(p.dp) * d.grad_accum * p.microbatches;
  if (d.global_batch > 0) {
    if (d.global_batch % rows != 0)
      TS_USER_ERROR(
          "{}: global batch not divisible by dp x microbatches: {} is not a multiple "
          "of {} x {} x {} = {} (each data-parallel rank runs grad_accum x microbatches "
          "micro-batches of data.micro_batch sequences)",
          r.file, show("data.global_batch", num(d.global_batch)), show("parallel.dp", num(p.dp)),
          show("data.grad_accum", num(d.grad_accum)),
          show("parallel.microbatches", num(p.microbatches)), rows);
    if (d.global_batch / rows != d.micro_batch)
      TS_USER_ERROR(
          "{}: {} disagrees with {}: global_batch / (dp x grad_accum x microbatches) = "
          "{} / ({} x {} x {}) = {} sequences per micro-batch; give only one of them",
          r.file, show("data.global_batch", num(d.global_batch)),
          show("data.micro_batch", num(d.micro_batch)), d.global_batch, p.dp, d.grad_accum,
          p.microbatches, d.global_batch / rows);
  }
  if (d.micro_batch < 1)
    TS_USER_ERROR("{}: {} must be >= 1", r.file, show("data.micro_batch", num(d.micro_batch)));
  // Compared in double: micro_batch * rows can exceed int64.
  if (double(d.micro_batch) * double(rows) > double(kIntMax))
    TS_USER_ERROR("{}: the global batch {} x {} x {} x {} is more than {} sequences", r.file,
                  show("data.micro_batch", num(d.micro_batch)), show("parallel.dp", num(p.dp)),
                  show("data.grad_accum", num(d.grad_accum)),
                  show("parallel.microbatches", num(p.microbatches)), kIntMax);
}

// What tensor parallelism splits: attention heads, key/value heads, MLP units, vocabulary rows.
void check_tensor_split(const Recipe& r, const ShowField& show) {
  const ModelConfig& m = r.model;
  const std::string tp = show("parallel.tp", fmt::format("{}", r.parallel.tp));
  const auto check = [&](const char* key, int value, const char* why) {
    if (value % r.parallel.tp != 0)
      TS_USER_ERROR("{}: {} is not divisible by {} ({})", r.file,
                    show(key, fmt::format("{}", value)), tp, why);
  };
  check("model.num_heads", m.num_heads, "attention heads are split across tensor-parallel ranks");
  check("model.num_kv_heads", m.num_kv_heads,
        "key/value heads are split across tensor-parallel ranks");
  check("model.ffn_hidden", m.ffn_hidden,
        "the MLP's hidden units are split across tensor-parallel ranks");
  if (m.padded_vocab_size > 0)  // 0: vocab_size is auto and the dataset has not been opened yet
    check("model.padded_vocab_size", m.padded_vocab_size,
          "the embedding and LM head are split by vocabulary rows across tensor-parallel ranks; "
          "leave padded_vocab_size out to round the vocabulary up to a multiple of tp");
}

// Pipeline stages: enough layers, the explicit split, the recomputed stages.
void check_pipeline_split(const Recipe& r, const ShowField& show) {
  const ParallelConfig& p = r.parallel;
  const int num_layers = r.model.num_layers;
  const std::string pp = show("parallel.pp", fmt::format("{}", p.pp));
  const std::string layers = show("model.num_layers", fmt::format("{}", num_layers));
  if (num_layers < p.pp)
    TS_USER_ERROR("{}: {} is fewer than {} (every pipeline stage needs a layer)", r.file, layers,
                  pp);
  if (!p.stage_layers.empty()) {
    const std::string given = show("parallel.stage_layers", list_text(p.stage_layers));
    if (int(p.stage_layers.size()) != p.pp)
      TS_USER_ERROR("{}: {} has {} entries but {} (one entry per pipeline stage)", r.file, given,
                    p.stage_layers.size(), pp);
    int64_t sum = 0;
    for (size_t i = 0; i < p.stage_layers.size(); ++i) {
      if (p.stage_layers[i] < 1)
        TS_USER_ERROR("{}: {}: stage {} has {} layers; every pipeline stage needs at least one",
                      r.file, given, i, p.stage_layers[i]);
      sum += p.stage_layers[i];
    }
    if (sum != num_layers) TS_USER_ERROR("{}: {} sums to {} but {}", r.file, given, sum, layers);
  }
  const std::vector<int>& stages = p.recompute_stages;
  const std::string given = show("parallel.recompute_stages", list_text(stages));
  for (size_t i = 0; i < stages.size(); ++i) {
    if (stages[i] < 0 || stages[i] >= p.pp)
      TS_USER_ERROR("{}: {}: stage index {} is outside [0, {}) for {}", r.file, given, stages[i],
                    p.pp, pp);
    if (std::find(stages.begin(), stages.begin() + i, stages[i]) != stages.begin() + i)
      TS_USER_ERROR("{}: {}: stage {} is listed twice", r.file, given, stages[i]);
  }
}

// Expert parallelism: a split of the dp ranks (Megatron-Core's layout), over the routed experts.
void check_expert_split(const Recipe& r, const ShowField& show) {
  const int ep = r.parallel.ep, dp = r.parallel.dp, experts = r.moe.num_experts;
  if (ep == 1) return;
  const std::string given = show("parallel.ep", fmt::format("{}", ep));
  if (dp % ep != 0)
    TS_USER_ERROR(
        "{}: {} does not divide {} (expert-parallel groups are carved out of the "
        "data-parallel ranks; attention stays replicated over dp)",
        r.file, given, show("parallel.dp", fmt::format("{}", dp)));
  if (experts == 0)
    TS_USER_ERROR("{}: {} needs a mixture-of-experts model (set moe.num_experts)", r.file, given);
  if (experts % ep != 0)
    TS_USER_ERROR(
        "{}: {} does not divide {} (every expert-parallel rank holds the same number "
        "of routed experts)",
        r.file, given, show("moe.num_experts", fmt::format("{}", experts)));
}

}  // namespace

void check_layout_fields(const Recipe& r, const ShowField& show) {
  check_sizes(r, show);
  check_global_batch(r, show);
  check_tensor_split(r, show);
  check_pipeline_split(r, show);
  check_expert_split(r, show);
}

void validate_layout(const Recipe& r, int world_size) {
  TS_CHECK(world_size >= 1, "world size {} from the launcher", world_size);
  const ParallelConfig& p = r.parallel;
  const int64_t product = int64_t(p.dp) * p.tp * p.pp;
  if (product != world_size)
    TS_USER_ERROR(
        "{}: world size {} (the job was launched with {} ranks, as by mpirun -np {}) "
        "!= parallel.dp {} x parallel.tp {} x parallel.pp {} = {}; launch {} ranks "
        "(launch/mpirun.sh -n {}) or change the layout",
        r.file, world_size, world_size, world_size, p.dp, p.tp, p.pp, product, product, product);
  check_layout_fields(r, [](const std::string& key, const std::string& value) {
    return fmt::format("{} = {}", key, value);
  });
}

std::vector<int> resolve_stage_layers(const Recipe& r) {
  const int pp = r.parallel.pp, num_layers = r.model.num_layers;
  TS_CHECK(pp >= 1 && num_layers >= pp, "num_layers {} over pp {}: check_layout_fields first",
           num_layers, pp);
  if (!r.parallel.stage_layers.empty()) {
    const std::vector<int>& given = r.parallel.stage_layers;
    TS_CHECK(int(given.size()) == pp &&
                 std::accumulate(given.begin(), given.end(), int64_t{0}) == num_layers,
             "stage_layers {} for pp {}, num_layers {}: check_layout_fields first",
             list_text(given), pp, num_layers);
    return given;
  }
  std::vector<int> counts(pp, num_layers / pp);
  for (int s = 0; s < num_layers % pp; ++s) ++counts[s];
  return counts;
}

bool stage_recomputes(const Recipe& r, int stage_idx) {
  TS_CHECK(stage_idx >= 0 && stage_idx < r.parallel.pp, "stage {} outside [0, {})", stage_idx,
           r.parallel.pp);
  const std::vector<int>& stages = r.parallel.recompute_stages;
  return r.train.recompute || std::find(stages.begin(), stages.end(), stage_idx) != stages.end();
}

}  // namespace tessera
