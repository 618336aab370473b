// The step loop. One optimizer step = grad_accum micro-batches (forward + backward with loss scale
// 1/grad_accum, so gradients are the mean over the step's tokens), global-norm clipping folded into
// AdamW as a gradient scale, and the LR schedule evaluated at the 0-based step. Everything a step
// depends on (weights, moments, step count, the loader's pure (seed, step) -> batch mapping) is in
// the checkpoint, which is why resuming reproduces an uninterrupted run bit for bit.
#include "train/trainer.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>

#include "core/log.h"
#include "core/memory.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "data/tokenizer_spec.h"
#include "io/checkpoint.h"
#include "kernels/op_profile.h"
#include "kernels/ops.h"
#include "model/transformer.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "train/generate.h"
#include "train/metrics.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Device resolve_device(const Recipe& r) {
  const std::string& d = r.train.device;
  if (d == "cpu") return Device::cpu;
  if (d == "cuda" && !cuda_available())
    TS_USER_ERROR("{}: train.device is 'cuda' but no CUDA device is usable here ({}); use "
                  "train.device: cpu or auto", r.file,
#ifdef TESSERA_CUDA
                  "no GPU visible to this process"
#else
                  "this build has no CUDA backend"
#endif
    );
  return cuda_available() ? Device::cuda : Device::cpu;  // cuda, or auto
}

DType compute_dtype(const Recipe& r, Device device) {
  const std::string& c = r.precision.compute;
  if (c == "fp32") return DType::f32;
  if (c == "bf16") {
    if (device == Device::cpu)
      TS_USER_ERROR("{}: precision.compute 'bf16' on the CPU backend is not built yet (the CPU "
                    "emulation of 16-bit numerics is issue 5); use train.device: cuda, or "
                    "precision.compute: fp32", r.file);
    return DType::bf16;
  }
  TS_USER_ERROR("{}: precision.compute '{}' is not built yet (fp16 with loss scaling and fp8 are "
                "issue 5); use fp32 or bf16", r.file, c);
}

// Features the recipe can name but this build does not have yet: fail before allocating anything.
void check_supported(const Recipe& r) {
  const ParallelConfig& p = r.parallel;
  if (p.dp * p.tp * p.pp != 1)
    TS_USER_ERROR("{}: parallel layout dp={} tp={} pp={}: multi-rank training is not built yet "
                  "(issue 4); set parallel.dp, parallel.tp and parallel.pp to 1", r.file, p.dp,
                  p.tp, p.pp);
  if (p.zero != 0)
    TS_USER_ERROR("{}: parallel.zero={}: ZeRO-1 is not built yet (issue 4)", r.file, p.zero);
}

// Host copy of a tensor's bytes (device tensors are downloaded).
std::vector<char> host_bytes(const Tensor& t) {
  std::vector<char> out(t.nbytes());
  copy_bytes(out.data(), Device::cpu, t.data, t.device, out.size());
  return out;
}

std::vector<int64_t> dims_of(const Shape& s) { return {s.dims.begin(), s.dims.begin() + s.ndim}; }

// Writes the FP32 master weights and AdamW moments plus everything else resume needs.
void save_checkpoint(const Recipe& r, const Transformer& model, const AdamW& opt, int64_t step,
                     const std::string& tokenizer_hash) {
  io::CheckpointWriter w(r.train.out_dir, step, /*rank=*/0, /*world=*/1);
  for (const Param& p : model.params().all()) {
    const std::vector<int64_t> shape = dims_of(p.spec.shape), zeros(shape.size(), 0);
    const int64_t b = static_cast<int64_t>(p.offset), e = b + p.value.numel();
    const auto add = [&](const std::string& name, const Tensor& t) {
      const std::vector<char> host = host_bytes(t);
      w.add({name, t.dtype, shape, zeros, shape, host.data()});
    };
    add(p.spec.name, p.master);
    add("optim.m." + p.spec.name, opt.m().slice(b, e));
    add("optim.v." + p.spec.name, opt.v().slice(b, e));
  }
  w.set_meta("recipe", recipe_to_yaml(r));
  w.set_meta("step", std::to_string(step));
  w.set_meta("optimizer_step", std::to_string(opt.step_count()));
  w.set_meta("rng", nlohmann::json{{"seed", r.train.seed}, {"kind", "philox4x32-10"}}.dump());
  w.set_meta("loader", nlohmann::json{{"seed", r.train.seed},
                                      {"next_step", step},
                                      {"samples_consumed", step * r.tokens_per_step() / r.data.seq_len}}
                           .dump());
  w.set_meta("tokenizer_hash", tokenizer_hash);
  const std::string dir = w.commit(r.checkpoint.keep);
  log_info("checkpoint: wrote {}", dir);
}

// Loads parameters and moments; returns the step to continue from.
int64_t load_checkpoint(const std::string& dir, const Recipe& r, Transformer& model, AdamW& opt,
                        const std::string& tokenizer_hash) {
  const io::CheckpointReader ck = io::CheckpointReader::open(dir);
  const Recipe saved = parse_recipe(ck.meta("recipe"), dir + "/recipe");
  ModelConfig a = saved.model, b = r.model;  // execution choices may change on resume
  a.recompute = b.recompute;
  a.attention_impl = b.attention_impl;
  if (!(a == b))
    TS_USER_ERROR("checkpoint {} was saved with a different model section than recipe {}; resume "
                  "needs the same architecture", dir, r.file);
  if (ck.has_meta("tokenizer_hash") && ck.meta("tokenizer_hash") != tokenizer_hash)
    TS_USER_ERROR("checkpoint {} was trained with tokenizer {} but data.path {} uses {}", dir,
                  ck.meta("tokenizer_hash"), r.data.path, tokenizer_hash);
  for (Param& p : model.params().all()) {
    for (const std::string& name : {p.spec.name, "optim.m." + p.spec.name, "optim.v." + p.spec.name}) {
      if (!ck.has_tensor(name)) TS_USER_ERROR("checkpoint {} has no tensor '{}'", dir, name);
      const auto& gs = ck.global_shape(name);
      if (int64_t(gs.size()) != p.spec.shape.ndim || ck.numel(name) != p.value.numel())
        TS_USER_ERROR("checkpoint {}: tensor '{}' has the wrong shape for this model", dir, name);
    }
    const int64_t b = static_cast<int64_t>(p.offset), e = b + p.value.numel();
    const auto read_as = [&](const std::string& name, Tensor dst) {
      if (ck.dtype(name) != dst.dtype)
        TS_USER_ERROR("checkpoint {}: tensor '{}' is {}, expected {}", dir, name,
                      dtype_name(ck.dtype(name)), dtype_name(dst.dtype));
      std::vector<char> host(dst.nbytes());
      ck.read_full(name, host.data());
      copy_bytes(dst.data, dst.device, host.data(), Device::cpu, host.size());
    };
    read_as(p.spec.name, p.master);
    read_as("optim.m." + p.spec.name, opt.m().slice(b, e));
    read_as("optim.v." + p.spec.name, opt.v().slice(b, e));
  }
  model.params().refresh_values();
  opt.set_step_count(std::stoll(ck.meta("optimizer_step")));
  return std::stoll(ck.meta("step"));
}

// One micro-batch: filled on the host by the loader, then placed where the model runs.
struct Batch {
  std::vector<int32_t> inputs, targets;  // (B, T) host
  Tensor tokens, labels;                 // (B, T) i32 on the model's device

  Batch(int B, int T, Device device, Arena& arena)
      : inputs(size_t(B) * T), targets(size_t(B) * T) {
    if (device == Device::cpu) {
      tokens = Tensor(inputs.data(), DType::i32, device, {B, T});
      labels = Tensor(targets.data(), DType::i32, device, {B, T});
    } else {
      tokens = arena.alloc(DType::i32, {B, T});
      labels = arena.alloc(DType::i32, {B, T});
    }
  }
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

struct EvalResult {
  double loss = 0.0;
  int64_t tokens = 0;
};

EvalResult evaluate(const Transformer& model, Activations& acts, const Loader& val, int max_batches,
                    Batch& batch) {
  const int64_t num_batches = std::min<int64_t>(max_batches, val.num_eval_batches());
  double loss_sum = 0.0;
  int64_t count = 0;
  for (int64_t i = 0; i < num_batches; ++i) {
    const int rows = val.fill_eval(i, 0, acts.B(), batch.inputs.data(), batch.targets.data());
    if (rows == 0) break;
    batch.upload();
    const int64_t valid = batch.num_valid();
    loss_sum += model.forward(acts, batch.tokens, batch.labels) * double(valid);
    count += valid;
  }
  return {count > 0 ? loss_sum / double(count) : 0.0, count};
}

// The per-op breakdown of the profiled steps: a table on the terminal, op_profile.json in out_dir.
void report_op_profile(const Recipe& r, double seconds, int64_t steps) {
  const std::vector<ops::OpTime> times = ops::profile_report();
  double op_ms = 0.0;
  for (const auto& t : times) op_ms += t.ms;
  const double step_ms = steps > 0 ? 1e3 * seconds / double(steps) : 0.0;
  std::string table = fmt::format("op profile over {} steps ({:.2f} ms/step, {:.2f} ms/step in ops):\n",
                                  steps, step_ms, steps > 0 ? op_ms / double(steps) : 0.0);
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& t : times) {
    const double per_step = t.ms / double(std::max<int64_t>(steps, 1));
    table += fmt::format("  {:<24} {:>6} calls/step {:>9.3f} ms/step {:>6.1f}%\n", t.op,
                         t.calls / std::max<int64_t>(steps, 1), per_step,
                         step_ms > 0 ? 100.0 * per_step / step_ms : 0.0);
    rows.push_back({{"op", t.op}, {"calls", t.calls}, {"ms", t.ms}, {"ms_per_step", per_step}});
  }
  log_info("{}", table);
  std::ofstream(fs::path(r.train.out_dir) / "op_profile.json")
      << nlohmann::json{{"steps", steps}, {"step_ms", step_ms}, {"ops", rows}}.dump(2);
}

// Uniform random token ids for data.path: mock, capped at 64M tokens (the loader wraps around).
std::vector<uint32_t> mock_tokens(const Recipe& r, int64_t n, const char* stream) {
  n = std::min<int64_t>(n, int64_t(1) << 26);
  const CounterRng rng(r.train.seed, stream);
  std::vector<uint32_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = rng.bits(uint64_t(i)) % uint32_t(r.model.vocab_size);
  return out;
}

// Everything the run keeps on its device, sized before anything is allocated, so a run that will
// not fit stops with the numbers instead of failing halfway.
struct MemoryPlan {
  size_t params = 0, optimizer = 0, train_acts = 0, eval_acts = 0, sample_acts = 0, batches = 0;
  size_t workspace = 0;  // GEMM + attention scratch of the CUDA backend
  size_t total() const {
    return params + optimizer + train_acts + eval_acts + sample_acts + batches +
           Arena::aligned(workspace);
  }
};

// FLOPs per token for training: 6N (forward + backward of every weight) plus 12·L·h·s for the
// attention scores and values (s = sequence length, h = hidden); N counts every parameter once.
double flops_per_token(const ModelConfig& m, int seq_len) {
  return 6.0 * double(m.num_params()) + 12.0 * m.num_layers * double(m.hidden) * seq_len;
}
constexpr double kPeakBf16Flops = 989e12;  // H100/H200 SXM dense BF16

}  // namespace

TrainSummary train(const Recipe& recipe_in) {
  Recipe r = recipe_in;
  check_supported(r);
  const Device device = resolve_device(r);
  const DType dtype = compute_dtype(r, device);

  const int B = r.data.micro_batch, T = r.data.seq_len;
  const int64_t global_batch = int64_t(B) * r.data.grad_accum * r.parallel.dp;

  // Data first: the tokenizer (and so the vocabulary) comes from the dataset. data.path: mock
  // trains on uniform random tokens (benchmarks of models whose tokenizer does not ship here).
  std::optional<TokenDataset> data;
  std::optional<Tokenizer> tokenizer;
  std::vector<uint32_t> mock_train, mock_val;
  std::string tokenizer_hash = "mock";
  if (r.data.path == "mock") {
    if (r.model.vocab_size <= 0)
      TS_USER_ERROR("{}: data.path 'mock' needs an explicit model.vocab_size (got auto)", r.file);
    mock_train = mock_tokens(r, int64_t(r.train.steps) * global_batch * T + 1, "mock/train");
    mock_val = mock_tokens(r, int64_t(r.train.eval_batches) * B * T + 1, "mock/val");
    r.train.sample_tokens = 0;  // nothing to decode with
    finalize_model_vocab(r.model, r.model.vocab_size, r.file);
  } else {
    data = TokenDataset::open(r.data.path);
    tokenizer = Tokenizer::from_hf_json(data->tokenizer_json(), r.data.path);
    if (!r.data.tokenizer.empty())
      data->check_tokenizer(load_tokenizer_spec(r.data.tokenizer), "data.tokenizer = " + r.data.tokenizer);
    finalize_model_vocab(r.model, static_cast<int>(data->vocab_size()), r.file);
    tokenizer_hash = data->tokenizer_hash();
  }
  const std::span<const uint32_t> train_tokens = data ? std::span<const uint32_t>(data->train().tokens) : mock_train;
  const std::span<const uint32_t> val_tokens = data ? std::span<const uint32_t>(data->val().tokens) : mock_val;

  // Size everything from the config alone, before any allocation.
  MemoryPlan plan;
  const int64_t num_params = r.model.num_params();
  plan.params = ParamStore::bytes_for(num_params, dtype);
  plan.optimizer = AdamW::bytes_for(num_params, dtype);
  plan.train_acts = Activations::bytes_needed(r.model, dtype, B, T, true);
  plan.eval_acts = Activations::bytes_needed(r.model, dtype, B, T, false);
  plan.sample_acts = r.train.sample_tokens > 0 ? Activations::bytes_needed(r.model, dtype, 1, T, false) : 0;
  plan.batches = Batch::bytes_needed(B, T, device);
  if (device == Device::cuda) {
    ops::set_cuda_attention_impl(r.model.attention_impl);
    plan.workspace = ops::cuda_workspace_bytes(B, T, r.model.num_heads, r.model.num_kv_heads,
                                               r.model.resolved_head_dim(), dtype);
  }
  size_t free_bytes = 0, total_bytes = 0;
  if (device_memory_info(device, &free_bytes, &total_bytes) && plan.total() > free_bytes)
    TS_USER_ERROR("{}: this run needs {:.2f} GB of GPU memory (parameters {:.2f}, optimizer {:.2f}, "
                  "activations {:.2f} + eval {:.2f}, workspace {:.2f}) but {:.2f} GB of {:.2f} "
                  "are free; lower data.micro_batch or data.seq_len, or set model.recompute: "
                  "true", r.file, plan.total() / 1e9, plan.params / 1e9, plan.optimizer / 1e9,
                  plan.train_acts / 1e9, (plan.eval_acts + plan.sample_acts) / 1e9,
                  plan.workspace / 1e9, free_bytes / 1e9, total_bytes / 1e9);
  Arena arena(device, plan.total(), "device memory");
  if (plan.workspace > 0) ops::use_cuda_workspace(arena.alloc_bytes(plan.workspace), plan.workspace);

  fs::create_directories(r.train.out_dir);
  const std::string resolved = recipe_to_yaml(r);
  {
    std::ofstream out(fs::path(r.train.out_dir) / "recipe.yaml");
    out << resolved;
    if (!out) TS_USER_ERROR("cannot write {}/recipe.yaml (train.out_dir)", r.train.out_dir);
  }
  log_info("resolved recipe ({}):\n{}", r.file, resolved);

  Transformer model(r.model, dtype, device, &arena);
  model.init_weights(r.train.seed);
  AdamWConfig acfg;
  acfg.beta1 = r.optim.beta1;
  acfg.beta2 = r.optim.beta2;
  acfg.eps = r.optim.eps;
  acfg.weight_decay = r.optim.weight_decay;
  acfg.no_decay = r.optim.no_decay;
  AdamW opt(model.params(), acfg, &arena);
  const LrSchedule sched{r.optim.schedule, r.optim.lr, r.optim.min_lr, r.optim.warmup_steps,
                         r.train.steps, r.optim.decay_fraction};

  const Loader train_loader(train_tokens, T, global_batch, r.train.seed, 0, 1, r.data.path + " /train");
  const Loader val_loader(val_tokens, T, B, r.train.seed, 0, 1, r.data.path + " /val");

  int64_t start_step = 0;
  const std::string resume = io::resolve_resume(r.train.out_dir, r.checkpoint.resume);
  if (!resume.empty()) {
    start_step = load_checkpoint(resume, r, model, opt, tokenizer_hash);
    log_info("resumed from {} at step {}", resume, start_step);
  }

  Activations acts(model, B, T, /*training=*/true, &arena);
  Activations eval_acts(model, B, T, /*training=*/false, &arena);
  Batch batch(B, T, device, arena);
  log_info("model: {} parameters ({}), {} on {}, {:.2f} GB reserved (activations {:.2f} GB), {} "
           "tokens per step", model.params().num_elements(), r.model.family, dtype_name(dtype),
           device_name(device), arena.capacity() / 1e9, plan.train_acts / 1e9, r.tokens_per_step());

  MetricsWriter metrics((fs::path(r.train.out_dir) / "metrics.jsonl").string(), start_step);
  TrainSummary summary;
  summary.first_step = start_step;
  const auto run_eval = [&](int64_t step) {
    const EvalResult ev = evaluate(model, eval_acts, val_loader, r.train.eval_batches, batch);
    log_info("eval step {}: val_loss {:.4f} | perplexity {:.2f} | {} tokens", step, ev.loss,
             std::exp(ev.loss), ev.tokens);
    metrics.write({{"step", step}, {"val_loss", ev.loss}, {"val_ppl", std::exp(ev.loss)},
                   {"val_tokens", ev.tokens}});
    summary.final_val_loss = ev.loss;
  };

  const double step_flops = flops_per_token(r.model, T) * double(r.tokens_per_step());
  const auto loop_start = Clock::now();
  int64_t step = start_step;
  constexpr int kProfileWarmupSteps = 3;  // cuBLASLt heuristics and cuDNN plans are built first
  double profiled_seconds = 0.0;
  int64_t profiled_steps = 0;
  for (; step < r.train.steps; ++step) {
    if (r.logging.profile_ops && step == start_step + kProfileWarmupSteps) {
      ops::profile_reset();
      ops::profile_enable(true);
    }
    const auto t0 = Clock::now();
    model.params().zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < r.data.grad_accum; ++micro) {
      train_loader.fill(step, micro, B, batch.inputs.data(), batch.targets.data());
      batch.upload();
      loss += model.forward(acts, batch.tokens, batch.labels) / r.data.grad_accum;
      model.backward(acts, batch.tokens, batch.labels, 1.0f / r.data.grad_accum);
    }
    const double norm = grad_norm(model.params());
    if (!std::isfinite(norm) || !std::isfinite(loss))
      TS_USER_ERROR("{}: training diverged at step {} (loss {}, grad norm {}); lower optim.lr",
                    r.file, step + 1, loss, norm);
    const float lr = sched.at(static_cast<int>(step));
    opt.step(model.params(), lr, clip_factor(norm, r.optim.grad_clip));
    ops::synchronize(device);
    const double dt = seconds_since(t0);
    if (ops::profile_enabled()) {
      profiled_seconds += dt;
      ++profiled_steps;
    }
    const double tok_per_s = double(r.tokens_per_step()) / dt;
    summary.last_train_loss = loss;
    const int64_t done = step + 1;
    nlohmann::json rec = {{"step", done}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
                          {"tokens_per_s", tok_per_s}, {"tokens", done * r.tokens_per_step()},
                          {"step_s", dt}, {"mem_gb", arena.peak() / 1e9}};
    if (device == Device::cuda) {
      rec["mfu"] = step_flops / dt / kPeakBf16Flops;
      if (device_memory_info(device, &free_bytes, &total_bytes))
        rec["device_used_gb"] = (total_bytes - free_bytes) / 1e9;
    }
    metrics.write(rec);
    if (done % r.logging.every == 0 || done == r.train.steps) {
      const double elapsed = seconds_since(loop_start);
      const double eta = elapsed / double(done - start_step) * double(r.train.steps - done);
      log_info("step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s{} | eta {}",
               done, r.train.steps, loss, lr, norm, tok_per_s,
               device == Device::cuda ? fmt::format(" | mfu {:.1f}%", 100.0 * rec["mfu"].get<double>())
                                      : std::string(),
               format_duration(eta));
    }
    if (r.train.eval_every > 0 && done % r.train.eval_every == 0 && done != r.train.steps)
      run_eval(done);
    if (r.checkpoint.every > 0 && done % r.checkpoint.every == 0 && done != r.train.steps)
      save_checkpoint(r, model, opt, done, tokenizer_hash);
  }
  summary.train_seconds = seconds_since(loop_start);
  summary.last_step = step;
  if (ops::profile_enabled()) {
    ops::profile_enable(false);
    report_op_profile(r, profiled_seconds, profiled_steps);
  }
  run_eval(step);
  if (step > start_step && r.checkpoint.save_final)
    save_checkpoint(r, model, opt, step, tokenizer_hash);
  log_info("trained steps {}..{} in {}", start_step, step, format_duration(summary.train_seconds));

  if (tokenizer && r.train.sample_tokens > 0 && r.train.num_samples > 0) {
    Activations gen_acts(model, 1, T, /*training=*/false, &arena);
    std::vector<int32_t> prompt = r.train.sample_prompt.empty()
                                      ? std::vector<int32_t>{}
                                      : tokenizer->encode(r.train.sample_prompt);
    if (prompt.empty()) prompt.push_back(tokenizer->eot_id() >= 0 ? tokenizer->eot_id() : 0);
    for (int i = 0; i < r.train.num_samples; ++i) {
      const auto ids = generate(model, gen_acts, prompt, r.train.sample_tokens,
                                r.train.sample_temperature, r.train.seed + i, tokenizer->eot_id());
      log_info("sample {}: {}{}", i, r.train.sample_prompt, tokenizer->decode(ids));
    }
  }
  return summary;
}

}  // namespace tessera
