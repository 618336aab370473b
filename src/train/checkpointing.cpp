// Sharded save and reshard-on-load of the trainer's state (see checkpointing.h and
// io/checkpoint.h for the on-disk layout).
#include "train/checkpointing.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/fault_inject.h"
#include "core/log.h"
#include "io/checkpoint.h"

namespace tessera {

namespace {

std::vector<int64_t> dims_of(const Shape& s) { return {s.dims.begin(), s.dims.begin() + s.ndim}; }

// Where a parameter's local slice sits in the global tensor.
struct SliceBox {
  std::vector<int64_t> global_shape, offset, shape;
};
SliceBox box_of(const ParamSpec& spec) {
  SliceBox b{dims_of(spec.full_shape()), std::vector<int64_t>(spec.shape.ndim, 0),
             dims_of(spec.shape)};
  if (spec.tp_sharded()) b.offset[spec.shard_dim] = spec.shard_offset;
  return b;
}

std::vector<char> host_bytes(const Tensor& t) {
  std::vector<char> out(t.nbytes());
  copy_bytes(out.data(), Device::cpu, t.data, t.device, out.size());
  return out;
}

// Each FP8 layer's scaling state by its weight's name: (L, 3) amax history and (3) scales for x,
// w, dy. Checkpoints from non-FP8 runs have none: the scales start fresh, as in a new run.
void load_fp8_state(const io::CheckpointReader& ck, const std::string& dir, Fp8Linears& fp8) {
  Fp8ScalingState::State st = fp8.state().gather();
  const int64_t n = int64_t(st.scale.size());
  const std::string first = "fp8." + fp8.name(0) + ".amax_history";
  if (!ck.has_tensor(first)) {
    log_info("checkpoint {} has no FP8 scaling state (saved without fp8): scales start at 1", dir);
    return;
  }
  const int64_t L = ck.global_shape(first)[0];
  st.history_len = L;
  st.amax_history.assign(L * n, 0.0f);
  for (int slot = 0; slot < fp8.num_layers(); ++slot) {
    const std::string base = "fp8." + fp8.name(slot);
    for (const char* part : {".amax_history", ".scale", ".scale_inv"})
      if (!ck.has_tensor(base + part) || ck.dtype(base + part) != DType::f32)
        TS_USER_ERROR("checkpoint {}: FP8 state '{}{}' is missing or not f32", dir, base, part);
    if (ck.global_shape(base + ".amax_history") != std::vector<int64_t>{L, 3})
      TS_USER_ERROR("checkpoint {}: '{}.amax_history' is not ({}, 3)", dir, base, L);
    std::vector<float> hist(L * 3);
    ck.read_full(base + ".amax_history", hist.data());
    for (int64_t i = 0; i < L; ++i)
      for (int k = 0; k < 3; ++k) st.amax_history[i * n + 3 * slot + k] = hist[i * 3 + k];
    ck.read_full(base + ".scale", &st.scale[3 * slot]);
    ck.read_full(base + ".scale_inv", &st.scale_inv[3 * slot]);
  }
  fp8.state().load(st);  // validates, and adapts a different history length
}

}  // namespace

void read_param_slice(const io::CheckpointReader& ck, const std::string& name,
                      const ParamSpec& spec, int vocab_size, DType dtype, void* dst) {
  const std::string& dir = ck.path();
  const SliceBox want = box_of(spec);
  if (!ck.has_tensor(name)) TS_USER_ERROR("checkpoint {} has no tensor '{}'", dir, name);
  if (ck.dtype(name) != dtype)
    TS_USER_ERROR("checkpoint {}: tensor '{}' is {}, expected {}", dir, name,
                  dtype_name(ck.dtype(name)), dtype_name(dtype));
  const std::vector<int64_t>& gs = ck.global_shape(name);
  // Vocabulary tables may differ in padding rows only (padding rounds up to tp): those rows
  // never reach a loss or an output, so they are read where both have them and zero otherwise.
  const bool vocab_table = gs.size() == 2 && want.global_shape.size() == 2 &&
                           gs[1] == want.global_shape[1] &&
                           std::min(gs[0], want.global_shape[0]) >= vocab_size &&
                           (spec.name == "embed.wte" || spec.name == "lm_head.weight");
  if (gs != want.global_shape && !vocab_table)
    TS_USER_ERROR("checkpoint {}: tensor '{}' has global shape [{}], this model needs [{}]", dir,
                  name, fmt::join(gs, ", "), fmt::join(want.global_shape, ", "));
  std::vector<int64_t> shape = want.shape;
  if (vocab_table) {
    shape[0] =
        std::max<int64_t>(0, std::min(want.offset[0] + want.shape[0], gs[0]) - want.offset[0]);
    // Rows past what the checkpoint holds read as zero.
    const int64_t row_bytes = int64_t(dtype_size(dtype)) * want.shape[1];
    std::memset(static_cast<char*>(dst) + shape[0] * row_bytes, 0,
                size_t((want.shape[0] - shape[0]) * row_bytes));
  }
  if (shape[0] > 0) ck.read_slice(name, want.offset, shape, dst);
}

void save_checkpoint(const Recipe& r, const ParallelContext& ctx, const Transformer& model,
                     const DistributedOptimizer& opt, PrecisionState prec, int64_t step,
                     const std::string& tokenizer_hash, const std::string& tokenizer_json) {
  const ParamStore& ps = model.params();
  HostOptimizerState state;
  opt.gather_state(ps, &state);  // collective over dp; filled on dp ranks 0 .. ep-1
  io::CheckpointWriter w(r.train.out_dir, step, ctx.rank(), ctx.world_size());
  const int dp_rank = ctx.coord().dp_rank;
  if (dp_rank < r.parallel.ep) {
    // Replica 0 writes the dense parameters, replica 0 of each ep rank's experts (dp ranks
    // 0 .. ep-1) its experts; within them each tensor slice has exactly one owner.
    for (const Param& p : ps.all()) {
      if (!p.spec.owner || (dp_rank > 0 && !p.spec.expert_parallel)) continue;
      const SliceBox b = box_of(p.spec);
      const auto add = [&](const std::string& name, const Tensor& t) {
        const std::vector<char> host = host_bytes(t);
        w.add({name, t.dtype, b.global_shape, b.offset, b.shape, host.data()});
      };
      add(p.spec.name, state.master_of(p));
      add("optim.m." + p.spec.name, state.m_of(p));
      add("optim.v." + p.spec.name, state.v_of(p));
    }
  }
  const Fp8Linears* fp8 = prec.fp8;
  if (fp8 && ctx.coord().dp_rank == 0 && ctx.coord().tp_rank == 0) {
    // Amaxes are agreed over tp and dp, so replica 0's tp rank 0 holds every stage's state.
    const Fp8ScalingState::State st = fp8->state().gather();
    const int64_t L = st.history_len, n = int64_t(st.scale.size());
    for (int slot = 0; slot < fp8->num_layers(); ++slot) {
      std::vector<float> hist(L * 3);
      for (int64_t i = 0; i < L; ++i)
        for (int k = 0; k < 3; ++k) hist[i * 3 + k] = st.amax_history[i * n + 3 * slot + k];
      const std::string base = "fp8." + fp8->name(slot);
      w.add({base + ".amax_history", DType::f32, {L, 3}, {0, 0}, {L, 3}, hist.data()});
      w.add({base + ".scale", DType::f32, {3}, {0}, {3}, &st.scale[3 * slot]});
      w.add({base + ".scale_inv", DType::f32, {3}, {0}, {3}, &st.scale_inv[3 * slot]});
    }
  }
  if (ctx.rank() == 0) {
    w.set_meta("recipe", recipe_to_yaml(r));
    w.set_meta("step", std::to_string(step));
    w.set_meta("optimizer_step", std::to_string(opt.step_count()));
    w.set_meta("layout", nlohmann::json{{"dp", r.parallel.dp},
                                        {"tp", r.parallel.tp},
                                        {"pp", r.parallel.pp},
                                        {"ep", r.parallel.ep},
                                        {"zero", r.parallel.zero}}
                             .dump());
    w.set_meta("rng", nlohmann::json{{"seed", r.train.seed}, {"kind", "philox4x32-10"}}.dump());
    w.set_meta("loader", nlohmann::json{{"seed", r.train.seed},
                                        {"next_step", step},
                                        {"samples_consumed", step * r.global_batch()}}
                             .dump());
    w.set_meta("tokenizer_hash", tokenizer_hash);
    if (!tokenizer_json.empty()) w.set_meta("tokenizer_json", tokenizer_json);
    if (const LossScaler* scaler = prec.scaler) {
      // Every rank's scaler holds the same state (it only sees job-wide flags).
      const LossScaler::State st = scaler->state();
      w.set_meta("loss_scaler", nlohmann::json{{"scale", st.scale},
                                               {"growth_tracker", st.growth_tracker},
                                               {"hysteresis_left", st.hysteresis_left},
                                               {"steps", st.steps},
                                               {"skipped", st.skipped},
                                               {"overflows_at_min", st.overflows_at_min}}
                                    .dump());
    }
  }
  w.write_shard();
  signal_point(ctx.rank(), "term_in_save", step);  // tests: preempted halfway through a save
  Communicator& world = ctx.host_comm(Group::world);
  world.barrier();  // every shard is on disk before rank 0 commits
  if (ctx.rank() == 0) {
    const std::string dir = w.finalize(r.checkpoint.keep);
    log_info("checkpoint: wrote {}", dir);
  }
  world.barrier();  // nobody reads or writes the next one before this one is committed
}

int64_t load_checkpoint(const std::string& dir, const Recipe& r, Transformer& model,
                        DistributedOptimizer& opt, PrecisionState prec,
                        const std::string& tokenizer_hash) {
  const io::CheckpointReader ck = io::CheckpointReader::open(dir);
  const Recipe saved = parse_recipe(ck.meta("recipe"), dir + "/recipe");
  ModelConfig a = saved.model, b = r.model;  // the padding may change
  a.padded_vocab_size = b.padded_vocab_size;
  a.vocab_pad_multiple = b.vocab_pad_multiple;
  if (a.moe.same_architecture(b.moe)) a.moe = b.moe;  // losses and capacity may change
  if (!(a == b))
    TS_USER_ERROR(
        "checkpoint {} was saved with a different model section than recipe {}; resume "
        "needs the same architecture",
        dir, r.file);
  if (ck.has_meta("tokenizer_hash") && ck.meta("tokenizer_hash") != tokenizer_hash)
    TS_USER_ERROR(
        "checkpoint {} was trained with tokenizer {} but the data of {} (data.path) "
        "uses {}",
        dir, ck.meta("tokenizer_hash"), r.file, tokenizer_hash);
  ParamStore& ps = model.params();
  HostOptimizerState state;
  state.allocate(ps.master_dtype(), ps.padded_num_elements());
  for (const Param& p : ps.all()) {
    const std::pair<std::string, Tensor> parts[] = {{p.spec.name, state.master_of(p)},
                                                    {"optim.m." + p.spec.name, state.m_of(p)},
                                                    {"optim.v." + p.spec.name, state.v_of(p)}};
    for (const auto& [name, dst] : parts)
      read_param_slice(ck, name, p.spec, r.model.vocab_size, ps.master_dtype(), dst.data);
  }
  opt.load_state(ps, state);
  opt.set_step_count(std::stoll(ck.meta("optimizer_step")));
  if (prec.fp8) load_fp8_state(ck, dir, *prec.fp8);
  LossScaler* scaler = prec.scaler;
  if (scaler && ck.has_meta("loss_scaler")) {
    const auto j = nlohmann::json::parse(ck.meta("loss_scaler"), nullptr, false);
    const char* keys[] = {"scale", "growth_tracker", "hysteresis_left",
                          "steps", "skipped",        "overflows_at_min"};
    for (const char* k : keys)
      if (j.is_discarded() || !j.contains(k) || !j[k].is_number())
        TS_USER_ERROR("checkpoint {}: metadata 'loss_scaler' lacks a number '{}': {}", dir, k,
                      ck.meta("loss_scaler"));
    LossScaler::State st;
    st.scale = j["scale"].get<float>();
    st.growth_tracker = j["growth_tracker"].get<int>();
    st.hysteresis_left = j["hysteresis_left"].get<int>();
    st.steps = j["steps"].get<int64_t>();
    st.skipped = j["skipped"].get<int64_t>();
    st.overflows_at_min = j["overflows_at_min"].get<int>();
    scaler->load(st);
  } else if (scaler) {
    log_info(
        "checkpoint {} has no loss-scaler state (saved without fp16): the scale starts at "
        "precision.loss_scale.initial = {}",
        dir, scaler->scale());
  }
  return std::stoll(ck.meta("step"));
}

}  // namespace tessera
