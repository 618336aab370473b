// The step loop under any (dp, tp, pp) layout. One optimizer step = M = grad_accum x microbatches
// micro-batches per data-parallel rank, run through this rank's pipeline stage (forward + backward
// with loss scale 1/(M dp), so the gradients summed over dp are the mean over the step's tokens),
// bucketed gradient reduction over dp, a layout-independent global-norm clip folded into AdamW as
// a gradient scale, and the LR schedule at the 0-based step. Under fp16 the loss is multiplied by
// the dynamic loss scale, and a step whose gradients hold an Inf or NaN on any rank is skipped by
// every rank (the LR schedule still advances: the step index is the schedule's clock). Everything
// a step depends on (weights, moments, step count, loss-scaler state, the loader's pure (seed,
// step, rank) -> batch mapping) is in the checkpoint, which is why resuming reproduces an
// uninterrupted run bit for bit.
#include "train/trainer.h"

#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>

#include "core/fault_inject.h"
#include "core/log.h"
#include "core/memory.h"
#include "core/rng.h"
#include "data/data_blend.h"
#include "data/tokenizer.h"
#include "data/tokenizer_spec.h"
#include "io/checkpoint.h"
#include "kernels/op_profile.h"
#include "kernels/ops.h"
#include "model/transformer.h"
#include "optim/distributed_optimizer.h"
#include "optim/fp8_linear.h"
#include "optim/loss_scaler.h"
#include "optim/lr_schedule.h"
#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "train/checkpointing.h"
#include "train/generate.h"
#include "train/layout_check.h"
#include "train/metrics.h"
#include "train/pipeline_executor.h"

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
    TS_USER_ERROR(
        "{}: train.device is 'cuda' but no CUDA device is usable here ({}); use "
        "train.device: cpu or auto",
        r.file,
#ifdef TESSERA_CUDA
        "no GPU visible to this process"
#else
        "this build has no CUDA backend"
#endif
    );
  return cuda_available() ? Device::cuda : Device::cpu;  // cuda, or auto
}

// The storage and compute dtype of parameters, gradients and activations. Masters and optimizer
// state are FP32 whatever this is. The CPU backend rounds every 16-bit result exactly as the GPU
// does, so bf16 and fp16 runs are testable without a GPU.
DType compute_dtype(const Recipe& r) {
  const std::string& c = r.precision.compute;
  if (r.precision.keeps_high_precision("embedding") && r.parallel.zero == 1)
    TS_USER_ERROR(
        "{}: precision.high_precision 'embedding' reads the FP32 master table on every "
        "rank, but parallel.zero = 1 shards the masters over dp; use zero 0 or remove "
        "'embedding'",
        r.file);
  if (c == "fp32") return DType::f32;
  if (c == "bf16") return DType::bf16;
  if (c == "fp16") return DType::f16;
  return DType::bf16;  // fp8: FP8 GEMMs in the linear layers (optim/fp8_linear.h), bf16 else
}

Fp8ScalingConfig fp8_scaling_config(const Fp8Config& c) {
  Fp8ScalingConfig f;
  f.amax_history_len = c.amax_history_len;
  f.amax_compute =
      c.amax_compute == "most_recent" ? ops::Fp8AmaxCompute::most_recent : ops::Fp8AmaxCompute::max;
  f.margin = c.margin;
  return f;
}

// True when any gradient on any rank holds an Inf or NaN: every rank checks its whole local
// gradient buffer (a sum of squares in double overflows only on a non-finite element) and the
// flags are combined over the world, so dp replicas, tp ranks and pipeline stages all agree.
bool grads_overflowed(const ParamStore& params, Communicator& world) {
  const double local = ops::sum_squares(params.flat_grads());
  return world.all_reduce_scalar(std::isfinite(local) ? 0.0 : 1.0, ReduceOp::max) > 0.0;
}

// The per-op breakdown of the profiled steps: a table on the terminal, op_profile.json in out_dir.
void report_op_profile(const Recipe& r, double seconds, int64_t steps) {
  const std::vector<ops::OpTime> times = ops::profile_report();
  double op_ms = 0.0;
  for (const auto& t : times) op_ms += t.ms;
  const double step_ms = steps > 0 ? 1e3 * seconds / double(steps) : 0.0;
  std::string table =
      fmt::format("op profile over {} steps ({:.2f} ms/step, {:.2f} ms/step in ops):\n", steps,
                  step_ms, steps > 0 ? op_ms / double(steps) : 0.0);
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
// Everything the run keeps on its device, sized before anything is allocated, so a run that will
// not fit stops with the numbers instead of failing halfway.
struct MemoryPlan {
  size_t params = 0, optimizer = 0;
  size_t train_acts = 0;  // the pipeline executor's activation sets, batches and p2p buffers
  size_t workspace = 0;   // GEMM + attention scratch of the CUDA backend
  size_t fp8 = 0;  // outside the arena: FP8 weight copies (W, W^T), scratch and the saved x^T
  size_t total() const {  // the arena
    return params + optimizer + train_acts + Arena::aligned(workspace);
  }
};

// FLOPs per token for training: 6N (forward + backward of every weight) plus 12·L·h·s for the
// attention scores and values (s = sequence length, h = hidden); N counts every parameter once.
double flops_per_token(const ModelConfig& m, int seq_len) {
  return 6.0 * double(m.num_params()) + 12.0 * m.num_layers * double(m.hidden) * seq_len;
}
constexpr double kPeakBf16Flops = 989e12;  // H100/H200 SXM dense BF16

// The parallel context of this process: MPI's world when a launcher started us, else one rank.
std::unique_ptr<ParallelContext> make_context(const Recipe& r, Device device) {
  const ParallelConfig& p = r.parallel;
  if (!mpi_active()) {
    validate_layout(r, 1);  // a layout needing several ranks says how to launch it
    return ParallelContext::single(device);
  }
  validate_layout(r, world_size());
  return std::make_unique<ParallelContext>(ParallelSizes{p.tp, p.dp, p.pp}, device, p.order);
}

}  // namespace

TrainSummary train(const Recipe& recipe_in) {
  Recipe r = recipe_in;
  Device device = resolve_device(r);
  if (device == Device::cuda && mpi_active() && world_size() > 1) select_local_gpu();
  const DType dtype = compute_dtype(r);
  const bool fp8 = r.precision.compute == "fp8";
  const ParallelConfig& par = r.parallel;

  const int B = r.data.micro_batch, T = r.data.seq_len;
  const int64_t global_batch = r.global_batch();
  const int num_micro = r.micro_batches_per_step();  // per dp rank per step

  // Data first: the tokenizer (and so the vocabulary) comes from the datasets (metadata only; the
  // loaders read windows on demand). data.path: mock trains on uniform random tokens computed per
  // index (benchmarks of models whose tokenizer does not ship here).
  const bool mock = r.data.path == "mock";
  if (mock && r.model.vocab_size <= 0)
    TS_USER_ERROR("{}: data.path 'mock' needs an explicit model.vocab_size (got auto)", r.file);
  const DataBlend data = open_data_blend({{r.data.path, 1.0}}, r.train.seed, r.model.vocab_size);
  std::optional<Tokenizer> tokenizer;
  if (mock) {
    r.train.sample_tokens = 0;  // nothing to decode with
  } else {
    tokenizer = Tokenizer::from_hf_json(data.tokenizer_json, r.data.path);
    if (!r.data.tokenizer.empty())
      data.check_tokenizer_hash(load_tokenizer_spec(r.data.tokenizer).hash(),
                                "data.tokenizer = " + r.data.tokenizer);
  }
  finalize_model_vocab(r.model, static_cast<int>(data.vocab_size), r.file, par.tp);
  const std::string& tokenizer_hash = data.tokenizer_hash;

  // The layout: checked against the model and the world before anything is allocated.
  const std::unique_ptr<ParallelContext> ctx = make_context(r, device);
  const RankCoord me = ctx->coord();
  const bool rank0 = ctx->rank() == 0;
  ModelConfig stage_cfg = r.model;
  stage_cfg.recompute = stage_recomputes(r, me.pp_rank);
  stage_cfg.fp32_lm_head = r.precision.keeps_high_precision("lm_head");
  stage_cfg.fp32_embedding = r.precision.keeps_high_precision("embedding");
  const ModelShard shard = ModelShard::make(stage_cfg, par.tp, me.tp_rank, par.pp, me.pp_rank,
                                            resolve_stage_layers(r), &ctx->comm(Group::tp));
  const PipelineSchedule schedule =
      par.pp == 1 ? PipelineSchedule::one_f_one_b  // one stage: plain accumulation, one live set
                  : parse_pipeline_schedule(par.schedule);
  const int flush_micro = par.pp == 1 ? num_micro : par.microbatches;  // per pipeline flush
  const int num_flushes = num_micro / flush_micro;
  const bool zero1 = par.zero == 1;
  const bool keep_master = !zero1;

  // Size everything from the config alone, before any allocation.
  MemoryPlan plan;
  plan.params = Transformer::param_bytes(stage_cfg, shard, dtype, par.dp, keep_master);
  // The bucket layout only needs the parameters' shapes.
  const int64_t bucket_numel =
      std::max<int64_t>(1, par.bucket_bytes() / int64_t(dtype_size(dtype)));
  plan.optimizer = DistributedOptimizer::bytes_for(
      BucketLayout(Transformer::declared_params(stage_cfg, shard), par.dp, bucket_numel), dtype,
      par.zero);
  plan.train_acts =
      PipelineExecutor::bytes_needed(stage_cfg, shard, dtype, schedule, flush_micro, B, T, device);
  if (device == Device::cuda) {
    ops::set_cuda_attention_impl(r.model.attention_impl);
    plan.workspace =
        ops::cuda_workspace_bytes(B, T, r.model.num_heads / par.tp, r.model.num_kv_heads / par.tp,
                                  r.model.resolved_head_dim(), dtype);
  }
  if (fp8) {
    // An upper bound: 2 bytes per local parameter (W8, W8^T), three (M, max width) byte matrices
    // of scratch (x8, dy8, dy8^T), and the x^T each input group's forward keeps for its backward
    // (per block: q/k/v and gate/up read the hidden width, the output projection the heads'
    // width, the down projection the FFN width).
    const ModelConfig local = Transformer::local_config(stage_cfg, shard);
    const int64_t width = std::max<int64_t>(local.hidden, local.ffn_hidden);
    const int64_t saved_width =
        2 * local.hidden + int64_t(local.num_heads) * local.resolved_head_dim() + local.ffn_hidden;
    plan.fp8 = 2 * size_t(Transformer::local_num_params(stage_cfg, shard)) +
               size_t(int64_t(B) * T) * size_t(3 * width + local.num_layers * saved_width);
  }
  size_t free_bytes = 0, total_bytes = 0;
  if (device_memory_info(device, &free_bytes, &total_bytes) && plan.total() + plan.fp8 > free_bytes)
    TS_USER_ERROR(
        "{}: this run needs {:.2f} GB of GPU memory per rank (parameters {:.2f}, "
        "optimizer {:.2f}, activations and pipeline buffers {:.2f}, workspace {:.2f}, "
        "fp8 copies {:.2f}) but {:.2f} GB of {:.2f} are free; lower data.micro_batch or "
        "data.seq_len, set model.recompute: true, or spread the model with parallel.tp "
        "/ parallel.pp",
        r.file, (plan.total() + plan.fp8) / 1e9, plan.params / 1e9, plan.optimizer / 1e9,
        plan.train_acts / 1e9, plan.workspace / 1e9, plan.fp8 / 1e9, free_bytes / 1e9,
        total_bytes / 1e9);
  Arena arena(device, plan.total(), "device memory");
  if (plan.workspace > 0)
    ops::use_cuda_workspace(arena.alloc_bytes(plan.workspace), plan.workspace);

  const std::string resolved = recipe_to_yaml(r);
  if (rank0) {
    fs::create_directories(r.train.out_dir);
    std::ofstream out(fs::path(r.train.out_dir) / "recipe.yaml");
    out << resolved;
    if (!out) TS_USER_ERROR("cannot write {}/recipe.yaml (train.out_dir)", r.train.out_dir);
    log_info("resolved recipe ({}):\n{}", r.file, resolved);
    log_info(
        "layout: world {} = dp {} x tp {} x pp {} (order {}), zero {}, schedule {}, {} "
        "micro-batches of {} per dp rank per step, global batch {} sequences, stages {}",
        ctx->world_size(), par.dp, par.tp, par.pp, par.order, par.zero,
        par.pp > 1 ? par.schedule : "none", num_micro, B, global_batch,
        fmt::join(resolve_stage_layers(r), "/"));
  }
  log_debug("rank {}: tp {} dp {} pp {}, layers [{}, {})", ctx->rank(), me.tp_rank, me.dp_rank,
            me.pp_rank, shard.first_layer, shard.first_layer + shard.num_layers);

  Transformer model(stage_cfg, dtype, device, &arena, shard, par.dp, keep_master);
  model.init_weights(r.train.seed);
  std::unique_ptr<Fp8Linears> fp8_linears;  // fp8 only
  if (fp8) {
    fp8_linears = std::make_unique<Fp8Linears>(device, fp8_scaling_config(r.precision.fp8));
    fp8_linears->attach(model);
  }
  AdamWConfig acfg;
  acfg.beta1 = r.optim.beta1;
  acfg.beta2 = r.optim.beta2;
  acfg.eps = r.optim.eps;
  acfg.weight_decay = r.optim.weight_decay;
  acfg.no_decay = r.optim.no_decay;
  DataParallelConfig dcfg;
  dcfg.zero_stage = par.zero;
  dcfg.bucket_bytes = par.bucket_bytes();
  DistributedDataParallel ddp(model.params(), DataParallelGroups::from(*ctx), dcfg);
  DistributedOptimizer opt(model.params(), ddp, acfg, &arena);
  const LrSchedule sched{r.optim.schedule,     r.optim.lr,    r.optim.min_lr,
                         r.optim.warmup_steps, r.train.steps, r.optim.decay_fraction};
  model.set_grad_ready_hook([&ddp](int idx) { ddp.grads_ready_from(idx); });

  const LoaderShape shape{T, global_batch, r.train.seed, me.dp_rank, par.dp};
  const Loader train_loader(data.train, shape);
  // Evaluation batch i is the i-th run of G eval samples, split over dp ranks and micro-batches
  // exactly like a training step, so every layout evaluates the same windows.
  const Loader val_loader(data.val, shape);
  // Each pipeline stage reads only what it uses: the first the inputs, the last the targets.
  const auto inputs_of = [&](Batch& b) { return shard.first_stage() ? b.inputs.data() : nullptr; };
  const auto targets_of = [&](Batch& b) { return shard.last_stage() ? b.targets.data() : nullptr; };

  if (!model.params().has_master()) {
    // ZeRO-1 with 16-bit compute keeps the FP32 masters in the optimizer's shards: seed them with
    // the exact f32 draws (the store only holds their rounded values). A resume overwrites them.
    HostOptimizerState init;
    init.allocate(DType::f32, model.params().padded_num_elements());
    for (int i = 0; i < model.params().size(); ++i)
      model.params().draw_init(i, r.train.seed,
                               static_cast<float*>(init.master_of(model.params()[i]).data));
    opt.load_state(model.params(), init);
  }

  std::optional<LossScaler> scaler;  // fp16 only
  if (dtype == DType::f16) scaler.emplace(r.precision.loss_scale);
  const PrecisionState prec{scaler ? &*scaler : nullptr, fp8_linears.get()};

  int64_t start_step = 0;
  const std::string resume = io::resolve_resume(r.train.out_dir, r.checkpoint.resume);
  if (!resume.empty()) {
    start_step = load_checkpoint(resume, r, model, opt, prec, tokenizer_hash);
    if (rank0) log_info("resumed from {} at step {}", resume, start_step);
  }

  PipelineExecutor pipe(model, ctx->comm(Group::pp), schedule, flush_micro, B, T, arena);
  pipe.set_measure_busy(r.logging.profile_ops && par.pp > 1);
  if (rank0)
    log_info(
        "model: {} parameters ({}), {} on {}, this rank holds {} and reserved {:.2f} GB "
        "(activations {:.2f} GB), {} tokens per step",
        r.model.num_params(), r.model.family, dtype_name(dtype), device_name(device),
        model.params().num_elements(), arena.capacity() / 1e9, plan.train_acts / 1e9,
        r.tokens_per_step());

  Communicator& world = ctx->host_comm(Group::world);
  const bool reports_loss = shard.last_stage() && me.tp_rank == 0;  // one per dp replica
  // The sum over the job of one value per dp replica's last stage, tp rank 0.
  const auto replica_sum = [&](double x) {
    return world.all_reduce_scalar(reports_loss ? x : 0.0, ReduceOp::sum);
  };

  std::optional<MetricsWriter> metrics;
  if (rank0) metrics.emplace((fs::path(r.train.out_dir) / "metrics.jsonl").string(), start_step);
  TrainSummary summary;
  summary.first_step = start_step;
  // Overflow rate over the steps since the previous evaluation (fp16).
  int64_t window_steps = 0, window_skipped = 0;
  const auto run_eval = [&](int64_t step) {
    const int64_t nb = std::min<int64_t>(r.train.eval_batches, val_loader.num_eval_batches());
    const auto fill = [&](int m, Batch& batch) {
      val_loader.fill_eval(m / num_micro, m % num_micro, B, inputs_of(batch), targets_of(batch));
    };
    if (fp8_linears) fp8_linears->set_recording(false);  // evaluation must not steer the scales
    const PipelineExecutor::Result res = pipe.eval(fill, static_cast<int>(nb * num_micro));
    if (fp8_linears) fp8_linears->set_recording(true);
    const double loss_sum = replica_sum(res.loss_sum);
    const double tokens = replica_sum(double(res.valid));
    const double loss = tokens > 0 ? loss_sum / tokens : 0.0;
    if (rank0) {
      log_info("eval step {}: val_loss {:.4f} | perplexity {:.2f} | {} tokens", step, loss,
               std::exp(loss), int64_t(tokens));
      nlohmann::json rec = {{"step", step},
                            {"val_loss", loss},
                            {"val_ppl", std::exp(loss)},
                            {"val_tokens", int64_t(tokens)}};
      if (scaler) {
        const double rate = window_steps > 0 ? double(window_skipped) / double(window_steps) : 0.0;
        const LossScaler::State st = scaler->state();
        rec["overflow_rate"] = rate;
        rec["overflow_steps"] = window_skipped;
        rec["skipped_total"] = st.skipped;
        rec["loss_scale"] = st.scale;
        log_info(
            "eval step {}: fp16 overflow rate {:.2f}% ({} of {} steps since the last "
            "evaluation; {} skipped in all), loss scale {}",
            step, 100.0 * rate, window_skipped, window_steps, st.skipped, st.scale);
      }
      metrics->write(rec);
    }
    window_steps = window_skipped = 0;
    summary.final_val_loss = loss;
  };

  const double step_flops = flops_per_token(r.model, T) * double(r.tokens_per_step());
  const int num_gpus = ctx->world_size();
  const float micro_scale = 1.0f / float(int64_t(num_micro) * par.dp);
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
    fault_point(ctx->rank(), "train_step", step + 1);
    const float loss_scale = scaler ? scaler->scale() : 1.0f;
    model.params().zero_grad();
    double local_loss = 0.0;
    const auto t_pipe = Clock::now();
    for (int flush = 0; flush < num_flushes; ++flush) {
      const auto fill = [&](int m, Batch& batch) {
        train_loader.fill(step, flush * flush_micro + m, B, inputs_of(batch), targets_of(batch));
      };
      const bool last_flush = flush == num_flushes - 1;
      local_loss += pipe.train_step(fill, micro_scale * loss_scale,
                                    [&] {
                                      if (last_flush) ddp.begin_last_microbatch();
                                    })
                        .loss_sum;
    }
    const double pipe_s = seconds_since(t_pipe);  // synchronized at its end when measuring
    ddp.finish();
    const double busy = pipe.take_busy_seconds();
    if (fault_requested(ctx->rank(), "inf_grad", step + 1))  // tests: one rank's gradient overflows
      ops::fill(model.params().flat_grads().slice(0, 1), std::numeric_limits<float>::infinity());
    const double loss = replica_sum(local_loss / num_micro) / par.dp;
    const float lr = sched.at(static_cast<int>(step));
    bool skipped = false;
    double norm = 0.0;
    if (scaler) {
      // Every rank passes the same flag, so every rank's scaler takes the same decision (and
      // throws the same error when the scale has collapsed).
      skipped = scaler->update(grads_overflowed(model.params(), world));
      ++window_steps;
      window_skipped += skipped ? 1 : 0;
    }
    if (!skipped) {
      norm = opt.global_grad_norm(model.params()) / loss_scale;  // of the unscaled gradients
      if (!std::isfinite(norm) || !std::isfinite(loss))
        TS_USER_ERROR("{}: training diverged at step {} (loss {}, grad norm {}); lower optim.lr",
                      r.file, step + 1, loss, norm);
      // Unscaling is folded into AdamW's gradient scale with the clip factor.
      opt.step(model.params(), lr, clip_factor(norm, r.optim.grad_clip) / loss_scale);
    }
    // Delayed scaling: this step's amaxes, agreed over tp and dp, set the next step's scales.
    if (fp8_linears) fp8_linears->end_step(&ctx->comm(Group::tp), &ctx->comm(Group::dp));
    ops::synchronize(device);
    const double dt = seconds_since(t0);
    if (ops::profile_enabled()) {
      profiled_seconds += dt;
      ++profiled_steps;
    }
    const double tok_per_s = double(r.tokens_per_step()) / dt;
    summary.last_train_loss = loss;
    const int64_t done = step + 1;
    if (rank0) {
      nlohmann::json rec = {{"step", done},
                            {"loss", loss},
                            {"lr", lr},
                            {"grad_norm", norm},
                            {"tokens_per_s", tok_per_s},
                            {"tokens", done * r.tokens_per_step()},
                            {"step_s", dt},
                            {"mem_gb", arena.peak() / 1e9}};
      if (num_gpus > 1) rec["tokens_per_s_per_rank"] = tok_per_s / num_gpus;
      if (scaler) {
        rec["loss_scale"] = loss_scale;  // the scale this step's backward used
        rec["skipped"] = skipped ? 1 : 0;
        if (skipped) rec.erase("grad_norm");  // not computed: the gradients overflowed
      }
      if (par.pp > 1 && r.logging.profile_ops) {
        // Stage 0's compute time within the forward/backward phase (optimizer excluded): the
        // bubble is its idle fraction, to compare with (p - 1) / (m + p - 1).
        rec["pipeline_busy_s"] = busy;
        rec["pipeline_s"] = pipe_s;
        rec["pipeline_bubble"] = 1.0 - busy / pipe_s;
      }
      if (device == Device::cuda) {
        rec["mfu"] = step_flops / dt / (kPeakBf16Flops * num_gpus);
        if (device_memory_info(device, &free_bytes, &total_bytes))
          rec["device_used_gb"] = (total_bytes - free_bytes) / 1e9;
      }
      metrics->write(rec);
      if (done % r.logging.every == 0 || done == r.train.steps) {
        const double elapsed = seconds_since(loop_start);
        const double eta = elapsed / double(done - start_step) * double(r.train.steps - done);
        log_info(
            "step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f}{} | {:.0f} tok/s{} | eta {}",
            done, r.train.steps, loss, lr, norm,
            scaler ? fmt::format(" | scale {}{}", loss_scale, skipped ? " (skipped)" : "")
                   : std::string(),
            tok_per_s,
            device == Device::cuda ? fmt::format(" | mfu {:.1f}%", 100.0 * rec["mfu"].get<double>())
                                   : std::string(),
            format_duration(eta));
      }
    }
    if (r.train.eval_every > 0 && done % r.train.eval_every == 0 && done != r.train.steps)
      run_eval(done);
    if (r.checkpoint.every > 0 && done % r.checkpoint.every == 0 && done != r.train.steps)
      save_checkpoint(r, *ctx, model, opt, prec, done, tokenizer_hash);
  }
  summary.train_seconds = seconds_since(loop_start);
  summary.last_step = step;
  if (ops::profile_enabled()) {
    ops::profile_enable(false);
    if (rank0) report_op_profile(r, profiled_seconds, profiled_steps);
  }
  run_eval(step);
  if (step > start_step && r.checkpoint.save_final)
    save_checkpoint(r, *ctx, model, opt, prec, step, tokenizer_hash);
  if (rank0)
    log_info("trained steps {}..{} in {}", start_step, step,
             format_duration(summary.train_seconds));

  // Samples need the whole model in one process: generation under tp/pp belongs to the inference
  // engine, not built yet.
  if (tokenizer && r.train.sample_tokens > 0 && r.train.num_samples > 0 && rank0) {
    if (par.tp > 1 || par.pp > 1) {
      log_info("samples skipped: generation needs tp = pp = 1 (this run has tp {} pp {})", par.tp,
               par.pp);
    } else {
      if (fp8_linears) fp8_linears->set_recording(false);
      Activations gen_acts(model, 1, T, /*training=*/false, nullptr);
      std::vector<int32_t> prompt = r.train.sample_prompt.empty()
                                        ? std::vector<int32_t>{}
                                        : tokenizer->encode(r.train.sample_prompt);
      if (prompt.empty()) prompt.push_back(tokenizer->eot_id() >= 0 ? tokenizer->eot_id() : 0);
      for (int i = 0; i < r.train.num_samples; ++i) {
        const auto ids =
            generate(model, gen_acts, prompt, r.train.sample_tokens, r.train.sample_temperature,
                     r.train.seed + i, tokenizer->eot_id());
        log_info("sample {}: {}{}", i, r.train.sample_prompt, tokenizer->decode(ids));
      }
    }
  }
  return summary;
}

}  // namespace tessera
